//! The in-process bus: the same semantics as NATS, inside one process.
//!
//! - publish/subscribe: at most once, to every matching subscription; a
//!   subscriber that falls `subscriber_capacity` messages behind loses the
//!   excess (as a NATS slow consumer does) and the loss is logged;
//! - request/reply: round robin over the servers of a subject;
//! - work queues: held in memory until acked; a nacked job comes back after
//!   its delay, a job dropped unsettled comes back at once, and after
//!   `max_deliver` attempts a job is published on `<queue>.dead` and removed.
//!
//! Nothing here survives the process, which is why the store, not the bus,
//! is the record (DESIGN.md invariant 3).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::{
    Acker, Bus, Error, Headers, Job, Jobs, Message, Replier, Request, Requests, Result,
    Subscription, subject_matches, validate_subject,
};

/// Limits of the in-process bus.
#[derive(Debug, Clone)]
pub struct MemoryBusConfig {
    /// Messages a subscription may fall behind before it loses some.
    pub subscriber_capacity: usize,
    /// Requests a server may have waiting before callers see back-pressure.
    pub server_capacity: usize,
    /// Deliveries of one job before it goes to `<queue>.dead`.
    pub max_deliver: u32,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        Self {
            subscriber_capacity: 65_536,
            server_capacity: 1_024,
            max_deliver: 10,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: MemoryBusConfig,
    next_id: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    observers: Vec<mpsc::UnboundedSender<Message>>,
    subscriptions: HashMap<u64, (String, mpsc::Sender<Message>)>,
    servers: HashMap<String, Vec<(u64, mpsc::Sender<Request>)>>,
    round_robin: HashMap<String, usize>,
    queues: HashMap<String, Arc<Queue>>,
}

struct Queue {
    tx: mpsc::UnboundedSender<(Message, u32)>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Message, u32)>>,
    /// Jobs enqueued and not yet acked or dead-lettered.
    pending: AtomicUsize,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new(MemoryBusConfig::default())
    }
}

impl MemoryBus {
    pub fn new(config: MemoryBusConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                next_id: AtomicU64::new(1),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// A copy of every message that crosses the bus from now on: publishes,
    /// requests, replies and enqueued jobs. For audits and tests (for
    /// example, that no plaintext ever travels between services).
    pub fn observe(&self) -> mpsc::UnboundedReceiver<Message> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.state().observers.push(tx);
        rx
    }

    /// Jobs in `queue` not yet acked (waiting or in hand).
    pub fn queue_depth(&self, queue: &str) -> usize {
        self.inner
            .state()
            .queues
            .get(queue)
            .map_or(0, |q| q.pending.load(Ordering::Relaxed))
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        self.state()
            .queues
            .entry(name.to_owned())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                Arc::new(Queue {
                    tx,
                    rx: tokio::sync::Mutex::new(rx),
                    pending: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    fn observed(&self, message: &Message) {
        let mut state = self.state();
        if !state.observers.is_empty() {
            state.observers.retain(|o| o.send(message.clone()).is_ok());
        }
    }

    fn publish(&self, message: Message) {
        self.observed(&message);
        let targets: Vec<mpsc::Sender<Message>> = self
            .state()
            .subscriptions
            .values()
            .filter(|(pattern, _)| subject_matches(pattern, &message.subject))
            .map(|(_, tx)| tx.clone())
            .collect();
        for tx in targets {
            if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(message.clone()) {
                tracing::warn!(subject = %m.subject, "slow subscriber: message dropped");
            }
        }
    }
}

/// A stream that runs `on_drop` when dropped (unsubscribe, stop serving).
struct Guarded<T> {
    rx: mpsc::Receiver<T>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> Stream for Guarded<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.rx.poll_recv(cx)
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

struct OneshotReplier(oneshot::Sender<Bytes>);

#[async_trait]
impl Replier for OneshotReplier {
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<()> {
        // The caller may have timed out and gone: that is not our error.
        let _ = self.0.send(payload);
        Ok(())
    }
}

struct MemoryAcker {
    bus: Weak<Inner>,
    queue: Arc<Queue>,
    queue_name: String,
    message: Option<Message>,
    attempt: u32,
}

impl MemoryAcker {
    fn settle(&mut self) -> Option<Message> {
        self.message.take()
    }

    fn redeliver(
        queue: Arc<Queue>,
        bus: Weak<Inner>,
        name: String,
        message: Message,
        attempt: u32,
    ) {
        let Some(bus) = bus.upgrade() else { return };
        if attempt >= bus.config.max_deliver {
            tracing::error!(queue = %name, attempt, "job exhausted its deliveries: dead-lettered");
            queue.pending.fetch_sub(1, Ordering::Relaxed);
            bus.publish(Message {
                subject: format!("{name}.dead"),
                ..message
            });
            return;
        }
        let _ = queue.tx.send((message, attempt));
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        if self.settle().is_some() {
            self.queue.pending.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        if let Some(message) = self.settle() {
            let (queue, bus, name, attempt) = (
                self.queue.clone(),
                self.bus.clone(),
                self.queue_name.clone(),
                self.attempt,
            );
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                Self::redeliver(queue, bus, name, message, attempt);
            });
        }
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if let Some(message) = self.settle() {
            Self::redeliver(
                self.queue.clone(),
                self.bus.clone(),
                self.queue_name.clone(),
                message,
                self.attempt,
            );
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()> {
        validate_subject(subject, false)?;
        self.inner.publish(Message {
            subject: subject.to_owned(),
            headers: crate::traced(headers),
            payload,
        });
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription> {
        validate_subject(subject, true)?;
        let (tx, rx) = mpsc::channel(self.inner.config.subscriber_capacity);
        let id = self.inner.id();
        self.inner
            .state()
            .subscriptions
            .insert(id, (subject.to_owned(), tx));
        let weak = Arc::downgrade(&self.inner);
        Ok(Box::pin(Guarded {
            rx,
            on_drop: Some(Box::new(move || {
                if let Some(inner) = weak.upgrade() {
                    inner.state().subscriptions.remove(&id);
                }
            })),
        }))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        validate_subject(subject, false)?;
        let server = {
            let mut state = self.inner.state();
            let servers = state.servers.get(subject).cloned().unwrap_or_default();
            if servers.is_empty() {
                return Err(Error::NoResponders(subject.to_owned()));
            }
            let turn = state.round_robin.entry(subject.to_owned()).or_default();
            *turn = turn.wrapping_add(1);
            servers[*turn % servers.len()].1.clone()
        };
        let (tx, rx) = oneshot::channel();
        let message = Message {
            subject: subject.to_owned(),
            headers,
            payload,
        };
        self.inner.observed(&message);
        let request = Request::new(message, Box::new(OneshotReplier(tx)));
        let timed_out = || Error::Timeout {
            subject: subject.to_owned(),
            timeout,
        };
        let exchange = async {
            server
                .send(request)
                .await
                .map_err(|_| Error::NoResponders(subject.to_owned()))?;
            // A server that drops the request without answering: no responder.
            rx.await
                .map_err(|_| Error::NoResponders(subject.to_owned()))
        };
        let payload = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timed_out())??;
        let reply = Message {
            subject: format!("{subject}.reply"),
            headers: Headers::new(),
            payload,
        };
        self.inner.observed(&reply);
        Ok(reply)
    }

    async fn serve(&self, subject: &str, _queue_group: &str) -> Result<Requests> {
        // One process holds one member per group; round robin covers
        // several servers of the same subject.
        validate_subject(subject, false)?;
        let (tx, rx) = mpsc::channel(self.inner.config.server_capacity);
        let id = self.inner.id();
        self.inner
            .state()
            .servers
            .entry(subject.to_owned())
            .or_default()
            .push((id, tx));
        let weak = Arc::downgrade(&self.inner);
        let subject = subject.to_owned();
        Ok(Box::pin(Guarded {
            rx,
            on_drop: Some(Box::new(move || {
                if let Some(inner) = weak.upgrade() {
                    let mut state = inner.state();
                    if let Some(list) = state.servers.get_mut(&subject) {
                        list.retain(|(i, _)| *i != id);
                        if list.is_empty() {
                            state.servers.remove(&subject);
                        }
                    }
                }
            })),
        }))
    }

    async fn enqueue(&self, queue: &str, headers: Headers, payload: Bytes) -> Result<()> {
        validate_subject(queue, false)?;
        let q = self.inner.queue(queue);
        let message = Message {
            subject: queue.to_owned(),
            headers: crate::traced(headers),
            payload,
        };
        self.inner.observed(&message);
        q.pending.fetch_add(1, Ordering::Relaxed);
        q.tx.send((message, 0)).map_err(|_| Error::Closed)
    }

    async fn queue_depth(&self, queue: &str, _consumer_group: &str) -> Result<Option<u64>> {
        Ok(Some(MemoryBus::queue_depth(self, queue) as u64))
    }

    async fn consume(&self, queue: &str, _consumer_group: &str) -> Result<Jobs> {
        validate_subject(queue, false)?;
        let q = self.inner.queue(queue);
        let bus = Arc::downgrade(&self.inner);
        let name = queue.to_owned();
        let stream = futures::stream::unfold((q, bus, name), |(q, bus, name)| async move {
            let (message, attempts) = q.rx.lock().await.recv().await?;
            let attempt = attempts + 1;
            let acker = MemoryAcker {
                bus: bus.clone(),
                queue: q.clone(),
                queue_name: name.clone(),
                message: Some(message.clone()),
                attempt,
            };
            Some((Job::new(message, attempt, Box::new(acker)), (q, bus, name)))
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn bus() -> MemoryBus {
        MemoryBus::new(MemoryBusConfig {
            max_deliver: 3,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn publish_reaches_matching_subscribers_until_they_drop() {
        let bus = bus();
        let mut exact = bus.subscribe("a.b").await.unwrap();
        let mut wild = bus.subscribe("a.*").await.unwrap();
        bus.publish("a.b", Headers::new(), Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(exact.next().await.unwrap().payload, "1");
        assert_eq!(wild.next().await.unwrap().payload, "1");
        drop(exact);
        assert_eq!(bus.inner.state().subscriptions.len(), 1);
        assert!(bus.subscribe("a.>.b").await.is_err());
    }

    #[tokio::test]
    async fn requests_round_robin_and_report_missing_servers() {
        let bus = bus();
        let err = bus
            .request(
                "svc.x",
                Headers::new(),
                Bytes::new(),
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoResponders(_)));

        for name in ["one", "two"] {
            let mut requests = bus.serve("svc.x", "svc").await.unwrap();
            tokio::spawn(async move {
                while let Some(r) = requests.next().await {
                    r.respond(Bytes::from(name)).await.unwrap();
                }
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let reply = bus
                .request(
                    "svc.x",
                    Headers::new(),
                    Bytes::new(),
                    Duration::from_secs(1),
                )
                .await
                .unwrap();
            seen.insert(reply.payload);
        }
        assert_eq!(seen.len(), 2);
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let bus = bus();
        let mut requests = bus.serve("svc.slow", "svc").await.unwrap();
        let held = tokio::spawn(async move {
            let r = requests.next().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(r);
        });
        let err = bus
            .request(
                "svc.slow",
                Headers::new(),
                Bytes::new(),
                Duration::from_millis(50),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }));
        held.abort();
    }

    #[tokio::test]
    async fn jobs_are_redelivered_until_acked_then_dead_lettered() {
        let bus = bus();
        let mut dead = bus.subscribe("q.work.dead").await.unwrap();
        let mut jobs = bus.consume("q.work", "g").await.unwrap();
        bus.enqueue("q.work", Headers::new(), Bytes::from_static(b"a"))
            .await
            .unwrap();
        bus.enqueue("q.work", Headers::new(), Bytes::from_static(b"b"))
            .await
            .unwrap();
        assert_eq!(bus.queue_depth("q.work"), 2);

        let a = jobs.next().await.unwrap();
        assert_eq!((a.message.payload.as_ref(), a.attempt), (&b"a"[..], 1));
        drop(a); // unsettled: comes back
        let b = jobs.next().await.unwrap();
        b.ack().await.unwrap();
        assert_eq!(bus.queue_depth("q.work"), 1);

        let a = jobs.next().await.unwrap();
        assert_eq!(a.attempt, 2);
        a.nack(Duration::from_millis(10)).await.unwrap();
        let a = jobs.next().await.unwrap();
        assert_eq!(a.attempt, 3);
        a.nack(Duration::ZERO).await.unwrap();
        assert_eq!(dead.next().await.unwrap().payload, "a");
        assert_eq!(bus.queue_depth("q.work"), 0);
    }
}
