//! `chappe-gateway` as a process of its own over a real nats-server: it
//! logs a device in (development logins on), answers a forwarded call with
//! the precise status of a missing service, and drains on SIGTERM.

use std::process::Command;

use chappe_proto::v1::auth_client::AuthClient;
use chappe_proto::v1::gateway_client::GatewayClient;
use chappe_proto::v1::{DevCredential, ListConversationsRequest, LoginRequest, login_request};
use chappe_testkit::{NatsServer, ServiceProcess};
use tonic::Code;
use tonic::metadata::MetadataValue;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_forwards_and_drains() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("session.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let (service, ready) = ServiceProcess::start(
        Command::new(env!("CARGO_BIN_EXE_chappe-gateway"))
            .args(["--listen", "127.0.0.1:0", "--dev-login"])
            .env("CHAPPE_NATS_URL", nats.url())
            .env("CHAPPE_SESSION_KEY_FILE", &key),
    );
    let url = ready
        .trim()
        .strip_prefix("chappe-gateway ready on ")
        .expect("the ready line names the address")
        .to_owned();

    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = AuthClient::new(channel.clone())
        .login(LoginRequest {
            device_id: "laptop".into(),
            credential: Some(login_request::Credential::Dev(DevCredential {
                user_id: "alice".into(),
            })),
        })
        .await
        .expect("development login")
        .into_inner()
        .session_token;
    let bearer: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut gateway = GatewayClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    // No fanout runs: the gateway says so precisely, and keeps serving.
    let status = gateway
        .list_conversations(ListConversationsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let status = service.terminate();
    assert!(status.success(), "{status:?}");
}
