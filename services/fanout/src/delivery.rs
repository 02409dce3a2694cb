//! Delivery workers: take `chappe.jobs.deliver`, load the stored message and
//! publish it to every member's `chappe.deliver.u.<user>`.
//!
//! A job is acked only after every member was published to; a job that
//! fails on the store is nacked and comes back after
//! `delivery_retry_delay`. Publishing twice is harmless: clients dedupe by
//! message id.
//!
//! Each job is handled in a `fanout.deliver` span, child of the trace
//! context the job carries (the submit that queued it), and counted in
//! `chappe_fanout_delivery_jobs_total{outcome}`; the queue's depth is
//! sampled into `chappe_fanout_delivery_queue_depth` every
//! [`QUEUE_DEPTH_SAMPLE_EVERY`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chappe_bus::subjects::DELIVERY_GROUP;
use chappe_bus::{Bus, Headers, Job, Subjects};
use chappe_proto::ids::{ConversationId, MessageId, UserId};
use chappe_proto::internal::{DeliverJob, UserDelivery, user_delivery};
use chappe_telemetry::metrics::{self, OutcomeLabels};
use chappe_telemetry::otel;
use futures::StreamExt;
use prost::Message as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::FanoutStore;
use crate::config::FanoutConfig;
use crate::convert;
use crate::error::{Error, Result};

/// How often the delivery queue's depth is sampled for
/// `chappe_fanout_delivery_queue_depth`.
pub const QUEUE_DEPTH_SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The running workers of one fanout.
pub struct Workers {
    token: CancellationToken,
    tasks: JoinSet<()>,
}

impl Workers {
    pub async fn start(
        config: &FanoutConfig,
        store: Arc<dyn FanoutStore>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Result<Self, chappe_bus::Error> {
        let token = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for _ in 0..config.delivery_workers.max(1) {
            let jobs = bus
                .consume(&subjects.jobs_deliver(), DELIVERY_GROUP)
                .await?;
            let worker = Worker {
                store: store.clone(),
                bus: bus.clone(),
                subjects: subjects.clone(),
                retry_delay: config.delivery_retry_delay,
                in_flight: config.delivery_jobs_in_flight.max(1),
            };
            tasks.spawn(worker.run(jobs, token.clone()));
        }
        tasks.spawn(sample_queue_depth(bus, subjects, token.clone()));
        Ok(Self { token, tasks })
    }

    /// Stops taking jobs; the job in hand of each worker is finished.
    pub async fn stop(mut self) {
        self.token.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Samples the delivery queue's depth until `token` is cancelled.
async fn sample_queue_depth(bus: Arc<dyn Bus>, subjects: Subjects, token: CancellationToken) {
    let queue = subjects.jobs_deliver();
    let mut tick = tokio::time::interval(QUEUE_DEPTH_SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        match bus.queue_depth(&queue, DELIVERY_GROUP).await {
            Ok(Some(depth)) => {
                let depth = i64::try_from(depth).unwrap_or(i64::MAX);
                metrics::metrics().fanout_delivery_queue_depth.set(depth);
            }
            Ok(None) => return,
            Err(e) => tracing::debug!(error = %e, "delivery queue depth not sampled"),
        }
    }
}

struct Worker {
    store: Arc<dyn FanoutStore>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    retry_delay: std::time::Duration,
    in_flight: usize,
}

impl Worker {
    /// Handles up to `in_flight` jobs at once (each waits on the store, the
    /// bus and JetStream's confirmed ack, so one at a time would leave the
    /// worker idle on fsyncs); on cancellation takes no new job and
    /// finishes those in hand.
    async fn run(self, jobs: chappe_bus::Jobs, token: CancellationToken) {
        let worker = &self;
        chappe_bus::until_cancelled(jobs, token)
            .for_each_concurrent(self.in_flight, |job| worker.handle(job))
            .await;
    }

    async fn handle(&self, job: Job) {
        let span = tracing::info_span!(
            "fanout.deliver",
            otel.kind = "consumer",
            attempt = job.attempt,
            outcome = tracing::field::Empty,
            conversation = tracing::field::Empty,
            message = tracing::field::Empty,
        );
        otel::set_parent(&span, &job.message.headers);
        self.settle(job).instrument(span).await
    }

    async fn settle(&self, job: Job) {
        let (outcome, settled) = match self.deliver(&job.message.payload).await {
            Ok(()) => ("delivered", job.ack().await),
            Err(Error::Store(e)) => {
                tracing::warn!(error = %e, attempt = job.attempt, "delivery failed; will retry");
                ("retried", job.nack(self.retry_delay).await)
            }
            Err(e) => {
                // A job that can never succeed (malformed, or its message is
                // gone) is dropped rather than retried forever.
                tracing::error!(error = %e, "undeliverable job dropped");
                ("dropped", job.ack().await)
            }
        };
        tracing::Span::current().record("outcome", outcome);
        metrics::metrics()
            .fanout_delivery_jobs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Err(e) = settled {
            tracing::warn!(error = %e, "delivery job not settled; it will come back");
        }
    }

    async fn deliver(&self, payload: &Bytes) -> Result<()> {
        let job = DeliverJob::decode(payload.clone())
            .map_err(|e| Error::Invalid(format!("malformed delivery job: {e}")))?;
        let conversation = ConversationId::parse(&job.conversation_id)?;
        let message_id = MessageId::parse(&job.message_id)?;
        let span = tracing::Span::current();
        span.record("conversation", tracing::field::display(conversation));
        span.record("message", tracing::field::display(message_id));
        let row = self
            .store
            .get_message(conversation, message_id)
            .await?
            .ok_or_else(|| Error::Invalid(format!("message {message_id} is not stored")))?;
        let delivery = UserDelivery {
            item: Some(user_delivery::Item::Message(convert::message(row))),
        };
        let payload = Bytes::from(delivery.encode_to_vec());
        for member in self.store.members(conversation).await? {
            let Ok(user) = UserId::parse(member) else {
                continue;
            };
            if let Err(e) = self
                .bus
                .publish(
                    &self.subjects.deliver_user(&user),
                    Headers::new(),
                    payload.clone(),
                )
                .await
            {
                // Core publish is at most once anyway; the member syncs.
                tracing::warn!(error = %e, %user, "delivery not published");
            }
        }
        Ok(())
    }
}
