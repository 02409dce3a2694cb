//! What the NATS bus sets up in JetStream, checked on a real nats-server:
//! the jobs stream, the consumers, the limits of queues, key-value buckets.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use bytes::Bytes;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::{Bus, Error, Headers};
use chappe_testkit::NatsServer;

#[tokio::test]
async fn the_jobs_stream_and_its_consumers() {
    let server = NatsServer::start();
    let config = NatsConfig {
        ack_wait: Duration::from_secs(7),
        ..NatsConfig::with_url(server.url())
    };
    let bus = NatsBus::connect(config.clone()).await.unwrap();
    // Creating the stream again is harmless.
    let again = NatsBus::connect(config).await.unwrap();
    assert_eq!(bus.jobs_stream(), "CHAPPE_JOBS");

    let mut stream = bus.jetstream().get_stream("CHAPPE_JOBS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.subjects, ["chappe.jobs.>"]);
    assert_eq!(info.config.retention, RetentionPolicy::WorkQueue);
    assert_eq!(info.config.storage, StorageType::File);

    let _jobs = bus
        .consume("chappe.jobs.deliver", "fanout-delivery")
        .await
        .unwrap();
    let consumer: PullConsumer = stream
        .get_consumer("fanout-delivery__deliver")
        .await
        .unwrap();
    let c = &consumer.cached_info().config;
    assert_eq!(c.durable_name.as_deref(), Some("fanout-delivery__deliver"));
    assert_eq!(c.filter_subject, "chappe.jobs.deliver");
    assert_eq!(c.ack_policy, AckPolicy::Explicit);
    assert_eq!(c.ack_wait, Duration::from_secs(7));
    assert_eq!(c.max_deliver, -1, "the bus dead-letters by itself");

    // The same group again (another worker) shares the consumer...
    let _worker = again
        .consume("chappe.jobs.deliver", "fanout-delivery")
        .await
        .unwrap();
    // ...but a work queue has one group.
    let other = again.consume("chappe.jobs.deliver", "other-group").await;
    assert!(
        matches!(other, Err(Error::Transport(_))),
        "{:?}",
        other.err()
    );
}

#[tokio::test]
async fn queues_live_under_the_jobs_prefix() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(NatsConfig {
        prefix: "region.paris".to_owned(),
        ..NatsConfig::with_url(server.url())
    })
    .await
    .unwrap();
    assert_eq!(bus.jobs_stream(), "REGION_PARIS_JOBS");
    bus.enqueue("region.paris.jobs.x", Headers::new(), Bytes::new())
        .await
        .unwrap();
    for queue in ["chappe.jobs.x", "region.paris.jobsx", "region.paris.jobs.*"] {
        let err = bus.enqueue(queue, Headers::new(), Bytes::new()).await;
        assert!(matches!(err, Err(Error::InvalidSubject(_))), "{queue}");
        let err = bus.consume(queue, "g").await.err();
        assert!(matches!(err, Some(Error::InvalidSubject(_))), "{queue}");
    }
}

#[tokio::test]
async fn key_value_buckets_are_created_or_opened() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(NatsConfig::with_url(server.url()))
        .await
        .unwrap();
    let ttl = Duration::from_secs(90);
    let kv = bus.key_value("presence", ttl).await.unwrap();
    kv.put("alice", Bytes::from_static(b"online"))
        .await
        .unwrap();
    let reopened = bus.key_value("presence", ttl).await.unwrap();
    assert_eq!(
        reopened.get("alice").await.unwrap(),
        Some(Bytes::from_static(b"online"))
    );
    let status = reopened.status().await.unwrap();
    assert_eq!((status.max_age(), status.history()), (ttl, 1));
    assert!(matches!(
        bus.key_value("not a bucket", ttl).await,
        Err(Error::Transport(_))
    ));
}

/// A consumer that stops (a fanout shutting down) hands back at once the
/// jobs it had fetched and not handed out: another consumer gets them long
/// before `ack_wait` would bring them back.
#[tokio::test]
async fn a_stopped_consumer_hands_back_what_it_fetched_at_once() {
    use futures::StreamExt;
    use std::collections::BTreeSet;

    const JOBS: usize = 20;
    let server = NatsServer::start();
    let config = NatsConfig {
        ack_wait: Duration::from_secs(120),
        pull_batch: 8,
        ..NatsConfig::with_url(server.url())
    };
    let leaving = NatsBus::connect(config.clone()).await.unwrap();
    let staying = NatsBus::connect(config).await.unwrap();
    let queue = "chappe.jobs.deliver";
    for i in 0..JOBS {
        leaving
            .enqueue(queue, Headers::new(), Bytes::from(format!("job {i}")))
            .await
            .unwrap();
    }
    let mut jobs = leaving.consume(queue, "fanout-delivery").await.unwrap();
    let first = jobs.next().await.unwrap();
    let first_payload = first.message.payload.clone();
    first.ack().await.unwrap();
    // One handed out and settled; up to seven more fetched with it.
    drop(jobs);
    leaving.close().await;

    let started = std::time::Instant::now();
    let mut jobs = staying.consume(queue, "fanout-delivery").await.unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < JOBS - 1 {
        let job = tokio::time::timeout(Duration::from_secs(10), jobs.next())
            .await
            .expect("the fetched jobs came back before ack_wait")
            .unwrap();
        assert_ne!(job.message.payload, first_payload, "an acked job came back");
        assert!(
            seen.insert(job.message.payload.clone()),
            "{:?} twice",
            job.message.payload
        );
        job.ack().await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
