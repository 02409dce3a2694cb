//! The operations HTTP server of a Chappe process:
//!
//! - `GET /metrics`: [`crate::metrics`] in the Prometheus text format, or in
//!   OpenMetrics when the scraper asks for `application/openmetrics-text`;
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 `ready` when every [`Health`] check passes within
//!   its timeout, else 503 with one line per failed check (readiness).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A readiness check: `Ok` when the dependency answers, else why not.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The readiness checks of a process (its bus connection, its store).
#[derive(Clone)]
pub struct Health {
    checks: Vec<(String, Check)>,
    timeout: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            checks: Vec::new(),
            timeout: DEFAULT_CHECK_TIMEOUT,
        }
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check named `name` (it names the failure in `/readyz`).
    pub fn check<F, Fut>(mut self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: Check = Arc::new(move || Box::pin(check()));
        self.checks.push((name.into(), check));
        self
    }

    /// How long each check may take (default [`DEFAULT_CHECK_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs every check at once; the failures, as `name: reason`.
    pub async fn failures(&self) -> Vec<String> {
        let runs = self.checks.iter().map(|(name, check)| async move {
            match tokio::time::timeout(self.timeout, check()).await {
                Ok(Ok(())) => None,
                Ok(Err(reason)) => Some(format!("{name}: {reason}")),
                Err(_) => Some(format!("{name}: no answer within {:?}", self.timeout)),
            }
        });
        futures::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// The operations server, bound and not yet serving.
pub struct OpsServer {
    listener: TcpListener,
    health: Health,
}

impl OpsServer {
    /// Binds `addr` (port 0 picks a free port: see [`OpsServer::local_addr`]).
    pub async fn bind(addr: SocketAddr, health: Health) -> Result<Self, BindError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        Ok(Self { listener, health })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(Arc::new(self.health));
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    }

    /// Serves in the background until [`RunningOpsServer::stop`].
    pub fn spawn(self) -> RunningOpsServer {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            let _ = stopped.await;
        }));
        RunningOpsServer { stop, task }
    }
}

/// Handle on a spawned [`OpsServer`].
pub struct RunningOpsServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl RunningOpsServer {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let m = crate::metrics::metrics();
    if openmetrics {
        (
            [(header::CONTENT_TYPE, OPENMETRICS)],
            m.encode_openmetrics(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            m.encode_prometheus(),
        )
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let failures = health.failures().await;
    if failures.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        let mut body = String::from("not ready\n");
        for f in failures {
            body.push_str(&f);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_names_what_fails_and_health_is_always_ok() {
        let health = Health::new()
            .check("bus", || async { Ok(()) })
            .check("store", || async { Err("locked".to_owned()) })
            .check("slow", || async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
            .with_timeout(Duration::from_millis(50));
        assert_eq!(
            health.failures().await,
            vec!["store: locked", "slow: no answer within 50ms"]
        );
        let server = OpsServer::bind("127.0.0.1:0".parse().unwrap(), health)
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let running = server.spawn();
        let (status, body) = get_raw(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("store: locked"), "{body}");
        assert_eq!(get_raw(addr, "/healthz").await.0, 200);
        let (status, body) = get_raw(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("# TYPE chappe_gateway_connected_devices gauge"),
            "{body}"
        );
        assert_eq!(get_raw(addr, "/nothing").await.0, 404);
        running.stop().await;
    }

    async fn get_raw(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }
}
