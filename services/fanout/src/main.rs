//! `chappe-fanout`: fanout in a process of its own, talking over NATS.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_fanout::{Fanout, FanoutConfig};
use chappe_storage::select::open as open_store;
use chappe_telemetry::program::{ServiceArgs, ServiceTelemetry, announce, ports};
use clap::Parser;

/// Chappe fanout: conversations, messages, inboxes and their delivery.
#[derive(Debug, Parser)]
#[command(name = "chappe-fanout", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Largest message ciphertext, in bytes.
    #[arg(long, env = "CHAPPE_MAX_MESSAGE_BYTES", default_value_t = FanoutConfig::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Most members of a group.
    #[arg(long, env = "CHAPPE_MAX_GROUP_MEMBERS", default_value_t = FanoutConfig::default().max_group_members)]
    max_group_members: usize,
    /// Delivery workers (JetStream consumers) of this process.
    #[arg(long, env = "CHAPPE_DELIVERY_WORKERS", default_value_t = FanoutConfig::default().delivery_workers)]
    delivery_workers: usize,
    /// Jobs each delivery worker handles at once.
    #[arg(long, env = "CHAPPE_DELIVERY_JOBS_IN_FLIGHT", default_value_t = FanoutConfig::default().delivery_jobs_in_flight)]
    delivery_jobs_in_flight: usize,
    /// Milliseconds JetStream waits for a delivery job's ack before handing
    /// it to another worker: how long the jobs of a fanout that died stay
    /// stuck. Longer than a job ever takes.
    #[arg(long, env = "CHAPPE_JOB_ACK_WAIT_MS", default_value_t = NatsConfig::default().ack_wait.as_millis() as u64)]
    job_ack_wait_ms: u64,
}

fn main() -> ExitCode {
    chappe_telemetry::program::main(|a: &Args| (a.service.log_format, "warn,chappe=info"), run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let service = args.service;
    let config = FanoutConfig {
        max_message_bytes: args.max_message_bytes,
        max_group_members: args.max_group_members,
        delivery_workers: args.delivery_workers,
        delivery_jobs_in_flight: args.delivery_jobs_in_flight,
        ..FanoutConfig::default()
    };
    let store = open_store(&service.store).await?;
    let bus = NatsBus::connect(NatsConfig {
        ack_wait: std::time::Duration::from_millis(args.job_ack_wait_ms),
        ..NatsConfig::for_service(&service, "chappe-fanout")
    })
    .await
    .context("connecting to NATS")?;
    let store: Arc<dyn chappe_fanout::FanoutStore> =
        store.map(|s| Arc::new(s) as _, |s| Arc::new(s) as _);
    let bus: Arc<dyn chappe_bus::Bus> = Arc::new(bus);
    let telemetry = ServiceTelemetry::start(
        "chappe-fanout",
        service.metrics_listen(ports::FANOUT),
        service.otlp_endpoint.as_deref(),
        chappe_fanout::readiness(store.clone(), bus.clone()),
    )
    .await?;
    telemetry.announce("chappe-fanout");
    let fanout = Fanout::start(config, store, bus.clone(), Subjects::new(service.prefix))
        .await
        .context("starting fanout")?;
    announce("chappe-fanout ready");
    chappe_telemetry::shutdown_signal().await;
    // Requests and jobs in hand are finished; jobs fetched and not taken
    // are handed back for another fanout.
    fanout.stop().await;
    bus.close().await;
    telemetry.shutdown().await;
    Ok(())
}
