//! `chappe-keydir`: keydir in a process of its own, talking over NATS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_keydir::KeydirConfig;
use chappe_storage::EmbeddedStore;
use chappe_telemetry::LogFormat;
use clap::Parser;

/// Chappe keydir: device keys, signed one-time keys and fallback keys.
#[derive(Debug, Parser)]
#[command(name = "chappe-keydir", version, about)]
struct Args {
    /// NATS servers (JetStream enabled), comma-separated.
    #[arg(
        long,
        env = "CHAPPE_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ','
    )]
    nats: Vec<String>,
    /// Prefix of every subject.
    #[arg(long, env = "CHAPPE_SUBJECT_PREFIX", default_value = "chappe")]
    prefix: String,
    /// The embedded store's database file.
    #[arg(long, env = "CHAPPE_STORE", default_value = "chappe-data/chappe.db")]
    store: PathBuf,
    /// Log format on stderr: text or json.
    #[arg(long, env = "CHAPPE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    chappe_telemetry::program::main(|a: &Args| (a.log_format, "warn,chappe=info"), run)
}

async fn run(args: Args) -> anyhow::Result<()> {
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
