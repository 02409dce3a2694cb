//! `chappe-presence`: presence in a process of its own, over NATS, its
//! records in a JetStream key-value bucket.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_presence::{KvPresenceStore, Presence, PresenceConfig};
use chappe_storage::select::open as open_store;
use chappe_telemetry::program::{ServiceArgs, ServiceTelemetry, announce, ports};
use clap::Parser;

/// Chappe presence: online / away / offline and last-seen per user, typing.
#[derive(Debug, Parser)]
#[command(name = "chappe-presence", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Milliseconds a device counts as connected after its last heartbeat; a
    /// user whose gateway died falls offline within it.
    #[arg(long, env = "CHAPPE_PRESENCE_TTL_MS", default_value_t = 60_000)]
    ttl_ms: u64,
    /// Milliseconds without activity after which a connected user is away.
    #[arg(long, env = "CHAPPE_PRESENCE_AWAY_AFTER_MS", default_value_t = 300_000)]
    away_after_ms: u64,
    /// Milliseconds between two sweeps for users whose devices expired.
    #[arg(long, env = "CHAPPE_PRESENCE_SWEEP_MS", default_value_t = 5_000)]
    sweep_ms: u64,
    /// Users one query may ask about.
    #[arg(long, env = "CHAPPE_PRESENCE_MAX_QUERY_USERS", default_value_t = 500)]
    max_query_users: usize,
    /// The key-value bucket of presence records.
    #[arg(long, env = "CHAPPE_PRESENCE_BUCKET", default_value = KvPresenceStore::DEFAULT_BUCKET)]
    bucket: String,
}

fn main() -> ExitCode {
    chappe_telemetry::program::main(|a: &Args| (a.service.log_format, "warn,chappe=info"), run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let defaults = PresenceConfig::default();
    let ttl = Duration::from_millis(args.ttl_ms);
    let config = PresenceConfig {
        ttl,
        away_after: Duration::from_millis(args.away_after_ms),
        // Gateways heartbeat on their own setting; this one only checks
        // that the ttl leaves room for a few.
        heartbeat_interval: defaults.heartbeat_interval.min(ttl / 3),
        sweep_interval: Duration::from_millis(args.sweep_ms),
        max_query_users: args.max_query_users,
        ..defaults
    };
    config.validate().context("presence settings")?;
    let service = args.service;
    let settings: Arc<dyn chappe_storage::PresenceSettingsRepo> = open_store(&service.store)
        .await?
        .map(|s| Arc::new(s) as _, |s| Arc::new(s) as _);
    let nats = NatsBus::connect(NatsConfig::for_service(&service, "chappe-presence"))
        .await
        .context("connecting to NATS")?;
    let store = KvPresenceStore::open(&nats, &args.bucket, config.record_ttl())
        .await
        .context("opening the presence bucket")?;
    let bus: Arc<dyn chappe_bus::Bus> = Arc::new(nats);
    let telemetry = ServiceTelemetry::start(
        "chappe-presence",
        service.metrics_listen(ports::PRESENCE),
        service.otlp_endpoint.as_deref(),
        chappe_presence::readiness(bus.clone()),
    )
    .await?;
    telemetry.announce("chappe-presence");
    let presence = Presence::start(
        config,
        Arc::new(store),
        settings,
        bus.clone(),
        Subjects::new(service.prefix),
    )
    .await
    .context("subscribing presence's methods")?;
    announce("chappe-presence ready");
    chappe_telemetry::shutdown_signal().await;
    presence.stop().await;
    bus.close().await;
    telemetry.shutdown().await;
    Ok(())
}
