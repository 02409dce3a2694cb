//! The NATS bus across server faults: a restart in the middle of traffic,
//! and a kill (as a crash or a power loss) with jobs in the queue.
//!
//! Nothing the bus acknowledged may be lost: JetStream persisted every job
//! before `enqueue` returned (`sync_interval: always` in the test server),
//! subscriptions and servers come back by themselves, and requests retry.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::{Bus, Headers, Jobs};
use chappe_testkit::NatsServer;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// Long enough for a restart, a reconnection and an `ack_wait`.
const PATIENCE: Duration = Duration::from_secs(30);

fn config(server: &NatsServer, name: &str) -> NatsConfig {
    NatsConfig {
        connection_name: name.to_owned(),
        // Enough retries to cover a restart.
        request_retries: 10,
        retry_backoff: Duration::from_millis(100),
        retry_backoff_max: Duration::from_secs(1),
        // A job in flight when the server went away comes back soon.
        ack_wait: Duration::from_secs(3),
        reconnect_delay_max: Duration::from_millis(500),
        ..NatsConfig::with_url(server.url())
    }
}

async fn connect(server: &NatsServer, name: &str) -> Arc<dyn Bus> {
    Arc::new(NatsBus::connect(config(server, name)).await.unwrap())
}

async fn enqueue_all(bus: &Arc<dyn Bus>, queue: &str, prefix: &str, n: usize) -> BTreeSet<String> {
    let mut sent = BTreeSet::new();
    for i in 0..n {
        let payload = format!("{prefix}-{i}");
        bus.enqueue(queue, Headers::new(), Bytes::from(payload.clone()))
            .await
            .unwrap();
        sent.insert(payload);
    }
    sent
}

/// Reports the payload of every job of `jobs`, then acks it. (A job whose
/// ack failed was still done: the ack may have reached the server.)
fn worker(mut jobs: Jobs) -> (mpsc::UnboundedReceiver<String>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(job) = jobs.next().await {
            let payload = String::from_utf8_lossy(&job.message.payload).into_owned();
            let _ = tx.send(payload.clone());
            if let Err(e) = job.ack().await {
                eprintln!("ack of {payload} failed: {e}");
            }
        }
    });
    (rx, task)
}

/// Waits until every payload of `expected` was done (duplicates allowed:
/// consumers are idempotent); returns how many duplicates were seen.
async fn all_done(
    done: &mut mpsc::UnboundedReceiver<String>,
    mut seen: BTreeSet<String>,
    expected: &BTreeSet<String>,
) -> usize {
    let mut duplicates = 0;
    let deadline = Instant::now() + PATIENCE;
    while !expected.is_subset(&seen) {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            done.recv(),
        )
        .await
        {
            Ok(Some(payload)) => {
                if !seen.insert(payload) {
                    duplicates += 1;
                }
            }
            _ => panic!(
                "jobs lost: {:?}",
                expected.difference(&seen).collect::<Vec<_>>()
            ),
        }
    }
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_traffic_loses_nothing() {
    let mut server = NatsServer::start();
    // Two services: one publishes, requests and enqueues; the other
    // subscribes, serves and consumes.
    let front = connect(&server, "front").await;
    let back = connect(&server, "back").await;

    let mut events = back.subscribe("fault.evt.>").await.unwrap();
    let mut requests = back.serve("fault.rpc.echo", "fault").await.unwrap();
    let _echo = tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            let payload = r.message.payload.clone();
            let _ = r.respond(payload).await;
        }
    });
    let queue = "chappe.jobs.restart";
    let (mut done, _worker) = worker(back.consume(queue, "fault").await.unwrap());

    // Before: everything works.
    front
        .publish("fault.evt.a", Headers::new(), Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert_eq!(events.next().await.unwrap().payload, "before");
    let t = Duration::from_secs(2);
    let reply = front
        .request(
            "fault.rpc.echo",
            Headers::new(),
            Bytes::from_static(b"1"),
            t,
        )
        .await
        .unwrap();
    assert_eq!(reply.payload, "1");
    let mut expected = enqueue_all(&front, queue, "before", 20).await;
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        seen.insert(done.recv().await.unwrap());
    }

    tokio::task::block_in_place(|| server.restart());

    // Jobs enqueued right after the restart (enqueue retries).
    expected.extend(enqueue_all(&front, queue, "after", 20).await);

    // The request succeeds again, the retries covering the reconnection.
    let reply = front
        .request(
            "fault.rpc.echo",
            Headers::new(),
            Bytes::from_static(b"2"),
            t,
        )
        .await
        .unwrap();
    assert_eq!(reply.payload, "2");

    // The subscriber receives again: publish until one arrives (publishes
    // are at most once, so those made while reconnecting may be lost).
    let deadline = Instant::now() + PATIENCE;
    loop {
        front
            .publish("fault.evt.b", Headers::new(), Bytes::from_static(b"after"))
            .await
            .unwrap();
        if let Ok(Some(m)) = timeout(Duration::from_millis(200), events.next()).await
            && m.payload == "after"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber receives nothing after the restart"
        );
    }

    // Every job, from before and after the restart, on the same consume stream.
    let duplicates = all_done(&mut done, seen, &expected).await;
    eprintln!("{} jobs done, {duplicates} duplicates", expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_keeps_every_acknowledged_job() {
    let mut server = NatsServer::start();
    let bus = connect(&server, "killed").await;
    let queue = "chappe.jobs.killed";
    let (mut done, _worker) = worker(bus.consume(queue, "fault").await.unwrap());
    let expected = enqueue_all(&bus, queue, "job", 100).await;
    // Some are done, some in flight, most waiting, when the server dies.
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        seen.insert(done.recv().await.unwrap());
    }

    tokio::task::block_in_place(|| {
        server.kill();
        server.restart();
    });

    let duplicates = all_done(&mut done, seen, &expected).await;
    eprintln!("{} jobs done, {duplicates} duplicates", expected.len());

    // A job enqueued after the crash, by another connection, is delivered
    // too (late redeliveries of jobs in flight at the kill may come first).
    let late = connect(&server, "late").await;
    late.enqueue(queue, Headers::new(), Bytes::from_static(b"new"))
        .await
        .unwrap();
    let new = BTreeSet::from(["new".to_owned()]);
    all_done(&mut done, BTreeSet::new(), &new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_dies_on_the_last_attempt_still_dead_letters() {
    let server = NatsServer::start();
    let bus: Arc<dyn Bus> = Arc::new(
        NatsBus::connect(NatsConfig {
            max_deliver: 2,
            ack_wait: Duration::from_secs(1),
            ..config(&server, "dies")
        })
        .await
        .unwrap(),
    );
    let queue = "chappe.jobs.dies";
    let mut dead = bus.subscribe(&format!("{queue}.dead")).await.unwrap();
    let mut jobs = bus.consume(queue, "fault").await.unwrap();
    bus.enqueue(queue, Headers::new(), Bytes::from_static(b"poison"))
        .await
        .unwrap();
    let job = jobs.next().await.unwrap();
    assert_eq!(job.attempt, 1);
    job.nack(Duration::ZERO).await.unwrap();
    let job = jobs.next().await.unwrap();
    assert_eq!(job.attempt, 2);
    // The process dies with the job in hand: no ack, no nack, no drop.
    std::mem::forget(job);
    // Its successor keeps consuming.
    let (successor, handed_out) = tokio::sync::oneshot::channel();
    let _successor = tokio::spawn(async move {
        if let Some(job) = jobs.next().await {
            let _ = successor.send(job.attempt);
        }
    });

    // JetStream delivers it a third time after ack_wait; the bus, not the
    // handler, sees that it used its attempts.
    let letter = timeout(PATIENCE, dead.next()).await.unwrap().unwrap();
    assert_eq!(letter.payload, "poison");
    let more = timeout(Duration::from_secs(2), handed_out).await;
    assert!(more.is_err(), "the dead job was handed out again: {more:?}");
}
