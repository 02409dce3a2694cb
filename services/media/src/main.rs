//! `chappe-media`: media in a process of its own, talking over NATS.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chappe_bus::Subjects;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_media::{Media, MediaConfig, SystemClock};
use chappe_storage::select::open as open_store;
use chappe_telemetry::program::{EXIT_USAGE, ServiceArgs, ServiceTelemetry, announce, ports};
use clap::Parser;

/// Chappe media: encrypted attachment chunks, quotas and expiry.
#[derive(Debug, Parser)]
#[command(name = "chappe-media", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Largest upload, in bytes of ciphertext.
    #[arg(long, env = "CHAPPE_MEDIA_MAX_UPLOAD_BYTES", default_value_t = MediaConfig::default().max_upload_bytes)]
    max_upload_bytes: u64,
    /// Largest chunk, in bytes.
    #[arg(long, env = "CHAPPE_MEDIA_MAX_CHUNK_BYTES", default_value_t = MediaConfig::default().max_chunk_bytes)]
    max_chunk_bytes: u32,
    /// Most chunks of one upload.
    #[arg(long, env = "CHAPPE_MEDIA_MAX_CHUNKS", default_value_t = MediaConfig::default().max_chunks)]
    max_chunks: u32,
    /// Bytes one user may upload per quota window.
    #[arg(long, env = "CHAPPE_MEDIA_QUOTA_BYTES", default_value_t = MediaConfig::default().quota_bytes)]
    quota_bytes: u64,
    /// The rolling quota window, in seconds.
    #[arg(long, env = "CHAPPE_MEDIA_QUOTA_WINDOW_SECS", default_value_t = MediaConfig::default().quota_window.as_secs())]
    quota_window_secs: u64,
    /// How long media is kept after its upload began, in seconds.
    #[arg(long, env = "CHAPPE_MEDIA_RETENTION_SECS", default_value_t = MediaConfig::default().retention.as_secs())]
    retention_secs: u64,
    /// Seconds between two sweeps of expired media.
    #[arg(long, env = "CHAPPE_MEDIA_SWEEP_INTERVAL_SECS", default_value_t = MediaConfig::default().sweep_interval.as_secs())]
    sweep_interval_secs: u64,
    /// Expired objects deleted per store transaction.
    #[arg(long, env = "CHAPPE_MEDIA_SWEEP_BATCH", default_value_t = MediaConfig::default().sweep_batch)]
    sweep_batch: usize,
    /// Seconds a download right is remembered (0: ask fanout every time).
    #[arg(long, env = "CHAPPE_MEDIA_ACCESS_CACHE_TTL_SECS", default_value_t = MediaConfig::default().access_cache_ttl.as_secs())]
    access_cache_ttl_secs: u64,
    /// Most download rights remembered at once.
    #[arg(long, env = "CHAPPE_MEDIA_ACCESS_CACHE_CAPACITY", default_value_t = MediaConfig::default().access_cache_capacity)]
    access_cache_capacity: usize,
    /// Milliseconds media waits for fanout's membership answers.
    #[arg(long, env = "CHAPPE_MEDIA_FANOUT_TIMEOUT_MS", default_value_t = MediaConfig::default().fanout_timeout.as_millis() as u64)]
    fanout_timeout_ms: u64,
    /// Requests each method handles at once.
    #[arg(long, env = "CHAPPE_MEDIA_MAX_IN_FLIGHT", default_value_t = MediaConfig::default().max_in_flight)]
    max_in_flight: usize,
}

impl Args {
    fn config(&self) -> MediaConfig {
        MediaConfig {
            max_upload_bytes: self.max_upload_bytes,
            max_chunk_bytes: self.max_chunk_bytes,
            max_chunks: self.max_chunks,
            quota_bytes: self.quota_bytes,
            quota_window: Duration::from_secs(self.quota_window_secs),
            retention: Duration::from_secs(self.retention_secs),
            sweep_interval: Duration::from_secs(self.sweep_interval_secs),
            sweep_batch: self.sweep_batch,
            access_cache_ttl: Duration::from_secs(self.access_cache_ttl_secs),
            access_cache_capacity: self.access_cache_capacity,
            fanout_timeout: Duration::from_millis(self.fanout_timeout_ms),
            max_in_flight: self.max_in_flight,
        }
    }
}

fn main() -> ExitCode {
    chappe_telemetry::program::main(|a: &Args| (a.service.log_format, "warn,chappe=info"), run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config();
    if let Err(e) = config.validate() {
        // A configuration that cannot work is a usage error, found before
        // anything started.
        eprintln!("error: {e}");
        std::process::exit(i32::from(EXIT_USAGE));
    }
    let service = args.service;
    let store = open_store(&service.store).await?;
    let bus = NatsBus::connect(NatsConfig::for_service(&service, "chappe-media"))
        .await
        .context("connecting to NATS")?;
    let store: Arc<dyn chappe_storage::MediaRepo> =
        store.map(|s| Arc::new(s) as _, |s| Arc::new(s) as _);
    let bus: Arc<dyn chappe_bus::Bus> = Arc::new(bus);
    let telemetry = ServiceTelemetry::start(
        "chappe-media",
        service.metrics_listen(ports::MEDIA),
        service.otlp_endpoint.as_deref(),
        chappe_media::readiness(store.clone(), bus.clone()),
    )
    .await?;
    telemetry.announce("chappe-media");
    let media = Media::start(
        config,
        store,
        bus.clone(),
        Subjects::new(service.prefix),
        Arc::new(SystemClock),
    )
    .await
    .context("subscribing media's methods")?;
    announce("chappe-media ready");
    chappe_telemetry::shutdown_signal().await;
    media.stop().await;
    bus.close().await;
    telemetry.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_parse_into_the_default_config() {
        let args = Args::try_parse_from(["chappe-media"]).unwrap();
        assert_eq!(args.config(), MediaConfig::default());
        let args = Args::try_parse_from([
            "chappe-media",
            "--quota-bytes",
            "100",
            "--max-upload-bytes",
            "50",
            "--retention-secs",
            "60",
        ])
        .unwrap();
        let config = args.config();
        assert_eq!(config.quota_bytes, 100);
        assert_eq!(config.max_upload_bytes, 50);
        assert_eq!(config.retention, Duration::from_secs(60));
        config.validate().unwrap();
    }
}
