//! `chappe-keydir` as a process of its own: it serves over a real
//! nats-server, and stops cleanly on SIGTERM.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::subjects::KeydirMethod;
use chappe_bus::{Subjects, rpc};
use chappe_proto::internal::QueryDevices;
use chappe_proto::v1::{DeviceRef, QueryDevicesRequest, QueryDevicesResponse};
use chappe_testkit::{NatsServer, ServiceProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_nats_and_stops_on_sigterm() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (service, ready) = ServiceProcess::start(
        Command::new(env!("CARGO_BIN_EXE_chappe-keydir"))
            .env("CHAPPE_NATS_URL", nats.url())
            .env("CHAPPE_STORE", dir.path().join("chappe.db")),
    );
    assert_eq!(ready.as_str(), "chappe-keydir ready");

    let bus = Arc::new(
        NatsBus::connect(NatsConfig::with_url(nats.url()))
            .await
            .unwrap(),
    );
    let request = QueryDevices {
        actor: Some(DeviceRef {
            user_id: "alice".into(),
            device_id: "laptop".into(),
        }),
        request: Some(QueryDevicesRequest {
            user_ids: vec!["bob".into()],
        }),
    };
    let subject = Subjects::default().keydir(KeydirMethod::QueryDevices);
    let answer: QueryDevicesResponse = rpc::call(&*bus, &subject, &request, Duration::from_secs(5))
        .await
        .expect("keydir answers over NATS");
    assert!(answer.devices.is_empty());

    let status = service.terminate();
    assert!(status.success(), "{status:?}");
}
