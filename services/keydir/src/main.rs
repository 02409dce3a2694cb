//! `chappe-keydir`: keydir in a process of its own, talking over NATS.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_keydir::KeydirConfig;
use chappe_storage::select::open as open_store;
use chappe_telemetry::program::{ServiceArgs, ServiceTelemetry, announce, ports};
use clap::Parser;

/// Chappe keydir: device keys, signed one-time keys and fallback keys.
#[derive(Debug, Parser)]
#[command(name = "chappe-keydir", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    chappe_telemetry::program::main(|a: &Args| (a.service.log_format, "warn,chappe=info"), run)
}

async fn run(Args { service: args }: Args) -> anyhow::Result<()> {
    let store = open_store(&args.store).await?;
    let bus = NatsBus::connect(NatsConfig::for_service(&args, "chappe-keydir"))
        .await
        .context("connecting to NATS")?;
    let store: Arc<dyn chappe_storage::KeyRepo> =
        store.map(|s| Arc::new(s) as _, |s| Arc::new(s) as _);
    let bus: Arc<dyn chappe_bus::Bus> = Arc::new(bus);
    let telemetry = ServiceTelemetry::start(
        "chappe-keydir",
        args.metrics_listen(ports::KEYDIR),
        args.otlp_endpoint.as_deref(),
        chappe_keydir::readiness(store.clone(), bus.clone()),
    )
    .await?;
    telemetry.announce("chappe-keydir");
    let server = chappe_keydir::start(
        KeydirConfig::default(),
        store,
        bus.clone(),
        Subjects::new(args.prefix),
    )
    .await
    .context("subscribing keydir's methods")?;
    announce("chappe-keydir ready");
    chappe_telemetry::shutdown_signal().await;
    server.stop().await;
    bus.close().await;
    telemetry.shutdown().await;
    Ok(())
}
