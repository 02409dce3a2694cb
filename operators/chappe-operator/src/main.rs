//! `chappe-operator`: reconciles ChappePlatforms while it holds the leader
//! Lease, and serves `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use chappe_operator::http::{OpsState, bind, serve};
use chappe_operator::leader::LeaderElection;
use chappe_operator::metrics::Metrics;
use chappe_operator::reconcile;
use clap::Parser;
use kube::runtime::events::Reporter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Chappe operator: runs ChappePlatforms across regions.
#[derive(Debug, Parser)]
#[command(name = "chappe-operator", version, about)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "CHAPPE_OPERATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    metrics_listen: SocketAddr,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "chappe-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "CHAPPE_OPERATOR_LEASE", default_value = "chappe-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "CHAPPE_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Log format: text or json.
    #[arg(long, env = "CHAPPE_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let mut registry = Registry::default();
    let metrics = Metrics::default().register(&mut registry);
    let leading = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let ops = OpsState {
        registry: Arc::new(registry),
        leading: leading.clone(),
    };
    let listener = bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    let server = tokio::spawn(serve(listener, ops, stopped(stop_rx.clone())));
    tracing::info!(addr = %args.metrics_listen, "metrics on /metrics, health on /healthz");

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "chappe-operator".into());
    let lease_duration = Duration::from_secs(args.lease_seconds.max(3));
    let election = LeaderElection::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        lease_duration,
    );
    tokio::select! {
        _ = election.acquire(lease_duration / 3) => {},
        _ = shutdown_signal() => {
            let _ = stop_tx.send(true);
            let _ = server.await;
            return Ok(());
        }
    }
    leading.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "leading: reconciling ChappePlatforms");

    // Stop on SIGTERM, or when the Lease is lost (another replica may
    // already reconcile: exit and let Kubernetes restart this one).
    let lost = Arc::new(AtomicBool::new(false));
    {
        let stop_tx = stop_tx.clone();
        let lost = lost.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = election.hold(lease_duration / 3) => {
                    tracing::error!("lost the leader Lease");
                    lost.store(true, Ordering::Relaxed);
                },
                _ = shutdown_signal() => {},
            }
            let _ = stop_tx.send(true);
        });
    }
    let reporter = Reporter {
        controller: "chappe-operator".into(),
        instance: Some(identity),
    };
    reconcile::run(client, reporter, metrics, stopped(stop_rx)).await;
    let _ = server.await;
    if lost.load(Ordering::Relaxed) {
        anyhow::bail!("lost the leader Lease");
    }
    Ok(())
}
