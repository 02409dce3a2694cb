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
