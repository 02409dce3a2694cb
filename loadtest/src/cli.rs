//! The `chappe-loadtest` command line.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, Result, bail};
use chappe_cli::platform::{Platform, PlatformConfig};
use clap::{Parser, Subcommand};

use crate::config::RunArgs;
use crate::engine::Engine;
use crate::measure::Metric;
use crate::report::{self, Report};

/// Measures a Chappe deployment with real end-to-end-encrypted clients.
#[derive(Debug, Parser)]
#[command(name = "chappe-loadtest", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a scenario and report.
    Run(Box<RunArgs>),
    /// One worker of `run --processes N` (started by the coordinator).
    #[command(hide = true)]
    Worker {
        /// The run's settings, as JSON written by the coordinator.
        #[arg(long)]
        spec: PathBuf,
        /// Where to write this worker's partial report.
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge workers' reports exactly (several processes or machines).
    Merge {
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Print two reports side by side, with ratios.
    Compare { a: PathBuf, b: PathBuf },
    /// Render a JSON report as HTML.
    Html {
        report: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Raw NATS rates between two processes, next to the same operations
    /// through Chappe's bus layer (the bus's own limit).
    Nats(Box<crate::nats_bench::NatsBenchArgs>),
    /// The other process of `nats` (started by it).
    #[command(hide = true)]
    NatsPeer(crate::nats_bench::NatsPeerArgs),
    /// Upload and download MiB/s of one encrypted file through a gateway,
    /// and the RSS growth of the processes on its way.
    Media(Box<crate::media_bench::MediaBenchArgs>),
    /// Presence updates/s handled by a running chappe-presence over NATS,
    /// next to raw NATS request/reply with as many callers.
    Presence(Box<crate::presence_bench::PresenceBenchArgs>),
    /// Stored messages/s and store latency, the CQL store next to the
    /// embedded one in the same run, and CQL requests per sent message
    /// and per sync.
    Store(Box<crate::store_bench::StoreBenchArgs>),
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let report = run_load(*args.clone()).await?;
            write_outputs(&report, args.out.as_deref(), args.html.as_deref())?;
            if args.out.as_deref() != Some(Path::new("-")) {
                print_summary(&report);
            }
            Ok(())
        }
        Command::Worker { spec, out } => {
            let args: RunArgs = serde_json::from_slice(&std::fs::read(&spec)?)
                .with_context(|| format!("reading {}", spec.display()))?;
            let url = args.target.clone().context("a worker needs a target")?;
            let report = Engine::new(args, url)?.run().await?;
            std::fs::write(&out, report.to_json_pretty()?)?;
            Ok(())
        }
        Command::Merge { parts, out, html } => {
            let reports = parts
                .iter()
                .map(|p| read_report(p))
                .collect::<Result<Vec<_>>>()?;
            let merged = report::merge(reports)?;
            write_outputs(&merged, out.as_deref(), html.as_deref())?;
            print_summary(&merged);
            Ok(())
        }
        Command::Compare { a, b } => {
            print!(
                "{}",
                crate::compare::compare(&read_report(&a)?, &read_report(&b)?)
            );
            Ok(())
        }
        Command::Html { report, out } => {
            std::fs::write(&out, crate::html::render(&read_report(&report)?))?;
            Ok(())
        }
        Command::Nats(args) => crate::nats_bench::run(*args).await,
        Command::NatsPeer(args) => crate::nats_bench::peer(args).await,
        Command::Media(args) => crate::media_bench::run(*args).await,
        Command::Presence(args) => crate::presence_bench::run(*args).await,
        Command::Store(args) => crate::store_bench::run(*args).await,
    }
}

fn read_report(path: &Path) -> Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Report::from_json(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Writes the JSON report (`-` is standard output) and the HTML report.
fn write_outputs(report: &Report, out: Option<&Path>, html: Option<&Path>) -> Result<()> {
    if out == Some(Path::new("-")) {
        println!("{}", report.to_json_pretty()?);
    } else if let Some(out) = out {
        std::fs::write(out, report.to_json_pretty()?)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report: {}", out.display());
    }
    if let Some(html) = html {
        std::fs::write(html, crate::html::render(report))
            .with_context(|| format!("writing {}", html.display()))?;
        eprintln!("html report: {}", html.display());
    }
    Ok(())
}

/// The platform `--embedded` starts: limits opened wide, since the point is
/// to find the platform's own limits, not the per-device abuse limits.
pub async fn embedded_platform(dir: &Path) -> Result<Platform> {
    let mut config = PlatformConfig::new(dir.join("data"));
    config.gateway.listen = "127.0.0.1:0".parse()?;
    config.gateway.send_rate_per_second = 1_000_000;
    config.gateway.send_burst = 1_000_000;
    config.gateway.call_rate_per_second = 1_000_000;
    config.gateway.call_burst = 1_000_000;
    config.gateway.outbound_queue = 65_536;
    Ok(Platform::start(config).await?)
}

/// Runs a load test as `run` does and returns the (merged) report.
pub async fn run_load(mut args: RunArgs) -> Result<Report> {
    args.validate().map_err(anyhow::Error::msg)?;
    let temp = tempfile::tempdir()?;
    let platform = if args.embedded {
        let platform = embedded_platform(temp.path()).await?;
        args.target = Some(platform.gateway_url());
        if args.server_pid.is_none() {
            args.server_pid = Some(std::process::id());
        }
        Some(platform)
    } else {
        None
    };
    let url = args
        .target
        .clone()
        .context("say which platform to load: --target URL or --embedded")?;
    let report = if args.processes > 1 {
        run_workers(&args, temp.path()).await?
    } else {
        Engine::new(args.clone(), url)?.run().await?
    };
    if let Some(platform) = platform {
        platform.shutdown().await?;
    }
    Ok(report)
}

/// Starts `processes` workers of this binary and merges their reports.
async fn run_workers(args: &RunArgs, dir: &Path) -> Result<Report> {
    let exe = match &args.worker_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()?,
    };
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
    let mut children = Vec::new();
    for index in 0..args.processes {
        let mut spec = args.clone();
        spec.processes = 1;
        spec.embedded = false;
        spec.worker_index = index;
        spec.worker_count = args.processes;
        spec.run_id = Some(run_id.clone());
        spec.quiet = true;
        spec.out = None;
        spec.html = None;
        let spec_path = dir.join(format!("worker-{index}.json"));
        std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
        let out = dir.join(format!("part-{index}.json"));
        let child = tokio::process::Command::new(&exe)
            .arg("worker")
            .arg("--spec")
            .arg(&spec_path)
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        children.push((child, out));
    }
    let mut parts = Vec::new();
    for (mut child, out) in children {
        let status = child.wait().await?;
        if !status.success() {
            bail!("a worker failed ({status})");
        }
        parts.push(read_report(&out)?);
    }
    Ok(report::merge(parts)?)
}

fn ms(d: Option<u64>) -> String {
    d.map_or("-".into(), |us| format!("{:.2} ms", us as f64 / 1000.0))
}

fn print_summary(report: &Report) {
    let c = &report.counts;
    println!(
        "{} / {:?} / {:?}: {} devices",
        report.meta.scenario, report.meta.load.mode, report.meta.crypto, report.meta.devices
    );
    println!(
        "sent {}  stored {}  delivered {} of {}  errors {}  dropped {}  late {}",
        c.sent,
        c.stored,
        c.delivered,
        c.expected_deliveries,
        c.errors_by_status.values().sum::<u64>(),
        c.dropped,
        c.late
    );
    for metric in [
        Metric::SendToStored,
        Metric::SendToDelivered,
        Metric::Connect,
        Metric::Sync,
        Metric::SessionSetup,
    ] {
        if let Some(s) = report.summary(metric) {
            println!(
                "{metric:?}: p50 {}  p99 {}  p99.9 {}  max {}  (n={})",
                ms(Some(s.p50_us)),
                ms(Some(s.p99_us)),
                ms(Some(s.p99_9_us)),
                ms(Some(s.max_us)),
                s.count
            );
        }
    }
    println!(
        "throughput: sent {:.0}/s  stored {:.0}/s  delivered {:.0}/s",
        report.throughput.sent_per_s,
        report.throughput.stored_per_s,
        report.throughput.delivered_per_s
    );
    if let Some(setup) = &report.setup {
        println!(
            "setup: {} devices in {:.1} s ({:.0} devices/s)",
            setup.devices, setup.seconds, setup.devices_per_second
        );
    }
    if let Some(step) = &report.step {
        match step.knee_rate {
            Some(knee) => println!(
                "knee: {knee:.0} messages/s held p99 ≤ {} ",
                ms(Some(step.threshold_us))
            ),
            None => println!(
                "knee: the first step already broke p99 ≤ {}",
                ms(Some(step.threshold_us))
            ),
        }
    }
    for note in &report.meta.notes {
        println!("note: {note}");
    }
}
