//! The operations server.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http::{OpsState, bind, serve};
use crate::metrics::Metrics;

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn serves_metrics_and_health() {
    let mut registry = Registry::default();
    let metrics = Metrics::default().register(&mut registry);
    drop(metrics.count_and_measure());
    let listener = bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = OpsState {
        registry: Arc::new(registry),
        leading: Arc::new(AtomicBool::new(true)),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    let health = get(addr, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
        "{health}"
    );
    let text = get(addr, "/metrics").await;
    assert!(
        text.contains("chappe_operator_reconciliations_total 1"),
        "{text}"
    );
    assert!(
        text.contains("chappe_operator_reconcile_duration_seconds_count 1"),
        "{text}"
    );
    assert!(get(addr, "/readyz").await.ends_with("leading\n"));
    stop.send(()).expect("stop");
    server.await.expect("join").expect("serve");
}
