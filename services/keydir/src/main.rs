//! `chappe-keydir`: keydir in a process of its own, talking over NATS.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_keydir::KeydirConfig;
use chappe_storage::EmbeddedStore;
use chappe_telemetry::program::ServiceArgs;
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
    let store = EmbeddedStore::open(&args.store)
        .with_context(|| format!("opening the store {}", args.store.display()))?;
    let bus = NatsBus::connect(NatsConfig {
        urls: args.nats,
        prefix: args.prefix.clone(),
        connection_name: "chappe-keydir".into(),
        ..NatsConfig::default()
    })
    .await
    .context("connecting to NATS")?;
    let server = chappe_keydir::start(
        KeydirConfig::default(),
        Arc::new(store),
        Arc::new(bus),
        Subjects::new(args.prefix),
    )
    .await
    .context("subscribing keydir's methods")?;
    println!("chappe-keydir ready");
    chappe_telemetry::shutdown_signal().await;
    server.stop().await;
    Ok(())
}
