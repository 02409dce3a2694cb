//! The NATS implementation of [`Bus`], on async-nats (DESIGN.md §3).
//!
//! - publish/subscribe: core NATS, at most once, headers as NATS headers;
//!   `subscribe` and `serve` return once the server has the subscription
//!   (or after `api_timeout` while disconnected: it is made on reconnection);
//! - request/reply: core NATS requests to a queue group; a request that
//!   meets no responder, times out or loses its connection is sent again up
//!   to [`NatsConfig::request_retries`] times with a doubling backoff (callers'
//!   requests are idempotent by design: submits carry a `client_msg_id`);
//!   the caller's timeout bounds all attempts together;
//! - work queues: one JetStream stream (`<PREFIX>_JOBS` on `<prefix>.jobs.>`,
//!   work-queue retention, file storage); a queue is one subject in it, and
//!   must be under `<prefix>.jobs.`. `enqueue` returns once JetStream has
//!   persisted the job. `consume` reads a durable pull consumer per (group,
//!   queue) with explicit acks: `ack` waits for the server's confirmation,
//!   `nack(delay)` is a NAK with that delay, a job dropped unsettled is NAKed
//!   at once (and `ack_wait` is the backstop for a consumer that died), and a
//!   job that used its `max_deliver` attempts is published (persisted) on
//!   `<queue>.dead` and terminated;
//! - connection loss: async-nats reconnects and resubscribes by itself;
//!   `consume` streams reopen their pull after an error, with a backoff.
//!
//! Since the stream has work-queue retention, one queue has one consumer
//! group: JetStream refuses a second group on the same queue.

use std::collections::VecDeque;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{Acker as NatsMessageAcker, PublishMessage};
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind, kv};
use async_nats::{
    Client, ConnectOptions, Event, HeaderMap, HeaderName, HeaderValue, RequestErrorKind,
    ServerAddr, connection::State,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::{
    Acker, Bus, Error, Headers, Job, Jobs, Message, Replier, Request, Requests, Result,
    Subscription, validate_subject,
};

/// How to reach NATS and how the bus uses it.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`); the client moves to another one when
    /// its server goes away, and learns the rest of the cluster from it.
    /// Default: `nats://127.0.0.1:4222`.
    pub urls: Vec<String>,
    /// The subject prefix, as in [`Subjects`](crate::Subjects): queues live
    /// under `<prefix>.jobs.`, in the JetStream stream `<PREFIX>_JOBS`.
    /// Default: `chappe`.
    pub prefix: String,
    /// The name of the connection, as the server reports it. Default: `chappe`.
    pub connection_name: String,
    /// Extra attempts of a request that met no responder, timed out or lost
    /// its connection, and of an enqueue or a JetStream call that failed the
    /// same way. A request's timeout bounds all its attempts together, each
    /// getting an equal share of the time left. Default: 2.
    pub request_retries: u32,
    /// The wait before the first retry; it doubles at each retry, up to
    /// `retry_backoff_max`. Default: 100 ms.
    pub retry_backoff: Duration,
    /// The longest wait between two retries, also between two attempts to
    /// reopen a consumer after an error. Default: 2 s.
    pub retry_backoff_max: Duration,
    /// How long JetStream waits for a delivered job to be settled before it
    /// delivers it again: the backstop for a consumer that died with jobs in
    /// hand. Default: 30 s.
    pub ack_wait: Duration,
    /// Deliveries of one job before it goes to `<queue>.dead`. Default: 10.
    pub max_deliver: u32,
    /// Delays before JetStream redelivers a job left unsettled past its ack
    /// wait, one per redelivery (the last one repeats); when set, they
    /// replace `ack_wait`. A nacked or dropped job is not concerned: it comes
    /// back after the delay it was nacked with. Default: empty.
    pub nack_backoff: Vec<Duration>,
    /// Jobs a consumer fetches from JetStream at once. Jobs fetched but not
    /// yet handed out when a `consume` stream is dropped are handed back
    /// (NAKed) at once. Default: 8.
    pub pull_batch: usize,
    /// How long JetStream holds a job handed back before it offers it again:
    /// long enough for the other pulls of a process that stops to be gone,
    /// so that they do not take it back with them. Default: 250 ms.
    pub hand_back_delay: Duration,
    /// How long one pull request waits on the server for a job when the
    /// queue is empty (it is made again on a reconnection). Default: 30 s.
    pub pull_expires: Duration,
    /// Replicas of the jobs stream and of key-value buckets in a JetStream
    /// cluster. Default: 1.
    pub replicas: usize,
    /// Timeout of JetStream API calls and publish acknowledgements, and of
    /// the round trip that confirms a subscription. Default: 5 s.
    pub api_timeout: Duration,
    /// The longest wait between two reconnection attempts. Default: 2 s.
    pub reconnect_delay_max: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            prefix: crate::subjects::DEFAULT_PREFIX.to_owned(),
            connection_name: "chappe".to_owned(),
            request_retries: 2,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(2),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            nack_backoff: Vec::new(),
            pull_batch: 8,
            hand_back_delay: Duration::from_millis(250),
            pull_expires: Duration::from_secs(30),
            replicas: 1,
            api_timeout: Duration::from_secs(5),
            reconnect_delay_max: Duration::from_secs(2),
        }
    }
}

impl NatsConfig {
    /// The settings a service binary was started with (`--nats`,
    /// `--prefix`, `--jetstream-replicas`), the rest defaults.
    pub fn for_service(
        args: &chappe_telemetry::program::ServiceArgs,
        connection_name: &str,
    ) -> Self {
        Self {
            urls: args.nats.clone(),
            prefix: args.prefix.clone(),
            connection_name: connection_name.into(),
            replicas: args.jetstream_replicas.into(),
            ..Self::default()
        }
    }

    /// The config with `url` as the only server.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            ..Self::default()
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    jetstream: jetstream::Context,
    config: NatsConfig,
    /// `<PREFIX>_JOBS`.
    stream_name: String,
    /// `<prefix>.jobs.`
    queue_prefix: String,
    /// Counts the connections made, the first included.
    connections: watch::Receiver<u64>,
    /// Jobs being handed back, which `close` waits for.
    background: TaskTracker,
}

impl NatsBus {
    /// Connects to NATS and creates (or updates) the jobs stream.
    ///
    /// Fails if no server answers or JetStream is not enabled; once
    /// connected, the client reconnects by itself for ever.
    pub async fn connect(config: NatsConfig) -> Result<NatsBus> {
        validate_subject(&config.prefix, false)?;
        let addrs = config
            .urls
            .iter()
            .map(|url| {
                ServerAddr::from_str(url)
                    .map_err(|e| Error::Transport(format!("invalid NATS url {url:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if addrs.is_empty() {
            return Err(Error::Transport("no NATS url configured".to_owned()));
        }
        let name = config.connection_name.clone();
        let delay_max = config.reconnect_delay_max;
        let (connected, connections) = watch::channel(0u64);
        let client = ConnectOptions::new()
            .name(&config.connection_name)
            .max_reconnects(None)
            .connection_timeout(config.api_timeout)
            .reconnect_delay_callback(move |attempts| {
                // Immediately, then 10 ms doubling up to the maximum.
                let retry = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
                match retry {
                    0 => Duration::ZERO,
                    n => backoff(Duration::from_millis(10), delay_max, n),
                }
            })
            .event_callback(move |event| {
                if let Event::Connected = event {
                    connected.send_modify(|n| *n += 1);
                }
                let name = name.clone();
                async move { log_event(&name, event) }
            })
            .connect(addrs)
            .await
            .map_err(|e| Error::Transport(format!("connecting to NATS: {e}")))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.api_timeout)
            .build(client.clone());
        let stream_name = format!("{}_JOBS", name_token(&config.prefix).to_uppercase());
        let queue_prefix = format!("{}.jobs.", config.prefix);
        let inner = Arc::new(Inner {
            client,
            jetstream,
            config,
            stream_name,
            queue_prefix,
            connections,
            background: TaskTracker::new(),
        });
        inner.ensure_stream().await?;
        Ok(NatsBus { inner })
    }

    /// The underlying connection.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The JetStream context of the connection, for services that use
    /// JetStream directly.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }

    /// The name of the jobs stream (`<PREFIX>_JOBS`).
    pub fn jobs_stream(&self) -> &str {
        &self.inner.stream_name
    }

    /// Creates the key-value bucket `bucket` (file storage, one value per
    /// key, entries expiring after `ttl`; zero for never), or opens it and
    /// applies that configuration.
    pub async fn key_value(&self, bucket: &str, ttl: Duration) -> Result<kv::Store> {
        self.inner
            .jetstream
            .create_or_update_key_value(kv::Config {
                bucket: bucket.to_owned(),
                history: 1,
                max_age: ttl,
                storage: StorageType::File,
                num_replicas: self.inner.config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Transport(format!("key-value bucket {bucket:?}: {e}")))
    }
}

fn log_event(connection: &str, event: Event) {
    match event {
        Event::Connected => tracing::info!(connection, "NATS connected"),
        Event::Disconnected => tracing::warn!(connection, "NATS disconnected: reconnecting"),
        Event::SlowConsumer(sid) => {
            tracing::warn!(connection, sid, "NATS slow consumer: messages dropped")
        }
        other => tracing::warn!(connection, event = %other, "NATS event"),
    }
}

/// `base`, doubled `retry - 1` times, at most `max`.
fn backoff(base: Duration, max: Duration, retry: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
        .min(max)
}

/// A name JetStream accepts (no `.`, `*`, `>`, spaces or path separators).
fn name_token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn to_nats_headers(headers: &Headers) -> Result<Option<HeaderMap>> {
    if headers.is_empty() {
        return Ok(None);
    }
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let name = HeaderName::from_str(name)
            .map_err(|e| Error::Transport(format!("header name {name:?}: {e}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| Error::Transport(format!("header value {value:?}: {e}")))?;
        map.insert(name, value);
    }
    Ok(Some(map))
}

fn from_nats(message: async_nats::Message) -> Message {
    let mut headers = Headers::new();
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            if let Some(value) = values.last() {
                headers.insert(name.to_string(), value.as_str().to_owned());
            }
        }
    }
    Message {
        subject: message.subject.to_string(),
        headers,
        payload: message.payload,
    }
}

impl Inner {
    /// Hands back `fetched`, then what `rest` still brings, in the
    /// background: a NAK with `hand_back_delay`, so that another consumer
    /// takes them now rather than after `ack_wait`.
    fn hand_back(&self, queue: &str, fetched: Vec<jetstream::Message>, rest: Option<pull::Batch>) {
        let queue = queue.to_owned();
        let delay = Some(self.config.hand_back_delay).filter(|d| !d.is_zero());
        let wait = self.config.api_timeout;
        self.in_background(async move {
            let nak = |message: jetstream::Message| async move {
                message.double_ack_with(AckKind::Nak(delay)).await.is_ok()
            };
            let mut handed = futures::future::join_all(fetched.into_iter().map(nak)).await;
            if let Some(mut rest) = rest {
                while let Ok(Some(Ok(message))) = tokio::time::timeout(wait, rest.next()).await {
                    handed.push(nak(message).await);
                }
            }
            let lost = handed.iter().filter(|ok| !**ok).count();
            if lost > 0 {
                tracing::warn!(%queue, lost, "fetched jobs not handed back: they return after ack_wait");
            }
            tracing::debug!(%queue, count = handed.len(), "fetched jobs handed back");
        });
    }

    /// Runs `task` on the current runtime, tracked for `close`; without a
    /// runtime (the process is ending), `ack_wait` brings its jobs back.
    fn in_background(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.background.track_future(task));
        }
    }

    async fn retry_pause(&self, retry: u32) {
        let config = &self.config;
        tokio::time::sleep(backoff(
            config.retry_backoff,
            config.retry_backoff_max,
            retry,
        ))
        .await;
    }

    /// Creates the jobs stream, or updates it to this configuration.
    async fn ensure_stream(&self) -> Result<()> {
        let config = jetstream::stream::Config {
            name: self.stream_name.clone(),
            description: Some("Chappe work queues".to_owned()),
            subjects: vec![format!("{}>", self.queue_prefix)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: self.config.replicas,
            ..Default::default()
        };
        self.jetstream
            .create_or_update_stream(config)
            .await
            .map(|_| ())
            .map_err(|e| Error::Transport(format!("jobs stream {}: {e}", self.stream_name)))
    }

    /// Queues live in the jobs stream.
    fn check_queue(&self, queue: &str) -> Result<()> {
        validate_subject(queue, false)?;
        if queue.starts_with(&self.queue_prefix) {
            Ok(())
        } else {
            Err(Error::InvalidSubject(queue.to_owned()))
        }
    }

    /// Confirms that the server has processed what was sent so far (so a
    /// new subscription is in place). A connection that is down keeps the
    /// subscription and makes it again once back: not an error.
    async fn confirm(&self, what: &str) {
        match tokio::time::timeout(self.config.api_timeout, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(what, error = %e, "subscription not confirmed"),
            Err(_) => tracing::debug!(what, "subscription not confirmed in time"),
        }
    }

    /// Publishes to the jobs stream and waits for JetStream's ack, retrying
    /// what a reconnection or a restart explains.
    async fn persist(&self, subject: &str, headers: &Headers, payload: Bytes) -> Result<()> {
        let headers = to_nats_headers(headers)?;
        let mut retry = 0;
        loop {
            let mut publish = PublishMessage::build().payload(payload.clone());
            if let Some(h) = &headers {
                publish = publish.headers(h.clone());
            }
            let result = match self
                .jetstream
                .send_publish(subject.to_owned(), publish)
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let transient = matches!(
                e.kind(),
                PublishErrorKind::TimedOut
                    | PublishErrorKind::BrokenPipe
                    | PublishErrorKind::StreamNotFound
                    | PublishErrorKind::MaxAckPending
            );
            if !transient || retry >= self.config.request_retries {
                return Err(Error::Transport(format!("enqueue on {subject}: {e}")));
            }
            retry += 1;
            tracing::debug!(subject, retry, error = %e, "enqueue failed: retrying");
            self.retry_pause(retry).await;
            if e.kind() == PublishErrorKind::StreamNotFound {
                // A server that lost its store: make the stream again.
                if let Err(e) = self.ensure_stream().await {
                    tracing::debug!(error = %e, "jobs stream not recreated yet");
                }
            }
        }
    }

    /// Creates the durable consumer of `group` on `queue`, or updates it to
    /// this configuration.
    async fn ensure_consumer(&self, name: &str, queue: &str) -> Result<PullConsumer> {
        let config = pull::Config {
            durable_name: Some(name.to_owned()),
            description: Some(format!("Chappe consumers of {queue}")),
            filter_subject: queue.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            // Unlimited on the server: the bus dead-letters after
            // `max_deliver` attempts itself, also when the last attempt's
            // consumer died (JetStream would keep such a job for ever).
            max_deliver: -1,
            backoff: self.config.nack_backoff.clone(),
            num_replicas: self.config.replicas,
            ..Default::default()
        };
        let mut retry = 0;
        loop {
            match self
                .jetstream
                .create_consumer_on_stream(config.clone(), &self.stream_name)
                .await
            {
                Ok(consumer) => return Ok(consumer),
                Err(e) if retry >= self.config.request_retries => {
                    return Err(Error::Transport(format!("consumer {name} on {queue}: {e}")));
                }
                Err(e) => {
                    retry += 1;
                    tracing::debug!(queue, consumer = name, retry, error = %e, "retrying");
                    self.retry_pause(retry).await;
                }
            }
        }
    }

    /// Publishes a job that used all its attempts on `<queue>.dead`, then
    /// terminates it; if the dead letter cannot be persisted, the job stays
    /// and comes back later.
    async fn dead_letter(
        &self,
        queue: &str,
        attempt: u32,
        message: &Message,
        acker: &NatsMessageAcker,
    ) -> Result<()> {
        tracing::error!(
            queue,
            attempt,
            "job exhausted its deliveries: dead-lettered"
        );
        let dead = format!("{queue}.dead");
        self.persist(&dead, &message.headers, message.payload.clone())
            .await?;
        acker
            .double_ack_with(AckKind::Term)
            .await
            .map_err(|e| Error::Transport(format!("terminating a job of {queue}: {e}")))
    }

    /// What happens to a job that was not acked: another attempt after
    /// `delay`, or the dead-letter queue after the last attempt.
    async fn retry_or_dead(
        &self,
        queue: &str,
        attempt: u32,
        message: &Message,
        acker: &NatsMessageAcker,
        delay: Duration,
    ) -> Result<()> {
        if attempt >= self.config.max_deliver {
            return self.dead_letter(queue, attempt, message, acker).await;
        }
        let delay = (!delay.is_zero()).then_some(delay);
        acker
            .double_ack_with(AckKind::Nak(delay))
            .await
            .map_err(|e| Error::Transport(format!("nack on {queue}: {e}")))
    }
}

struct NatsReplier {
    client: Client,
    reply: Option<async_nats::Subject>,
}

#[async_trait]
impl Replier for NatsReplier {
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<()> {
        // Without a reply subject, nobody waits for an answer.
        let Some(reply) = self.reply else {
            return Ok(());
        };
        self.client
            .publish(reply, payload)
            .await
            .map_err(|e| Error::Transport(format!("reply: {e}")))
    }
}

/// Settles one delivered job.
struct NatsAcker {
    inner: Arc<Inner>,
    queue: String,
    attempt: u32,
    /// `None` once settled.
    pending: Option<(NatsMessageAcker, Message)>,
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let Some((acker, _)) = self.pending.take() else {
            return Ok(());
        };
        acker
            .double_ack()
            .await
            .map_err(|e| Error::Transport(format!("ack on {}: {e}", self.queue)))
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        let Some((acker, message)) = self.pending.take() else {
            return Ok(());
        };
        self.inner
            .retry_or_dead(&self.queue, self.attempt, &message, &acker, delay)
            .await
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        let Some((acker, message)) = self.pending.take() else {
            return;
        };
        let (inner, queue, attempt) = (self.inner.clone(), self.queue.clone(), self.attempt);
        self.inner.clone().in_background(async move {
            if let Err(e) = inner
                .retry_or_dead(&queue, attempt, &message, &acker, Duration::ZERO)
                .await
            {
                tracing::warn!(%queue, error = %e, "dropped job not handed back: it returns after ack_wait");
            }
        });
    }
}

/// The state of one `consume` stream.
///
/// Jobs are pulled in batches the bus holds itself (a no-wait fetch of up
/// to `pull_batch`, or, when the queue is empty, a long poll for one), so
/// that a stream dropped — a consumer shutting down — hands back at once
/// the jobs it fetched and never handed out, instead of leaving them to
/// `ack_wait`.
struct Consuming {
    inner: Arc<Inner>,
    queue: String,
    consumer_name: String,
    consumer: Option<PullConsumer>,
    /// Fetched from JetStream, not yet handed out.
    fetched: VecDeque<jetstream::Message>,
    /// The connection `fetched` came on (see `reconnected`).
    fetched_on: u64,
    /// Changes when the connection is made again (a pull request waiting on
    /// a server that restarted is gone with it).
    reconnected: watch::Receiver<u64>,
    /// Consecutive failures, for the backoff.
    failures: u32,
}

impl Consuming {
    async fn next_job(&mut self) -> Job {
        loop {
            if *self.reconnected.borrow() != self.fetched_on {
                // Jobs fetched on a connection that is gone may belong to a
                // server that restarted: their acks could hang. Hand them
                // back (in vain if JetStream already took them back).
                self.hand_back();
            }
            if let Some(message) = self.fetched.pop_front() {
                if let Some(job) = self.job(message).await {
                    return job;
                }
                continue;
            }
            if self.failures > 0 {
                self.inner.retry_pause(self.failures).await;
            }
            match self.fill().await {
                Ok(()) => self.failures = 0,
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "cannot pull jobs: retrying");
                    // The consumer may be gone (a server that lost its
                    // store): make it again.
                    self.consumer = None;
                    self.failures = self.failures.saturating_add(1);
                }
            }
        }
    }

    /// Fetches the jobs waiting, up to `pull_batch`; when there are none,
    /// waits for one, up to `pull_expires`. May end with nothing fetched.
    async fn fill(&mut self) -> Result<()> {
        // Taken out for the pulls to borrow, put back after them (on an
        // error `next_job` makes it again).
        let consumer = match self.consumer.take() {
            Some(c) => c,
            None => {
                self.inner
                    .ensure_consumer(&self.consumer_name, &self.queue)
                    .await?
            }
        };
        let pulled = self.pull_from(&consumer).await;
        self.consumer = Some(consumer);
        pulled
    }

    /// `fill` with `consumer`.
    async fn pull_from(&mut self, consumer: &PullConsumer) -> Result<()> {
        let config = &self.inner.config;
        let (batch, api_timeout) = (config.pull_batch.max(1), config.api_timeout);
        let expires = config.pull_expires.max(Duration::from_secs(1));

        self.fetched_on = *self.reconnected.borrow_and_update();
        let waiting = consumer.fetch().max_messages(batch).messages();
        self.pull(waiting, api_timeout, Unfinished::HandBack)
            .await?;
        if !self.fetched.is_empty() {
            return Ok(());
        }
        self.fetched_on = *self.reconnected.borrow_and_update();
        let next = consumer.batch().max_messages(1).expires(expires).messages();
        // Dropped, this one is forgotten by the server with its inbox.
        self.pull(next, expires + api_timeout, Unfinished::Drop)
            .await
    }

    /// Runs one pull request to its end, moving its jobs into `fetched` as
    /// they come. A reconnection ends it early (the request may have been
    /// lost with the server it went to), and so does `limit`, as an error;
    /// `unfinished` says what becomes of jobs still coming then.
    async fn pull<E: std::fmt::Display>(
        &mut self,
        request: impl Future<Output = std::result::Result<pull::Batch, E>>,
        limit: Duration,
        unfinished: Unfinished,
    ) -> Result<()> {
        let Self {
            inner,
            queue,
            fetched,
            reconnected,
            ..
        } = self;
        let failed = |e: &dyn std::fmt::Display| Error::Transport(format!("pulling {queue}: {e}"));
        let collect = async {
            let mut pulling = Pulling {
                batch: Some(request.await.map_err(|e| failed(&e))?),
                unfinished,
                inner: inner.clone(),
                queue: queue.clone(),
            };
            while let Some(message) = pulling.next().await {
                fetched.push_back(message.map_err(|e| failed(&e))?);
            }
            Ok(())
        };
        tokio::select! {
            pulled = tokio::time::timeout(limit, collect) => {
                pulled.unwrap_or_else(|_| Err(failed(&format!("no answer in {limit:?}"))))
            }
            // (Without a sender, the connection is gone for good: no
            // reconnection will come.)
            Ok(()) = reconnected.changed() => Ok(()),
        }
    }

    /// A job from a delivered message, or `None` when it had used all its
    /// attempts (its last consumer died with it) and was dead-lettered.
    async fn job(&self, message: jetstream::Message) -> Option<Job> {
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let attempt = u32::try_from(delivered).unwrap_or(u32::MAX).max(1);
        let (message, acker) = message.split();
        let message = from_nats(message);
        if attempt > self.inner.config.max_deliver {
            if let Err(e) = self
                .inner
                .dead_letter(&self.queue, attempt, &message, &acker)
                .await
            {
                tracing::warn!(queue = %self.queue, error = %e, "dead letter failed: job kept");
            }
            return None;
        }
        let acker = NatsAcker {
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            attempt,
            pending: Some((acker, message.clone())),
        };
        Some(Job::new(message, attempt, Box::new(acker)))
    }
}

impl Drop for Consuming {
    fn drop(&mut self) {
        self.hand_back();
    }
}

impl Consuming {
    /// Hands back (NAKs) the jobs fetched and never handed out, for another
    /// consumer to take now, in the background (`NatsBus::close` waits).
    fn hand_back(&mut self) {
        if !self.fetched.is_empty() {
            let fetched = std::mem::take(&mut self.fetched);
            self.inner.hand_back(&self.queue, fetched.into(), None);
        }
    }
}

/// What becomes of the jobs a pull request still brings when it is dropped.
#[derive(Clone, Copy)]
enum Unfinished {
    /// They are read to the end of the pull and handed back (a no-wait
    /// fetch ends within a round trip).
    HandBack,
    /// The pull is dropped with its inbox, and the server forgets it.
    Drop,
}

/// One pull request being read.
struct Pulling {
    /// `None` once read to its end.
    batch: Option<pull::Batch>,
    unfinished: Unfinished,
    inner: Arc<Inner>,
    queue: String,
}

impl Pulling {
    async fn next(&mut self) -> Option<std::result::Result<jetstream::Message, async_nats::Error>> {
        let item = self.batch.as_mut()?.next().await;
        if item.is_none() {
            self.batch = None;
        }
        item
    }
}

impl Drop for Pulling {
    fn drop(&mut self) {
        if let (Some(rest), Unfinished::HandBack) = (self.batch.take(), self.unfinished) {
            self.inner.hand_back(&self.queue, Vec::new(), Some(rest));
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()> {
        validate_subject(subject, false)?;
        let client = &self.inner.client;
        let result = match to_nats_headers(&crate::traced(headers))? {
            Some(h) => {
                client
                    .publish_with_headers(subject.to_owned(), h, payload)
                    .await
            }
            None => client.publish(subject.to_owned(), payload).await,
        };
        result.map_err(|e| Error::Transport(format!("publish on {subject}: {e}")))
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription> {
        validate_subject(subject, true)?;
        let subscriber = self
            .inner
            .client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| Error::Transport(format!("subscribe to {subject}: {e}")))?;
        self.inner.confirm(subject).await;
        Ok(Box::pin(subscriber.map(from_nats)))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        validate_subject(subject, false)?;
        let headers = to_nats_headers(&headers)?;
        // `timeout` bounds the whole call, retries included: each attempt
        // gets an equal share of what is left, so a request taken by a
        // responder that then died is asked again of another in time.
        let deadline = tokio::time::Instant::now() + timeout;
        let attempts = self.inner.config.request_retries + 1;
        let mut retry = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() && retry > 0 {
                return Err(Error::Timeout {
                    subject: subject.to_owned(),
                    timeout,
                });
            }
            let share = left / (attempts - retry);
            let mut request = async_nats::Request::new()
                .payload(payload.clone())
                .timeout(Some(share));
            if let Some(h) = &headers {
                request = request.headers(h.clone());
            }
            let e = match self
                .inner
                .client
                .send_request(subject.to_owned(), request)
                .await
            {
                Ok(reply) => return Ok(from_nats(reply)),
                Err(e) => e,
            };
            let error = match e.kind() {
                RequestErrorKind::NoResponders => Error::NoResponders(subject.to_owned()),
                RequestErrorKind::TimedOut => Error::Timeout {
                    subject: subject.to_owned(),
                    timeout,
                },
                RequestErrorKind::Other => Error::Transport(format!("request on {subject}: {e}")),
                RequestErrorKind::InvalidSubject => {
                    return Err(Error::InvalidSubject(subject.to_owned()));
                }
                RequestErrorKind::MaxPayloadExceeded => {
                    return Err(Error::Transport(format!("request on {subject}: {e}")));
                }
            };
            if retry >= self.inner.config.request_retries {
                return Err(error);
            }
            retry += 1;
            tracing::debug!(subject, retry, error = %error, "request failed: retrying");
            self.inner.retry_pause(retry).await;
        }
    }

    async fn serve(&self, subject: &str, queue_group: &str) -> Result<Requests> {
        validate_subject(subject, false)?;
        let subscriber = self
            .inner
            .client
            .queue_subscribe(subject.to_owned(), queue_group.to_owned())
            .await
            .map_err(|e| Error::Transport(format!("serve {subject} in {queue_group}: {e}")))?;
        self.inner.confirm(subject).await;
        let client = self.inner.client.clone();
        Ok(Box::pin(subscriber.map(move |mut message| {
            let replier = NatsReplier {
                client: client.clone(),
                reply: message.reply.take(),
            };
            Request::new(from_nats(message), Box::new(replier))
        })))
    }

    async fn enqueue(&self, queue: &str, headers: Headers, payload: Bytes) -> Result<()> {
        self.inner.check_queue(queue)?;
        self.inner
            .persist(queue, &crate::traced(headers), payload)
            .await
    }

    async fn health(&self) -> Result<()> {
        match self.inner.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(Error::Transport(format!("NATS connection {state}"))),
        }
    }

    async fn queue_depth(&self, queue: &str, consumer_group: &str) -> Result<Option<u64>> {
        self.inner.check_queue(queue)?;
        let name = consumer_name(&self.inner, queue, consumer_group);
        let mut consumer: PullConsumer = self
            .inner
            .jetstream
            .get_consumer_from_stream(&name, &self.inner.stream_name)
            .await
            .map_err(|e| Error::Transport(format!("consumer {name} on {queue}: {e}")))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| Error::Transport(format!("consumer {name} on {queue}: {e}")))?;
        Ok(Some(info.num_pending + info.num_ack_pending as u64))
    }

    /// Waits until the jobs dropped or fetched by `consume` streams that are
    /// gone have been handed back, then until the server has everything
    /// published: what a process does last before it exits.
    async fn close(&self) {
        let inner = &self.inner;
        inner.background.close();
        let flushed = async {
            inner.background.wait().await;
            inner.client.flush().await
        };
        match tokio::time::timeout(inner.config.api_timeout, flushed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "NATS not flushed at close"),
            Err(_) => {
                tracing::warn!("jobs not all handed back at close: they return after ack_wait")
            }
        }
    }

    async fn consume(&self, queue: &str, consumer_group: &str) -> Result<Jobs> {
        self.inner.check_queue(queue)?;
        if consumer_group.is_empty() {
            return Err(Error::InvalidSubject(consumer_group.to_owned()));
        }
        let consumer_name = consumer_name(&self.inner, queue, consumer_group);
        // Made here, so that a refused consumer is an error of this call.
        let consumer = self.inner.ensure_consumer(&consumer_name, queue).await?;
        let state = Consuming {
            inner: self.inner.clone(),
            queue: queue.to_owned(),
            consumer_name,
            consumer: Some(consumer),
            fetched: VecDeque::new(),
            fetched_on: *self.inner.connections.borrow(),
            reconnected: self.inner.connections.clone(),
            failures: 0,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut state| async move {
                let job = state.next_job().await;
                Some((job, state))
            },
        )))
    }
}

/// The durable consumer of `group` on `queue` (checked by `check_queue`).
fn consumer_name(inner: &Inner, queue: &str, group: &str) -> String {
    format!(
        "{}__{}",
        name_token(group),
        name_token(&queue[inner.queue_prefix.len()..])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_backoff() {
        assert_eq!(name_token("chappe.x y>*"), "chappe_x_y__");
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(base, max, 1), base);
        assert_eq!(backoff(base, max, 3), Duration::from_millis(400));
        assert_eq!(backoff(base, max, 30), max);
    }

    #[test]
    fn headers_cross_both_ways() {
        let mut headers = Headers::new();
        headers.insert("traceparent".into(), "00-abc-01".into());
        headers.insert("Nats-Msg-Id".into(), "x".into());
        let map = to_nats_headers(&headers).unwrap().unwrap();
        let message = async_nats::Message {
            subject: "a.b".into(),
            reply: None,
            payload: Bytes::new(),
            headers: Some(map),
            status: None,
            description: None,
            length: 0,
        };
        assert_eq!(from_nats(message).headers, headers);
        assert!(to_nats_headers(&Headers::new()).unwrap().is_none());
        let bad = Headers::from([("a:b".to_owned(), "v".to_owned())]);
        assert!(matches!(to_nats_headers(&bad), Err(Error::Transport(_))));
    }
}
