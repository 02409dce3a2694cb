//! `chappe-fanout` as a process of its own: it serves over a real
//! nats-server, queues delivery jobs on JetStream, and stops on SIGTERM.

use std::process::Command;
use std::time::Duration;

use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::subjects::FanoutMethod;
use chappe_bus::{Subjects, rpc};
use chappe_proto::internal::{CreateConversation, ListConversations};
use chappe_proto::v1::{
    ConversationKind, CreateConversationRequest, CreateConversationResponse, DeviceRef,
    ListConversationsRequest, ListConversationsResponse,
};
use chappe_testkit::{NatsServer, ServiceProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_nats_and_stops_on_sigterm() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (service, ready) = ServiceProcess::start(
        Command::new(env!("CARGO_BIN_EXE_chappe-fanout"))
            .env("CHAPPE_NATS_URL", nats.url())
            .env("CHAPPE_STORE", dir.path().join("chappe.db")),
    );
    assert_eq!(ready.as_str(), "chappe-fanout ready");

    let bus = NatsBus::connect(NatsConfig::with_url(nats.url()))
        .await
        .unwrap();
    let subjects = Subjects::default();
    let alice = Some(DeviceRef {
        user_id: "alice".into(),
        device_id: "laptop".into(),
    });
    let t = Duration::from_secs(5);
    let created: CreateConversationResponse = rpc::call(
        &bus,
        &subjects.fanout(FanoutMethod::CreateConversation),
        &CreateConversation {
            actor: alice.clone(),
            request: Some(CreateConversationRequest {
                kind: ConversationKind::Direct as i32,
                member_user_ids: vec!["bob".into()],
            }),
        },
        t,
    )
    .await
    .expect("fanout answers over NATS");
    let listed: ListConversationsResponse = rpc::call(
        &bus,
        &subjects.fanout(FanoutMethod::ListConversations),
        &ListConversations {
            actor: alice,
            request: Some(ListConversationsRequest {}),
        },
        t,
    )
    .await
    .unwrap();
    assert_eq!(listed.conversations, vec![created.conversation.unwrap()]);

    let status = service.terminate();
    assert!(status.success(), "{status:?}");
}

/// SIGTERM with a backlog of delivery jobs: fanout finishes the job in hand
/// and hands back the jobs it had fetched, so that none waits for
/// `ack_wait` (two minutes here) before another fanout can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_leaves_no_delivery_job_stranded() {
    use async_nats::jetstream::consumer::PullConsumer;
    use bytes::Bytes;
    use chappe_bus::Bus;
    use chappe_bus::subjects::DELIVERY_GROUP;
    use chappe_proto::internal::DeliverJob;
    use futures::StreamExt as _;
    use prost::Message as _;

    const JOBS: u64 = 2_000;
    let nats = NatsServer::start();
    let bus = NatsBus::connect(NatsConfig::with_url(nats.url()))
        .await
        .unwrap();
    let subjects = Subjects::default();
    // Jobs of messages no store holds: fanout drops each (acks it) after
    // looking for its message.
    for i in 0..JOBS {
        let job = DeliverJob {
            conversation_id: format!("unknown-{i}"),
            message_id: format!("unknown-{i}"),
        };
        bus.enqueue(
            &subjects.jobs_deliver(),
            Default::default(),
            Bytes::from(job.encode_to_vec()),
        )
        .await
        .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let (service, ready) = ServiceProcess::start(
        Command::new(env!("CARGO_BIN_EXE_chappe-fanout"))
            .env("CHAPPE_NATS_URL", nats.url())
            .env("CHAPPE_STORE", dir.path().join("chappe.db"))
            .env("RUST_LOG", "error,chappe_fanout::delivery=off")
            .env("CHAPPE_JOB_ACK_WAIT_MS", "120000")
            .env("CHAPPE_DELIVERY_WORKERS", "2")
            .env("CHAPPE_DELIVERY_JOBS_IN_FLIGHT", "1"),
    );
    assert_eq!(ready.as_str(), "chappe-fanout ready");
    let consumer_name = format!("{DELIVERY_GROUP}__deliver");
    let mut consumer: PullConsumer = bus
        .jetstream()
        .get_consumer_from_stream(&consumer_name, bus.jobs_stream())
        .await
        .unwrap();
    // Stop it in the middle of the backlog.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = consumer.info().await.unwrap();
        if info.ack_floor.consumer_sequence >= 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no job taken: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = tokio::task::block_in_place(|| service.terminate());
    assert!(status.success(), "{status:?}");

    // What fanout did is gone from the work queue; what it did not do must
    // come to the next consumer now, not after ack_wait.
    let mut stream = bus.jetstream().get_stream(bus.jobs_stream()).await.unwrap();
    let remaining = stream.info().await.unwrap().state.messages;
    assert!(
        remaining > 0 && remaining < JOBS,
        "{remaining} of {JOBS} jobs left: no backlog at the SIGTERM"
    );
    let mut jobs = bus
        .consume(&subjects.jobs_deliver(), DELIVERY_GROUP)
        .await
        .unwrap();
    let mut taken = std::collections::BTreeSet::new();
    while (taken.len() as u64) < remaining {
        let job = tokio::time::timeout(Duration::from_secs(10), jobs.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {remaining} jobs came back; the rest are stranded until ack_wait",
                    taken.len()
                )
            })
            .unwrap();
        assert!(taken.insert(job.message.payload.clone()), "a job twice");
        job.ack().await.unwrap();
    }
}
