//! The conformance suite: the behaviour every [`Bus`] implementation must
//! show, so that `chappe up` (in-process) and a cluster (NATS) run the same
//! code paths the same way (DESIGN.md invariant 7).
//!
//! Each test is a public async function; [`run_all`] runs them all. Every
//! test uses its own random subjects and queues, so the suite can run again,
//! even concurrently, against one server. Failures panic, as tests do; the
//! suite lives in the library (and is always compiled) so that each
//! implementation's tests can call it. It adds to the unit tests of each
//! implementation; it replaces none.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chappe_proto::v1::{Ping, Pong};
use futures::{Stream, StreamExt};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::rpc::{self, Code, RpcError, Server};
use crate::{Bus, Error, Headers, Job, Message};

/// What the suite must know of the implementation under test.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The implementation's deliveries of one job before it is dead-lettered.
    pub max_deliver: u32,
    /// A subject prefix under which the implementation accepts queues (for
    /// NATS, `<prefix>.jobs`); the suite's queues are one token below it.
    pub queue_prefix: String,
    /// How long to wait for something that must happen.
    pub patience: Duration,
    /// How long to watch for something that must not happen.
    pub quiet: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_deliver: 10,
            queue_prefix: "chappe.jobs".to_owned(),
            patience: Duration::from_secs(10),
            quiet: Duration::from_millis(300),
        }
    }
}

/// Runs every test of the suite against `bus`, one after the other.
pub async fn run_all(bus: Arc<dyn Bus>, limits: Limits) {
    publish_reaches_matching_subscribers(&bus, &limits).await;
    headers_round_trip(&bus, &limits).await;
    dropping_a_subscription_unsubscribes(&bus, &limits).await;
    request_reply_round_trip(&bus, &limits).await;
    a_queue_group_serves_each_request_once(&bus, &limits).await;
    nobody_serving_is_no_responders(&bus, &limits).await;
    a_silent_server_is_a_timeout(&bus, &limits).await;
    rpc_round_trip_with_errors(&bus, &limits).await;
    jobs_are_consumed_and_ack_removes_them(&bus, &limits).await;
    a_job_dropped_unsettled_comes_back(&bus, &limits).await;
    a_nacked_job_comes_back_after_its_delay(&bus, &limits).await;
    a_job_is_dead_lettered_after_max_deliver(&bus, &limits).await;
    consumers_of_one_group_share_jobs(&bus, &limits).await;
}

// ------------------------------------------------------------ publish/subscribe

/// Exact subjects, `*` and `>` receive what matches them, in order, and
/// nothing else; bad subjects are refused.
pub async fn publish_reaches_matching_subscribers(bus: &Arc<dyn Bus>, limits: &Limits) {
    let root = format!("conf.{}", unique("pub"));
    let s = |tail: &str| format!("{root}.{tail}");
    let mut subscriptions = Vec::new();
    for pattern in ["a.b", "*.b", ">", "a.c", "a.*"] {
        subscriptions.push((pattern, ok(bus.subscribe(&s(pattern)).await, "subscribe")));
    }
    for (subject, payload) in [("a.b", "1"), ("a.c", "2"), ("a.b.c", "3")] {
        publish(bus, &s(subject), payload).await;
    }
    // Markers last: a subscription that got something it should not have
    // sees it before its markers.
    publish(bus, &s("a.b"), "end-b").await;
    publish(bus, &s("a.c"), "end-c").await;
    let expected = BTreeMap::from([
        ("a.b", vec!["1", "end-b"]),
        ("*.b", vec!["1", "end-b"]),
        (">", vec!["1", "2", "3", "end-b", "end-c"]),
        ("a.c", vec!["2", "end-c"]),
        ("a.*", vec!["1", "2", "end-b", "end-c"]),
    ]);
    for (pattern, subscription) in &mut subscriptions {
        let mut got = Vec::new();
        for _ in 0..expected[pattern].len() {
            let m = next(subscription, limits, &format!("a message on {pattern}")).await;
            got.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
        assert_eq!(got, expected[pattern], "received on {pattern}");
        nothing(subscription, limits, &format!("nothing more on {pattern}")).await;
    }
    assert!(matches!(
        bus.subscribe(&s("a.>.b")).await,
        Err(Error::InvalidSubject(_))
    ));
    assert!(matches!(
        bus.publish(&s("a.*"), Headers::new(), Bytes::new()).await,
        Err(Error::InvalidSubject(_))
    ));
}

/// Headers travel with published messages, requests and jobs.
pub async fn headers_round_trip(bus: &Arc<dyn Bus>, limits: &Limits) {
    let headers = sample_headers();
    let subject = format!("conf.{}", unique("hdr"));
    let mut subscription = ok(bus.subscribe(&subject).await, "subscribe");
    ok(
        bus.publish(&subject, headers.clone(), Bytes::from_static(b"h"))
            .await,
        "publish",
    );
    let m = next(&mut subscription, limits, "the message").await;
    assert_eq!(
        (m.subject.as_str(), &m.headers),
        (subject.as_str(), &headers)
    );

    let mut requests = ok(bus.serve(&subject, "conf").await, "serve");
    let server = tokio::spawn(async move {
        if let Some(r) = requests.next().await {
            let seen = format!("{:?}", r.message.headers);
            let _ = r.respond(Bytes::from(seen)).await;
        }
    });
    let reply = ok(
        bus.request(&subject, headers.clone(), Bytes::new(), limits.patience)
            .await,
        "request",
    );
    assert_eq!(reply.payload, format!("{headers:?}"));
    let _ = server.await;

    let queue = queue(limits);
    ok(
        bus.enqueue(&queue, headers.clone(), Bytes::from_static(b"j"))
            .await,
        "enqueue",
    );
    let mut jobs = ok(bus.consume(&queue, "conf").await, "consume");
    let job = next(&mut jobs, limits, "the job").await;
    assert_eq!(
        (job.message.subject.as_str(), &job.message.headers),
        (queue.as_str(), &headers)
    );
    ok(job.ack().await, "ack");
}

/// A dropped subscription, or a dropped server, no longer holds its subject.
pub async fn dropping_a_subscription_unsubscribes(bus: &Arc<dyn Bus>, limits: &Limits) {
    let subject = format!("conf.{}", unique("drop"));
    let subscription = ok(bus.subscribe(&subject).await, "subscribe");
    drop(subscription);
    // NATS counts a plain subscriber as a responder: a request proves it gone.
    expect_no_responders(bus, &subject, limits).await;

    let requests = ok(bus.serve(&subject, "conf").await, "serve");
    drop(requests);
    expect_no_responders(bus, &subject, limits).await;

    // The subject can be subscribed again, and only new messages arrive.
    let mut again = ok(bus.subscribe(&subject).await, "subscribe again");
    publish(bus, &subject, "new").await;
    assert_eq!(
        next(&mut again, limits, "the new message").await.payload,
        "new"
    );
}

// ------------------------------------------------------------ request/reply

/// A request reaches a server, and its reply comes back.
pub async fn request_reply_round_trip(bus: &Arc<dyn Bus>, limits: &Limits) {
    let subject = format!("conf.{}", unique("req"));
    let _servers = Tasks(vec![echo_server(bus, &subject, "conf", "only").await]);
    for i in 0..3 {
        let reply = ok(
            bus.request(
                &subject,
                Headers::new(),
                Bytes::from(format!("ping {i}")),
                limits.patience,
            )
            .await,
            "request",
        );
        assert_eq!(reply.payload, format!("only: ping {i}"));
    }
}

/// Two members of one queue group: each request is served by exactly one,
/// and both serve.
pub async fn a_queue_group_serves_each_request_once(bus: &Arc<dyn Bus>, limits: &Limits) {
    let subject = format!("conf.{}", unique("group"));
    let served = Arc::new(AtomicUsize::new(0));
    let mut tasks = Tasks(Vec::new());
    for name in ["one", "two"] {
        let mut requests = ok(bus.serve(&subject, "conf").await, "serve");
        let served = served.clone();
        tasks.0.push(tokio::spawn(async move {
            while let Some(r) = requests.next().await {
                served.fetch_add(1, Ordering::SeqCst);
                let _ = r.respond(Bytes::from(name)).await;
            }
        }));
    }
    let mut by = BTreeMap::<Bytes, usize>::new();
    let n = 24;
    for _ in 0..n {
        let reply = ok(
            bus.request(&subject, Headers::new(), Bytes::new(), limits.patience)
                .await,
            "request",
        );
        *by.entry(reply.payload).or_default() += 1;
    }
    tokio::time::sleep(limits.quiet).await;
    assert_eq!(served.load(Ordering::SeqCst), n, "each request served once");
    assert_eq!(by.len(), 2, "both members served: {by:?}");
}

/// A request nobody serves fails at once with `NoResponders`.
pub async fn nobody_serving_is_no_responders(bus: &Arc<dyn Bus>, limits: &Limits) {
    let subject = format!("conf.{}", unique("none"));
    expect_no_responders(bus, &subject, limits).await;
}

/// A server that never answers: the caller gets `Timeout`.
pub async fn a_silent_server_is_a_timeout(bus: &Arc<dyn Bus>, _limits: &Limits) {
    let subject = format!("conf.{}", unique("silent"));
    let mut requests = ok(bus.serve(&subject, "conf").await, "serve");
    let _server = Tasks(vec![tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(r) = requests.next().await {
            held.push(r);
        }
    })]);
    let timeout = Duration::from_millis(200);
    let err = bus
        .request(&subject, Headers::new(), Bytes::new(), timeout)
        .await;
    let err = refused(err, "a request to a silent server");
    match err {
        Error::Timeout {
            subject: s,
            timeout: t,
        } => assert_eq!((s, t), (subject, timeout)),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// Typed calls through [`rpc::Server`]: answers, and errors with their code
/// and `retry_after`; a stopped server leaves `UNAVAILABLE`.
pub async fn rpc_round_trip_with_errors(bus: &Arc<dyn Bus>, limits: &Limits) {
    let subject = format!("conf.{}", unique("rpc"));
    let server = ok(
        Server::new(bus.clone(), "conf", 4)
            .route(subject.clone(), |p: Ping| async move {
                match p.nonce {
                    0 => Err(RpcError::resource_exhausted(
                        "slow down",
                        Duration::from_millis(1500),
                    )),
                    1 => Err(RpcError::permission_denied("not a member")),
                    n => Ok(Pong { nonce: n + 1 }),
                }
            })
            .start()
            .await,
        "start the server",
    );
    let t = limits.patience;
    let pong: Pong = ok(
        rpc::call(&**bus, &subject, &Ping { nonce: 41 }, t).await,
        "call",
    );
    assert_eq!(pong.nonce, 42);
    let err = rpc::call::<_, Pong>(&**bus, &subject, &Ping { nonce: 0 }, t).await;
    let err = refused(err, "the call");
    assert_eq!(
        (err.code, err.message.as_str(), err.retry_after),
        (
            Code::ResourceExhausted,
            "slow down",
            Some(Duration::from_millis(1500))
        )
    );
    let err = rpc::call::<_, Pong>(&**bus, &subject, &Ping { nonce: 1 }, t).await;
    let err = refused(err, "the call");
    assert_eq!(
        (err.code, err.message.as_str(), err.retry_after),
        (Code::PermissionDenied, "not a member", None)
    );
    server.stop().await;
    let err = rpc::call::<_, Pong>(&**bus, &subject, &Ping { nonce: 5 }, t).await;
    let err = refused(err, "a call to a stopped server");
    assert_eq!(err.code, Code::Unavailable);
}

// ------------------------------------------------------------ work queues

/// Jobs enqueued before and after `consume` are delivered once each, on
/// their first attempt; acked, they are gone, also for a new consumer.
pub async fn jobs_are_consumed_and_ack_removes_them(bus: &Arc<dyn Bus>, limits: &Limits) {
    let queue = queue(limits);
    enqueue(bus, &queue, "before").await;
    let mut jobs = ok(bus.consume(&queue, "conf").await, "consume");
    enqueue(bus, &queue, "after-1").await;
    enqueue(bus, &queue, "after-2").await;
    let mut got = BTreeSet::new();
    for _ in 0..3 {
        let job = next(&mut jobs, limits, "a job").await;
        assert_eq!(job.attempt, 1);
        assert_eq!(job.message.subject, queue);
        got.insert(job.message.payload.clone());
        ok(job.ack().await, "ack");
    }
    assert_eq!(got, payloads(&["before", "after-1", "after-2"]));
    nothing(&mut jobs, limits, "no job after the acks").await;
    drop(jobs);
    let mut jobs = ok(bus.consume(&queue, "conf").await, "consume again");
    nothing(&mut jobs, limits, "no job for a new consumer").await;
}

/// A job dropped neither acked nor nacked comes back, one attempt further.
pub async fn a_job_dropped_unsettled_comes_back(bus: &Arc<dyn Bus>, limits: &Limits) {
    let queue = queue(limits);
    let mut jobs = ok(bus.consume(&queue, "conf").await, "consume");
    enqueue(bus, &queue, "dropped").await;
    let job = next(&mut jobs, limits, "the job").await;
    assert_eq!(
        (job.message.payload.as_ref(), job.attempt),
        (&b"dropped"[..], 1)
    );
    drop(job);
    let job = next(&mut jobs, limits, "the job again").await;
    assert_eq!(
        (job.message.payload.as_ref(), job.attempt),
        (&b"dropped"[..], 2)
    );
    ok(job.ack().await, "ack");
    nothing(&mut jobs, limits, "no job after the ack").await;
}

/// A nacked job comes back after its delay, not before.
pub async fn a_nacked_job_comes_back_after_its_delay(bus: &Arc<dyn Bus>, limits: &Limits) {
    let queue = queue(limits);
    let mut jobs = ok(bus.consume(&queue, "conf").await, "consume");
    enqueue(bus, &queue, "later").await;
    let job = next(&mut jobs, limits, "the job").await;
    let delay = Duration::from_millis(600);
    let nacked = Instant::now();
    ok(job.nack(delay).await, "nack");
    let job = next(&mut jobs, limits, "the job again").await;
    let waited = nacked.elapsed();
    // Timers of the implementation and of this test may differ by a tick.
    assert!(
        waited + Duration::from_millis(50) >= delay,
        "came back after {waited:?}, nacked for {delay:?}"
    );
    assert_eq!(
        (job.message.payload.as_ref(), job.attempt),
        (&b"later"[..], 2)
    );
    ok(job.ack().await, "ack");
}

/// After `max_deliver` unsuccessful attempts, a job goes to `<queue>.dead`
/// with its headers, and leaves the queue.
pub async fn a_job_is_dead_lettered_after_max_deliver(bus: &Arc<dyn Bus>, limits: &Limits) {
    let queue = queue(limits);
    let mut dead = ok(bus.subscribe(&format!("{queue}.dead")).await, "subscribe");
    let mut jobs = ok(bus.consume(&queue, "conf").await, "consume");
    ok(
        bus.enqueue(&queue, sample_headers(), Bytes::from_static(b"poison"))
            .await,
        "enqueue",
    );
    for attempt in 1..=limits.max_deliver {
        let job = next(&mut jobs, limits, "the job").await;
        assert_eq!(job.attempt, attempt);
        if attempt % 2 == 0 {
            drop(job);
        } else {
            ok(job.nack(Duration::ZERO).await, "nack");
        }
    }
    let letter = next(&mut dead, limits, "the dead letter").await;
    assert_eq!(
        (letter.subject, letter.headers, letter.payload),
        (
            format!("{queue}.dead"),
            sample_headers(),
            Bytes::from_static(b"poison")
        )
    );
    nothing(&mut jobs, limits, "no job after the dead letter").await;
}

/// Two consumers of one group: every job is done once, by one of them, and
/// both take part.
pub async fn consumers_of_one_group_share_jobs(bus: &Arc<dyn Bus>, limits: &Limits) {
    let queue = queue(limits);
    let (tx, done) = tokio::sync::mpsc::unbounded_channel();
    let mut done = UnboundedReceiverStream::new(done);
    let mut workers = Tasks(Vec::new());
    for worker in 0..2u8 {
        let mut jobs = ok(bus.consume(&queue, "conf").await, "consume");
        let tx = tx.clone();
        workers.0.push(tokio::spawn(async move {
            while let Some(job) = jobs.next().await {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let payload = job.message.payload.clone();
                if job.ack().await.is_ok() {
                    let _ = tx.send((worker, payload));
                }
            }
        }));
    }
    let n = 40;
    for i in 0..n {
        enqueue(bus, &queue, &format!("job-{i}")).await;
    }
    let mut by_worker = [0usize; 2];
    let mut got = BTreeSet::new();
    for _ in 0..n {
        let (worker, payload) = next(&mut done, limits, "a done job").await;
        by_worker[usize::from(worker)] += 1;
        assert!(got.insert(payload.clone()), "{payload:?} done twice");
    }
    nothing(&mut done, limits, "no job done twice").await;
    assert!(
        by_worker.iter().all(|&n| n > 0),
        "both consumers took jobs: {by_worker:?}"
    );
}

// ------------------------------------------------------------ helpers

/// Aborts its tasks when dropped (which drops their subscriptions).
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A token no other run of the suite uses.
fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{tag}{nanos:x}p{}n{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn queue(limits: &Limits) -> String {
    format!("{}.{}", limits.queue_prefix, unique("q"))
}

fn sample_headers() -> Headers {
    Headers::from([
        (
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        ),
        ("x-chappe-client-msg-id".to_owned(), "m-1".to_owned()),
    ])
}

fn payloads(items: &[&str]) -> BTreeSet<Bytes> {
    items
        .iter()
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .collect()
}

#[track_caller]
fn ok<T, E: Debug>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

#[track_caller]
fn refused<T: Debug, E>(result: Result<T, E>, what: &str) -> E {
    match result {
        Ok(v) => panic!("{what} should have failed, got {v:?}"),
        Err(e) => e,
    }
}

async fn publish(bus: &Arc<dyn Bus>, subject: &str, payload: &str) {
    ok(
        bus.publish(
            subject,
            Headers::new(),
            Bytes::copy_from_slice(payload.as_bytes()),
        )
        .await,
        "publish",
    );
}

async fn enqueue(bus: &Arc<dyn Bus>, queue: &str, payload: &str) {
    ok(
        bus.enqueue(
            queue,
            Headers::new(),
            Bytes::copy_from_slice(payload.as_bytes()),
        )
        .await,
        "enqueue",
    );
}

async fn expect_no_responders(bus: &Arc<dyn Bus>, subject: &str, limits: &Limits) {
    match bus
        .request(subject, Headers::new(), Bytes::new(), limits.patience)
        .await
    {
        Err(Error::NoResponders(s)) => assert_eq!(s, subject),
        other => panic!("expected no responders on {subject}, got {other:?}"),
    }
}

/// Serves `subject` in `group`, answering `<name>: <request payload>`.
async fn echo_server(bus: &Arc<dyn Bus>, subject: &str, group: &str, name: &str) -> JoinHandle<()> {
    let mut requests = ok(bus.serve(subject, group).await, "serve");
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            let answer = format!("{name}: {}", String::from_utf8_lossy(&r.message.payload));
            let _ = r.respond(Bytes::from(answer)).await;
        }
    })
}

/// The next item of a stream, within the patience.
async fn next<S: Stream + Unpin>(stream: &mut S, limits: &Limits, what: &str) -> S::Item {
    match tokio::time::timeout(limits.patience, stream.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("waiting for {what}: the stream ended"),
        Err(_) => panic!("waiting for {what}: nothing within {:?}", limits.patience),
    }
}

/// Fails if the stream yields anything within the quiet period.
async fn nothing<S: Stream + Unpin>(stream: &mut S, limits: &Limits, what: &str)
where
    S::Item: Describe,
{
    if let Ok(Some(item)) = tokio::time::timeout(limits.quiet, stream.next()).await {
        panic!("{what}: got {}", item.describe());
    }
}

/// An item shown in a failure.
trait Describe {
    fn describe(&self) -> String;
}

impl Describe for Message {
    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

impl Describe for Job {
    fn describe(&self) -> String {
        format!("job {:?} (attempt {})", self.message, self.attempt)
    }
}

impl<T: Debug> Describe for (u8, T) {
    fn describe(&self) -> String {
        format!("{self:?}")
    }
}
