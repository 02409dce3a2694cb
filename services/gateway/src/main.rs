//! `chappe-gateway`: the client-facing gateway in a process of its own,
//! forwarding to the services over NATS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_gateway::{
    DevIdentityProvider, Gateway, GatewayConfig, IdentityProvider, NoIdentityProvider, SessionKeys,
};
use chappe_telemetry::program::{ServiceArgs, ServiceTelemetry, announce, ports};
use clap::Parser;

/// Chappe gateway: client gRPC, authentication, limits, the Connect stream.
#[derive(Debug, Parser)]
#[command(name = "chappe-gateway", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Address of the client-facing gRPC server.
    #[arg(long, env = "CHAPPE_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// The 32-byte secret that signs session tokens, the same file for every
    /// gateway of a deployment (`head -c 32 /dev/urandom > FILE`).
    #[arg(long, env = "CHAPPE_SESSION_KEY_FILE")]
    session_key_file: PathBuf,
    /// Accept development logins (any user name). Never where real users
    /// connect.
    #[arg(long, env = "CHAPPE_DEV_LOGIN")]
    dev_login: bool,
    /// Largest frame a client may send, in bytes.
    #[arg(long, env = "CHAPPE_MAX_FRAME_BYTES", default_value_t = GatewayConfig::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Messages per second a device may send, and the burst above it.
    #[arg(long, env = "CHAPPE_SEND_RATE", default_value_t = GatewayConfig::default().send_rate_per_second)]
    send_rate: u32,
    #[arg(long, env = "CHAPPE_SEND_BURST", default_value_t = GatewayConfig::default().send_burst)]
    send_burst: u32,
    /// Milliseconds a call to a service may take, its retries over the bus
    /// included; past it the client gets DEADLINE_EXCEEDED or UNAVAILABLE.
    #[arg(long, env = "CHAPPE_RPC_TIMEOUT_MS", default_value_t = GatewayConfig::default().rpc_timeout.as_millis() as u64)]
    rpc_timeout_ms: u64,
    /// Milliseconds between two presence heartbeats of a connected device
    /// (keep it well below the presence service's ttl).
    #[arg(long, env = "CHAPPE_PRESENCE_HEARTBEAT_MS", default_value_t = GatewayConfig::default().presence_heartbeat.as_millis() as u64)]
    presence_heartbeat_ms: u64,
    /// Largest frame of a media upload, in bytes.
    #[arg(long, env = "CHAPPE_MAX_MEDIA_FRAME_BYTES", default_value_t = GatewayConfig::default().max_media_frame_bytes)]
    max_media_frame_bytes: usize,
}

fn main() -> ExitCode {
    chappe_telemetry::program::main(|a: &Args| (a.service.log_format, "warn,chappe=info"), run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = GatewayConfig {
        listen: args.listen,
        max_frame_bytes: args.max_frame_bytes,
        send_rate_per_second: args.send_rate,
        send_burst: args.send_burst,
        rpc_timeout: std::time::Duration::from_millis(args.rpc_timeout_ms),
        presence_heartbeat: std::time::Duration::from_millis(args.presence_heartbeat_ms.max(1)),
        max_media_frame_bytes: args.max_media_frame_bytes,
        ..GatewayConfig::default()
    };
    let keys = SessionKeys::load(&args.session_key_file).with_context(|| {
        format!(
            "reading the session key {}",
            args.session_key_file.display()
        )
    })?;
    let identity: Arc<dyn IdentityProvider> = if args.dev_login {
        Arc::new(DevIdentityProvider)
    } else {
        Arc::new(NoIdentityProvider)
    };
    let bus = NatsBus::connect(NatsConfig::for_service(&args.service, "chappe-gateway"))
        .await
        .context("connecting to NATS")?;
    let bus: Arc<dyn chappe_bus::Bus> = Arc::new(bus);
    let telemetry = ServiceTelemetry::start(
        "chappe-gateway",
        args.service.metrics_listen(ports::GATEWAY),
        args.service.otlp_endpoint.as_deref(),
        chappe_gateway::readiness(bus.clone()),
    )
    .await?;
    telemetry.announce("chappe-gateway");
    let gateway = Gateway::bind(
        config,
        bus.clone(),
        Subjects::new(args.service.prefix.clone()),
        Arc::new(keys),
        identity,
    )
    .await?;
    announce(&format!(
        "chappe-gateway ready on http://{}",
        gateway.local_addr()?
    ));
    let served = gateway.run(chappe_telemetry::shutdown_signal()).await;
    bus.close().await;
    telemetry.shutdown().await;
    served?;
    Ok(())
}
