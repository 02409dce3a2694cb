//! `chappe-media` as a process of its own: it serves over a real
//! nats-server, stops cleanly on SIGTERM, and refuses a configuration that
//! cannot work with exit code 64.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::rpc::{self, Code};
use chappe_bus::subjects::MediaMethod;
use chappe_proto::internal::MediaStatus;
use chappe_proto::v1::{DeviceRef, MediaInfo};
use chappe_testkit::{NatsServer, ServiceProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_nats_and_stops_on_sigterm() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (service, ready) = ServiceProcess::start(
        Command::new(env!("CARGO_BIN_EXE_chappe-media"))
            .env("CHAPPE_NATS_URL", nats.url())
            .env("CHAPPE_STORE", dir.path().join("chappe.db"))
            .env("CHAPPE_METRICS_LISTEN", "127.0.0.1:0"),
    );
    assert_eq!(ready.as_str(), "chappe-media ready");
    assert!(
        service
            .line_with("chappe-media metrics on http://")
            .is_some()
    );

    let bus = Arc::new(
        NatsBus::connect(NatsConfig::with_url(nats.url()))
            .await
            .unwrap(),
    );
    let request = MediaStatus {
        actor: Some(DeviceRef {
            user_id: "alice".into(),
            device_id: "laptop".into(),
        }),
        media_id: "0123456789abcdef0123456789abcdef".into(),
    };
    let subject = Subjects::default().media(MediaMethod::Status);
    let answer = rpc::call::<_, MediaInfo>(&*bus, &subject, &request, Duration::from_secs(5)).await;
    match answer {
        Err(e) => assert_eq!(e.code, Code::NotFound, "{e:?}"),
        Ok(info) => panic!("an unknown media was found: {info:?}"),
    }

    let status = service.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_configuration_that_cannot_work_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_chappe-media"))
        .env("CHAPPE_STORE", dir.path().join("chappe.db"))
        .env("CHAPPE_MEDIA_QUOTA_BYTES", "1000")
        .env("CHAPPE_MEDIA_MAX_UPLOAD_BYTES", "2000")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_upload_bytes"), "{stderr}");
    let output = Command::new(env!("CARGO_BIN_EXE_chappe-media"))
        .arg("--sweep-interval-secs")
        .arg("soon")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
}
