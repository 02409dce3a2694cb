//! `chappe-loadtest presence`: presence updates per second handled by a
//! running `chappe-presence`, next to what NATS request/reply does with as
//! many callers on the same machine in the same run.
//!
//! `--callers` tasks each send `chappe.rpc.presence.connection` requests in
//! a closed loop (the next as soon as the answer came), as gateways do for
//! every connected device: a heartbeat (`PresenceConnection{kind:
//! HEARTBEAT, active: true}`) of a device picked at random among
//! `--users` × `--devices-per-user` devices of fresh users. Each heartbeat
//! is one compare-and-set update of its user's record in presence's
//! key-value bucket; two in flight for one user at once is the contention a
//! user with several devices causes (with 1,000 users and 64 callers, about
//! one request in sixteen meets another of the same user). Before the
//! measured window every device is reported connected (so that the
//! heartbeats change no user's state and push nothing, as in steady state),
//! and after it disconnected.
//!
//! The reference is [`crate::nats_bench`]'s, run right after with the same
//! number of callers and a payload of the heartbeat's size: raw async-nats
//! request/reply to an echoing queue subscriber in another process, the
//! same through the bus's `rpc::call` / `rpc::Server` (what presence is
//! built on), and a JetStream publish waiting for its ack on a file-backed
//! stream (a key-value write, as each heartbeat's, is one: with the
//! server's `sync_interval: always`, each waits for an fsync).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::rpc;
use chappe_bus::subjects::{PresenceMethod, Subjects};
use chappe_proto::internal::{PresenceAck, PresenceConnection, presence_connection::Kind};
use chappe_proto::v1::DeviceRef;
use clap::Args;
use futures::StreamExt as _;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::media_bench::{NamedPid, parse_named_pid};
use crate::nats_bench::{
    self, Latency, Measurement, NatsBenchArgs, NatsBenchReport, Operation, cpu_seconds, drive,
    latency, loadavg,
};
use crate::report::Machine;

/// `chappe-loadtest presence`.
#[derive(Debug, Clone, Args)]
pub struct PresenceBenchArgs {
    /// The NATS server the presence service listens on.
    #[arg(long, env = "CHAPPE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The services' subject prefix.
    #[arg(long, env = "CHAPPE_SUBJECT_PREFIX", default_value = "chappe")]
    pub prefix: String,
    /// Requests outstanding at once, each caller waiting for its answer
    /// before the next.
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Unmeasured seconds before.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    /// Distinct users the heartbeats are spread over.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Devices of each user.
    #[arg(long, default_value_t = 2)]
    pub devices_per_user: usize,
    /// Timeout of one request.
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
    pub request_timeout: Duration,
    /// A process whose CPU time to report, as NAME=PID (repeatable); the one
    /// named `nats` is also given to the reference as the server.
    #[arg(long = "pid", value_parser = parse_named_pid)]
    pub pids: Vec<NamedPid>,
    /// Skip the raw NATS reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Write the JSON report here (`-`: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The program the reference starts as its echoing peer (default: this one).
    #[arg(long, hide = true)]
    pub peer_exe: Option<PathBuf>,
}

/// CPU seconds a process used while the heartbeats ran (warm-up included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessCpu {
    pub name: String,
    pub pid: u32,
    pub seconds: Option<f64>,
}

/// The JSON report of `chappe-loadtest presence`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceBenchReport {
    pub nats_url: String,
    pub server_version: String,
    pub machine: Machine,
    pub callers: usize,
    pub users: usize,
    pub devices_per_user: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Encoded size of one heartbeat request (the reference's payload).
    pub request_bytes: usize,
    /// Reporting every device connected, before the warm-up.
    pub setup_s: f64,
    /// Heartbeats answered in the measured window.
    pub updates: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub updates_per_s: f64,
    pub latency: Option<Latency>,
    /// Wall seconds of warm-up plus measured window, and the CPU seconds
    /// each process (this one as `loadtest`) used in them.
    pub drive_s: f64,
    pub cpu: Vec<ProcessCpu>,
    pub loadavg_before: String,
    pub loadavg_after: String,
    /// Raw and bus request/reply, and JetStream publish + ack, with as many
    /// callers, right after.
    pub reference: Option<NatsBenchReport>,
    /// Presence updates/s over raw request/reply/s, over bus
    /// request/reply/s, and over JetStream publishes (with ack)/s.
    pub ratio_to_raw: Option<f64>,
    pub ratio_to_bus: Option<f64>,
    #[serde(default)]
    pub ratio_to_jetstream: Option<f64>,
}

impl PresenceBenchReport {
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }

    /// The reference's measurement `m`.
    pub fn reference_rate(&self, m: Measurement) -> Option<&nats_bench::Measured> {
        self.reference.as_ref()?.result(1, m)
    }

    /// The report as a table people read.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "presence over NATS {} at {}: {} callers, heartbeats of {} users × {} devices \
             ({}-byte requests), {:.1} s after {:.1} s warm-up; {} CPUs\n\
             load average before: {}\n",
            self.server_version,
            self.nats_url,
            self.callers,
            self.users,
            self.devices_per_user,
            self.request_bytes,
            self.duration_s,
            self.warmup_s,
            self.machine.cpus,
            self.loadavg_before,
        );
        out.push_str(&format!(
            "{:<20} {:>12} {:>10} {:>10} {:>10} {:>7}  {}\n",
            "measurement", "per second", "p50", "p99", "p99.9", "errors", "ratio"
        ));
        let ms = |us: u64| format!("{:.3} ms", us as f64 / 1000.0);
        let row = |name: &str, rate: f64, l: Option<&Latency>, errors: u64, ratio: &str| {
            let (p50, p99, p999) = l.map_or_else(
                || ("-".to_owned(), "-".to_owned(), "-".to_owned()),
                |l| (ms(l.p50_us), ms(l.p99_us), ms(l.p99_9_us)),
            );
            format!("{name:<20} {rate:>12.0} {p50:>10} {p99:>10} {p999:>10} {errors:>7}  {ratio}\n")
        };
        out.push_str(&row(
            "presence heartbeat",
            self.updates_per_s,
            self.latency.as_ref(),
            self.errors,
            "",
        ));
        for (m, ratio) in [
            (Measurement::RequestReply, self.ratio_to_raw),
            (Measurement::BusRequestReply, self.ratio_to_bus),
            (Measurement::Jetstream, self.ratio_to_jetstream),
        ] {
            if let Some(r) = self.reference_rate(m) {
                let ratio = ratio.map_or_else(String::new, |x| format!("presence / this {x:.3}"));
                out.push_str(&row(
                    m.name(),
                    r.per_second,
                    r.latency.as_ref(),
                    r.errors,
                    &ratio,
                ));
            }
        }
        if let Some(e) = &self.first_error {
            out.push_str(&format!("first error: {e}\n"));
        }
        let cpu: Vec<String> = self
            .cpu
            .iter()
            .map(|c| {
                c.seconds.map_or_else(
                    || format!("{} -", c.name),
                    |s| format!("{} {s:.1} s ({:.2} cores)", c.name, s / self.drive_s),
                )
            })
            .collect();
        out.push_str(&format!(
            "CPU during the heartbeats' {:.1} s: {}\n",
            self.drive_s,
            cpu.join(", ")
        ));
        out.push_str(&format!(
            "setup (every device connected) {:.1} s; load average after: {}\n",
            self.setup_s, self.loadavg_after
        ));
        out
    }
}

/// `chappe-loadtest presence`: measures, prints, writes `--out`.
pub async fn run(args: PresenceBenchArgs) -> Result<()> {
    let report = measure(args.clone()).await?;
    crate::output::emit(&report, args.out.as_deref(), || report.to_text())?;
    Ok(())
}

/// One device whose connection the heartbeats report.
struct Device {
    actor: DeviceRef,
    connection_id: u64,
}

impl Device {
    fn event(&self, kind: Kind) -> PresenceConnection {
        PresenceConnection {
            actor: Some(self.actor.clone()),
            kind: kind as i32,
            active: true,
            connection_id: self.connection_id,
        }
    }
}

/// A heartbeat of a device picked at random.
#[derive(Clone)]
struct Heartbeat {
    bus: NatsBus,
    subject: Arc<str>,
    devices: Arc<Vec<Device>>,
    timeout: Duration,
}

impl Operation for Heartbeat {
    async fn once(&self) -> Result<(), String> {
        let device = &self.devices[rand::random_range(0..self.devices.len())];
        let request = device.event(Kind::Heartbeat);
        rpc::call::<_, PresenceAck>(&self.bus, &self.subject, &request, self.timeout)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Sends `kind` for every device, `concurrency` at once.
async fn report_all(h: &Heartbeat, kind: Kind, concurrency: usize) -> Result<()> {
    let results = futures::stream::iter(h.devices.iter())
        .map(|device| {
            let request = device.event(kind);
            async move {
                rpc::call::<_, PresenceAck>(&h.bus, &h.subject, &request, h.timeout)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} {kind:?} events failed; the first: {first}",
            failed.len(),
            h.devices.len()
        );
    }
    Ok(())
}

fn seconds(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// Runs the heartbeats, then the reference, and returns the report.
pub async fn measure(args: PresenceBenchArgs) -> Result<PresenceBenchReport> {
    if args.callers == 0 || args.users == 0 || args.devices_per_user == 0 {
        bail!("--callers, --users and --devices-per-user must be at least 1");
    }
    let duration = seconds(args.duration_s, "--duration-s")?;
    let warmup = seconds(args.warmup_s, "--warmup-s")?;
    if duration.is_zero() {
        bail!("--duration-s must be positive");
    }
    let bus = NatsBus::connect(NatsConfig {
        prefix: args.prefix.clone(),
        connection_name: "chappe-loadtest-presence".into(),
        ..NatsConfig::with_url(&args.nats)
    })
    .await
    .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let server_version = bus.client().server_info().version;

    let run = format!("{:08x}", rand::random::<u32>());
    let devices: Vec<Device> = (0..args.users)
        .flat_map(|u| {
            let user = format!("presence-{run}-{u}");
            (0..args.devices_per_user).map(move |d| Device {
                actor: DeviceRef {
                    user_id: user.clone(),
                    device_id: format!("d{d}"),
                },
                connection_id: rand::random::<u64>() | 1,
            })
        })
        .collect();
    let request_bytes = devices
        .first()
        .map_or(0, |d| d.event(Kind::Heartbeat).encoded_len());
    let heartbeat = Heartbeat {
        bus: bus.clone(),
        subject: Subjects::new(args.prefix.clone())
            .presence(PresenceMethod::Connection)
            .into(),
        devices: Arc::new(devices),
        timeout: args.request_timeout,
    };

    let setup_began = Instant::now();
    report_all(&heartbeat, Kind::Connected, args.callers)
        .await
        .context("reporting the devices connected (is chappe-presence running?)")?;
    let setup_s = setup_began.elapsed().as_secs_f64();

    let mut watched = vec![NamedPid {
        name: "loadtest".into(),
        pid: std::process::id(),
    }];
    watched.extend(args.pids.iter().cloned());
    let cpu_of = |p: &NamedPid| cpu_seconds(&p.pid.to_string());
    let loadavg_before = loadavg();
    let cpu_before: Vec<Option<f64>> = watched.iter().map(cpu_of).collect();
    let began = Instant::now();
    let driven = drive(args.callers, warmup, duration, heartbeat.clone()).await;
    let drive_s = began.elapsed().as_secs_f64();
    let cpu = watched
        .iter()
        .zip(cpu_before)
        .map(|(p, before)| ProcessCpu {
            name: p.name.clone(),
            pid: p.pid,
            seconds: cpu_of(p).zip(before).map(|(a, b)| a - b),
        })
        .collect();
    let loadavg_after = loadavg();

    // Leave no device behind (else presence's sweeper announces them all
    // offline a ttl later, in the middle of the next run).
    if let Err(e) = report_all(&heartbeat, Kind::Disconnected, args.callers).await {
        eprintln!("warning: disconnecting the devices: {e:#}");
    }

    let updates_per_s = driven.ok as f64 / duration.as_secs_f64();
    let reference = if args.no_reference {
        None
    } else {
        let server_pid = args.pids.iter().find(|p| p.name == "nats").map(|p| p.pid);
        let reference = nats_bench::measure(NatsBenchArgs {
            url: args.nats.clone(),
            concurrency: args.callers,
            payload: request_bytes,
            duration,
            warmup,
            rounds: 1,
            publishers: 1,
            measure: vec![
                Measurement::RequestReply,
                Measurement::BusRequestReply,
                Measurement::Jetstream,
            ],
            job_consumers: 0,
            drain_timeout: Duration::from_secs(60),
            request_timeout: args.request_timeout,
            server_pid,
            out: None,
            peer_exe: args.peer_exe.clone(),
        })
        .await
        .context("the raw NATS reference")?;
        Some(reference)
    };
    let ratio = |m: Measurement| {
        reference
            .as_ref()
            .and_then(|r| r.result(1, m))
            .filter(|r| r.per_second > 0.0)
            .map(|r| updates_per_s / r.per_second)
    };
    Ok(PresenceBenchReport {
        nats_url: args.nats.clone(),
        server_version,
        machine: Machine::detect(),
        callers: args.callers,
        users: args.users,
        devices_per_user: args.devices_per_user,
        duration_s: duration.as_secs_f64(),
        warmup_s: warmup.as_secs_f64(),
        request_bytes,
        setup_s,
        updates: driven.ok,
        errors: driven.errors,
        first_error: driven.first_error,
        updates_per_s,
        latency: latency(&driven.hist),
        drive_s,
        cpu,
        loadavg_before,
        loadavg_after,
        ratio_to_raw: ratio(Measurement::RequestReply),
        ratio_to_bus: ratio(Measurement::BusRequestReply),
        ratio_to_jetstream: ratio(Measurement::Jetstream),
        reference,
    })
}
