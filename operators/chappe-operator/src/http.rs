//! The operator's operations server: `/metrics` (Prometheus text format),
//! `/healthz` (the process runs) and `/readyz` (it leads and reconciles).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// What the handlers read.
#[derive(Clone)]
pub struct OpsState {
    /// The metrics registry.
    pub registry: Arc<Registry>,
    /// True while this replica holds the leader Lease.
    pub leading: Arc<AtomicBool>,
}

/// The routes.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::encode(&state.registry),
    )
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    if state.leading.load(Ordering::Relaxed) {
        (StatusCode::OK, "leading\n")
    } else {
        // A standby replica is healthy but does not reconcile.
        (StatusCode::OK, "standby\n")
    }
}

/// Binds the operations server's address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
