//! The bus between Chappe's services (DESIGN.md §3).
//!
//! - [`Bus`]: the transport trait: request/reply with queue groups, core
//!   publish/subscribe, and a durable work queue with acknowledgements;
//! - [`memory::MemoryBus`]: the in-process implementation used by `chappe up`
//!   and the tests; the NATS implementation plugs in behind the same trait;
//! - [`nats::NatsBus`]: the NATS implementation (core NATS and JetStream);
//! - [`conformance`]: the behaviour every implementation must show, as a
//!   suite each implementation's tests run;
//! - [`rpc`]: typed protobuf calls and handlers on top of request/reply, with
//!   errors that carry a gRPC status code across the bus;
//! - [`subjects`]: every subject name, built from one configurable prefix.
//!
//! Callers only ever see this trait, never the transport behind it.

pub mod conformance;
pub mod memory;
pub mod nats;
pub mod rpc;
pub mod subjects;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use rpc::RpcError;
pub use subjects::Subjects;

/// Message headers (trace context, idempotency keys). NATS carries them as
/// message headers.
pub type Headers = BTreeMap<String, String>;

/// Result of a bus operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong on the bus itself (not in the handler at the other end:
/// that travels inside the reply, see [`rpc`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no service answers on {0}")]
    NoResponders(String),
    #[error("no answer on {subject} within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("invalid subject {0:?}")]
    InvalidSubject(String),
    #[error("the bus is closed")]
    Closed,
    #[error("bus transport: {0}")]
    Transport(String),
}

/// One message on the bus.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("subject", &self.subject)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A stream of messages from [`Bus::subscribe`]; dropping it unsubscribes.
pub type Subscription = Pin<Box<dyn Stream<Item = Message> + Send>>;

/// A stream of requests from [`Bus::serve`]; dropping it stops serving.
pub type Requests = Pin<Box<dyn Stream<Item = Request> + Send>>;

/// A stream of jobs from [`Bus::consume`]; dropping it stops consuming, and
/// jobs in hand that were neither acked nor nacked are redelivered.
pub type Jobs = Pin<Box<dyn Stream<Item = Job> + Send>>;

/// Sends the one reply to a request.
#[async_trait]
pub trait Replier: Send {
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<()>;
}

/// A request received by [`Bus::serve`].
pub struct Request {
    pub message: Message,
    replier: Box<dyn Replier>,
}

impl Request {
    pub fn new(message: Message, replier: Box<dyn Replier>) -> Self {
        Self { message, replier }
    }

    pub async fn respond(self, payload: Bytes) -> Result<()> {
        self.replier.respond(payload).await
    }
}

/// Settles a job: [`Job::ack`] removes it, [`Job::nack`] asks for a
/// redelivery later. An implementation redelivers a job that was dropped
/// without either.
#[async_trait]
pub trait Acker: Send {
    async fn ack(self: Box<Self>) -> Result<()>;
    async fn nack(self: Box<Self>, delay: Duration) -> Result<()>;
}

/// A unit of durable work taken from a queue.
pub struct Job {
    pub message: Message,
    /// 1 on first delivery.
    pub attempt: u32,
    acker: Box<dyn Acker>,
}

impl Job {
    pub fn new(message: Message, attempt: u32, acker: Box<dyn Acker>) -> Self {
        Self {
            message,
            attempt,
            acker,
        }
    }

    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    pub async fn nack(self, delay: Duration) -> Result<()> {
        self.acker.nack(delay).await
    }
}

/// The transport between services.
///
/// Subjects are dot-separated tokens; subscriptions accept NATS wildcards
/// (`*` for one token, `>` for the rest).
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Fire-and-forget to every current subscriber (at most once).
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()>;

    /// Receives what is published on `subject` from now on.
    async fn subscribe(&self, subject: &str) -> Result<Subscription>;

    /// Sends a request to one server of `subject` and waits for its reply.
    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message>;

    /// Serves requests on `subject`; each request goes to one member of
    /// `queue_group`.
    async fn serve(&self, subject: &str, queue_group: &str) -> Result<Requests>;

    /// Appends a job to the durable queue `queue`; returns once the queue
    /// holds it.
    async fn enqueue(&self, queue: &str, headers: Headers, payload: Bytes) -> Result<()>;

    /// Takes jobs from `queue`; consumers of one group share the work.
    async fn consume(&self, queue: &str, consumer_group: &str) -> Result<Jobs>;

    /// Whether the bus can carry messages now (for `/readyz`): `Err` says
    /// why not. The default says yes.
    async fn health(&self) -> Result<()> {
        Ok(())
    }

    /// Jobs of `queue` not yet done by `consumer_group` (waiting, or in
    /// hand and not yet acked), when the implementation can tell; `None`
    /// otherwise.
    async fn queue_depth(&self, _queue: &str, _consumer_group: &str) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Waits until what this process left to the bus has reached it (jobs
    /// handed back by dropped `consume` streams, publications in buffers):
    /// the last call of a process that stops. The default has nothing to
    /// wait for.
    async fn close(&self) {}
}

/// `jobs` until `token` is cancelled: then it is dropped at once (not when
/// the jobs in hand are done), so that its pull ends and the jobs it fetched
/// but did not hand out go back to the queue for other consumers.
pub fn until_cancelled(jobs: Jobs, token: tokio_util::sync::CancellationToken) -> Jobs {
    let mut jobs = Some(jobs);
    let mut cancelled = Box::pin(token.cancelled_owned());
    Box::pin(futures::stream::poll_fn(move |cx| {
        let Some(stream) = jobs.as_mut() else {
            return Poll::Ready(None);
        };
        if cancelled.as_mut().poll(cx).is_ready() {
            jobs = None;
            return Poll::Ready(None);
        }
        stream.as_mut().poll_next(cx)
    }))
}

/// `headers` with the current trace context added, unless they carry one:
/// what implementations send, so that a trace follows a message.
pub(crate) fn traced(mut headers: Headers) -> Headers {
    if !headers.contains_key(chappe_telemetry::otel::TRACE_HEADERS[0]) {
        chappe_telemetry::otel::inject(&mut headers);
    }
    headers
}

/// Checks a subject or a subscription pattern: non-empty tokens, wildcards
/// only where `pattern` allows them and `>` only last.
pub fn validate_subject(subject: &str, pattern: bool) -> Result<()> {
    let bad = || Error::InvalidSubject(subject.to_owned());
    if subject.is_empty() || subject.chars().any(|c| c.is_whitespace()) {
        return Err(bad());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let wildcard = *token == "*" || *token == ">";
        if token.is_empty()
            || (wildcard && !pattern)
            || (*token == ">" && i + 1 != tokens.len())
            || (!wildcard && (token.contains('*') || token.contains('>')))
        {
            return Err(bad());
        }
    }
    Ok(())
}

/// Whether `subject` matches the subscription `pattern`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("a.b.c", "a.b.c"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }

    #[test]
    fn subjects_are_validated() {
        assert!(validate_subject("chappe.rpc.fanout.submit", false).is_ok());
        assert!(validate_subject("chappe.deliver.u.*", false).is_err());
        assert!(validate_subject("chappe.deliver.u.*", true).is_ok());
        assert!(validate_subject("chappe.>.x", true).is_err());
        assert!(validate_subject("chappe..x", true).is_err());
        assert!(validate_subject("chappe.a b", true).is_err());
        assert!(validate_subject("", true).is_err());
    }
}
