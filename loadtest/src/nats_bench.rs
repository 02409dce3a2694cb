//! `chappe-loadtest nats`: what NATS itself does on this machine, next to
//! what Chappe's bus layer does over it, so that a figure of the services
//! over NATS can be read as a fraction of the bus's own limit.
//!
//! Two OS processes: this one measures, and a `nats-peer` child (this same
//! program, started here) answers requests and counts what it receives. For
//! each measurement the raw async-nats figure and the same operation through
//! [`chappe_bus`] sit side by side:
//!
//! - `request-reply` / `bus-request-reply`: `--concurrency` requesters in a
//!   closed loop, each waiting for its reply before the next request; the
//!   peer echoes the payload (raw: one queue subscription; bus:
//!   [`rpc::Server`] route called with [`rpc::call`], a protobuf message
//!   holding the payload);
//! - `publish` / `bus-publish`: core publish as fast as `--publishers` tasks
//!   go, then a flush; the rate is what the peer counted as received, over
//!   the time from the first publish to the peer's count;
//! - `jetstream` / `bus-enqueue`: publish with acknowledgement to a
//!   file-backed work-queue stream (the delivery job path), `--concurrency`
//!   publishers each waiting for its ack (raw: `jetstream.publish`; bus:
//!   [`Bus::enqueue`]). The server's `sync_interval` decides whether each
//!   ack waits for an fsync: `scripts/cluster.sh` and the tests use `always`.
//!
//! Latencies go to HdrHistograms; operations started during `--warmup` are
//! not counted. Every name (subjects, streams) carries a random run prefix,
//! and the streams are deleted at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, stream::RetentionPolicy, stream::StorageType};
use bytes::Bytes;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::{Bus, Headers, rpc};
use clap::{Args, ValueEnum};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

use crate::config::parse_duration;
use crate::report::Machine;

/// The payload of a request through the bus layer: the bus's typed calls
/// carry protobuf messages.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Echo {
    #[prost(bytes = "bytes", tag = "1")]
    pub payload: Bytes,
}

/// One thing `chappe-loadtest nats` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Measurement {
    /// Raw async-nats request/reply to a queue subscriber in the peer.
    RequestReply,
    /// The same through `NatsBus` and `rpc::call` / `rpc::Server`.
    BusRequestReply,
    /// Raw async-nats core publish, counted by a subscriber in the peer.
    Publish,
    /// The same through `Bus::publish` / `Bus::subscribe`.
    BusPublish,
    /// Raw JetStream publish, waiting for each ack, on a work-queue stream.
    Jetstream,
    /// The same through `Bus::enqueue` on the bus's jobs stream.
    BusEnqueue,
    /// The whole job path through the bus: `Bus::enqueue` here, and in the
    /// peer `--job-consumers` `Bus::consume` streams acking each job (as
    /// fanout's delivery workers do); the rate is jobs acked.
    Jobs,
}

impl Measurement {
    pub const ALL: [Measurement; 7] = [
        Measurement::RequestReply,
        Measurement::BusRequestReply,
        Measurement::Publish,
        Measurement::BusPublish,
        Measurement::Jetstream,
        Measurement::BusEnqueue,
        Measurement::Jobs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measurement::RequestReply => "request-reply",
            Measurement::BusRequestReply => "bus-request-reply",
            Measurement::Publish => "publish",
            Measurement::BusPublish => "bus-publish",
            Measurement::Jetstream => "jetstream",
            Measurement::BusEnqueue => "bus-enqueue",
            Measurement::Jobs => "jobs",
        }
    }

    /// The raw measurement a bus measurement is compared with.
    pub fn raw_of(self) -> Option<Measurement> {
        match self {
            Measurement::BusRequestReply => Some(Measurement::RequestReply),
            Measurement::BusPublish => Some(Measurement::Publish),
            Measurement::BusEnqueue => Some(Measurement::Jetstream),
            _ => None,
        }
    }
}

/// `chappe-loadtest nats`.
#[derive(Debug, Clone, Args)]
pub struct NatsBenchArgs {
    /// The NATS server (JetStream enabled).
    #[arg(long, env = "CHAPPE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub url: String,
    /// Requests (or JetStream publishes) outstanding at once, each task
    /// waiting for its answer before the next.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Payload bytes of every request, reply and message.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Measured time of each measurement.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before each measurement.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Times every measurement is repeated; rounds 2, 4, … run the bus half
    /// of each pair first, so that a drifting machine favours neither side.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Tasks publishing at once in the publish measurements.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// What to measure (default: all), in pairs raw then bus.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub measure: Vec<Measurement>,
    /// Consumers of the jobs measurement in the peer (fanout's delivery
    /// workers: 4 per process).
    #[arg(long, default_value_t = 4)]
    pub job_consumers: usize,
    /// How long the jobs measurement waits for the peer to ack the backlog
    /// left at its end.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Timeout of one request or JetStream publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// The nats-server process, for its CPU time during each measurement.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the JSON report here (`-`: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The peer program (default: this one).
    #[arg(long, hide = true)]
    pub peer_exe: Option<PathBuf>,
}

/// `chappe-loadtest nats-peer`, started by `nats`.
#[derive(Debug, Clone, Args)]
pub struct NatsPeerArgs {
    #[arg(long)]
    pub url: String,
    /// The run's subject prefix.
    #[arg(long)]
    pub prefix: String,
    /// Requests the bus server handles at once.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// `Bus::consume` streams on the jobs queue.
    #[arg(long, default_value_t = 4)]
    pub job_consumers: usize,
}

/// Latency of one measurement, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p99_9_us: u64,
    pub max_us: u64,
}

/// CPU seconds used during one measurement (warm-up included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    /// This (measuring) process.
    pub this_s: f64,
    /// The peer process.
    pub peer_s: f64,
    /// The nats-server, with `--server-pid`.
    pub server_s: Option<f64>,
}

/// The result of one measurement in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub round: u32,
    pub measurement: Measurement,
    /// Completed operations in the measured window (publish: messages the
    /// peer received).
    pub operations: u64,
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    pub seconds: f64,
    pub per_second: f64,
    /// Publish: messages sent, and the rate at which they were sent
    /// (publish calls and the final flush).
    pub sent: Option<u64>,
    pub sent_per_second: Option<f64>,
    /// Jobs: enqueued but not yet acked at the end of the measured window,
    /// and the seconds the peer then took to ack them all.
    #[serde(default)]
    pub backlog: Option<u64>,
    #[serde(default)]
    pub drain_s: Option<f64>,
    pub latency: Option<Latency>,
    pub cpu: Cpu,
}

/// Bus over raw, for one pair in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub round: u32,
    pub bus: Measurement,
    pub raw: Measurement,
    pub rate: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// The JSON report of `chappe-loadtest nats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatsBenchReport {
    pub url: String,
    pub server_version: String,
    pub machine: Machine,
    pub concurrency: usize,
    pub publishers: usize,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rounds: u32,
    /// `/proc/loadavg` before the first and after the last measurement.
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub results: Vec<Measured>,
    pub ratios: Vec<Ratio>,
}

impl NatsBenchReport {
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }

    /// The result of `measurement` in `round`.
    pub fn result(&self, round: u32, measurement: Measurement) -> Option<&Measured> {
        self.results
            .iter()
            .find(|m| m.round == round && m.measurement == measurement)
    }

    /// The report as a table people read.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "NATS {} at {}; {} concurrent, {} publisher(s), {}-byte payloads, {:.1} s each \
             after {:.1} s warm-up; {} CPUs\nload average before: {}\n",
            self.server_version,
            self.url,
            self.concurrency,
            self.publishers,
            self.payload_bytes,
            self.duration_s,
            self.warmup_s,
            self.machine.cpus,
            self.loadavg_before,
        );
        out.push_str(&format!(
            "{:<5} {:<18} {:>12} {:>10} {:>10} {:>10} {:>7}  {}\n",
            "round",
            "measurement",
            "per second",
            "p50",
            "p99",
            "p99.9",
            "errors",
            "cpu s this/peer/server"
        ));
        let ms = |us: u64| format!("{:.3} ms", us as f64 / 1000.0);
        for m in &self.results {
            let (p50, p99, p999) = m.latency.as_ref().map_or_else(
                || ("-".to_owned(), "-".to_owned(), "-".to_owned()),
                |l| (ms(l.p50_us), ms(l.p99_us), ms(l.p99_9_us)),
            );
            let server = m
                .cpu
                .server_s
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}"));
            out.push_str(&format!(
                "{:<5} {:<18} {:>12.0} {:>10} {:>10} {:>10} {:>7}  {:.1}/{:.1}/{}\n",
                m.round,
                m.measurement.name(),
                m.per_second,
                p50,
                p99,
                p999,
                m.errors,
                m.cpu.this_s,
                m.cpu.peer_s,
                server
            ));
            if m.measurement == Measurement::Jobs {
                if let Some(rate) = m.sent_per_second {
                    out.push_str(&format!(
                        "{:<5} {:<18} {:>12.0}  enqueued; backlog {} at the end, acked in {:.1} s\n",
                        "",
                        "  (enqueued)",
                        rate,
                        m.backlog.unwrap_or(0),
                        m.drain_s.unwrap_or(0.0)
                    ));
                }
            } else if let (Some(sent), Some(rate)) = (m.sent, m.sent_per_second) {
                out.push_str(&format!(
                    "{:<5} {:<18} {:>12.0}  sent {sent}, received {} ({} lost)\n",
                    "",
                    "  (sent)",
                    rate,
                    m.operations,
                    sent.saturating_sub(m.operations)
                ));
            }
            if let Some(e) = &m.first_error {
                out.push_str(&format!("      first error: {e}\n"));
            }
        }
        if !self.ratios.is_empty() {
            out.push_str("bus / raw:\n");
            let r = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"));
            for ratio in &self.ratios {
                out.push_str(&format!(
                    "  round {} {} / {}: rate {:.2}  p50 {}  p99 {}\n",
                    ratio.round,
                    ratio.bus.name(),
                    ratio.raw.name(),
                    ratio.rate,
                    r(ratio.p50),
                    r(ratio.p99),
                ));
            }
        }
        out.push_str(&format!("load average after: {}\n", self.loadavg_after));
        out
    }
}

/// Runs `chappe-loadtest nats` and prints / writes its report.
pub async fn run(args: NatsBenchArgs) -> Result<()> {
    let report = measure(args.clone()).await?;
    crate::output::emit(&report, args.out.as_deref(), || report.to_text())?;
    Ok(())
}

/// The subjects and streams of one run, all under its random prefix.
#[derive(Clone)]
struct Names {
    prefix: String,
}

impl Names {
    fn raw_request(&self) -> String {
        format!("{}.raw.req", self.prefix)
    }
    fn bus_request(&self) -> String {
        format!("{}.bus.req", self.prefix)
    }
    /// Raw publishes: `<prefix>.pub.<tag>`.
    fn raw_pub(&self, tag: &str) -> String {
        format!("{}.pub.{tag}", self.prefix)
    }
    fn raw_pub_all(&self) -> String {
        format!("{}.pub.>", self.prefix)
    }
    fn bus_pub(&self, tag: &str) -> String {
        format!("{}.bpub.{tag}", self.prefix)
    }
    fn bus_pub_all(&self) -> String {
        format!("{}.bpub.>", self.prefix)
    }
    fn bus_pub_reply(&self, tag: &str) -> String {
        format!("{}.bctl.{tag}", self.prefix)
    }
    fn js_stream(&self) -> String {
        format!("{}_RAWJS", self.prefix.to_uppercase())
    }
    fn js_subject(&self) -> String {
        format!("{}.js.bench", self.prefix)
    }
    /// The bus's own jobs queue (its stream is `<PREFIX>_JOBS`).
    fn bus_queue(&self) -> String {
        format!("{}.jobs.bench", self.prefix)
    }
    /// The queue the peer consumes.
    fn consumed_queue(&self) -> String {
        format!("{}.jobs.consumed", self.prefix)
    }
    /// Where the peer answers how many jobs it acked.
    fn jobs_count(&self) -> String {
        format!("{}.ctl.jobs", self.prefix)
    }
}

/// The header of the last message of a bus publish measurement: where the
/// peer publishes its count.
const REPLY_HEADER: &str = "bench-reply";

/// Measures and returns the report (the peer process is started and
/// stopped here).
pub async fn measure(args: NatsBenchArgs) -> Result<NatsBenchReport> {
    if args.concurrency == 0 || args.publishers == 0 || args.rounds == 0 {
        bail!("--concurrency, --publishers and --rounds must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    let measurements: Vec<Measurement> = if args.measure.is_empty() {
        Measurement::ALL.to_vec()
    } else {
        // In the order of ALL, each once.
        Measurement::ALL
            .into_iter()
            .filter(|m| args.measure.contains(m))
            .collect()
    };
    let names = Names {
        prefix: format!("chappebench{:08x}", rand::random::<u32>()),
    };
    let client = async_nats::connect(&args.url)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let server_version = client.server_info().version;
    let bus = NatsBus::connect(NatsConfig {
        prefix: names.prefix.clone(),
        connection_name: "chappe-loadtest-nats".into(),
        api_timeout: args.request_timeout,
        ..NatsConfig::with_url(&args.url)
    })
    .await
    .context("connecting the bus (NATS with JetStream)")?;
    let js = jetstream::new(client.clone());
    if measurements.contains(&Measurement::Jetstream) {
        js.create_stream(jetstream::stream::Config {
            name: names.js_stream(),
            subjects: vec![names.js_subject()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    }

    let mut peer = Peer::start(&args, &names).await?;
    let result = run_rounds(&args, &names, &measurements, &client, &bus, &js, &peer).await;
    peer.stop().await;

    // Leave nothing behind on the server.
    if measurements.contains(&Measurement::Jetstream) {
        let _ = js.delete_stream(names.js_stream()).await;
    }
    let _ = bus.jetstream().delete_stream(bus.jobs_stream()).await;
    let (results, loadavg_before, loadavg_after) = result?;

    let mut ratios = Vec::new();
    for round in 1..=args.rounds {
        let pairs = measurements
            .iter()
            .filter_map(|&bus_m| bus_m.raw_of().map(|raw_m| (bus_m, raw_m)));
        for (bus_m, raw_m) in pairs {
            let find = |m| {
                results
                    .iter()
                    .find(|r: &&Measured| r.round == round && r.measurement == m)
            };
            let (Some(b), Some(r)) = (find(bus_m), find(raw_m)) else {
                continue;
            };
            let lat = |f: fn(&Latency) -> u64| match (&b.latency, &r.latency) {
                (Some(bl), Some(rl)) if f(rl) > 0 => Some(f(bl) as f64 / f(rl) as f64),
                _ => None,
            };
            ratios.push(Ratio {
                round,
                bus: bus_m,
                raw: raw_m,
                rate: if r.per_second > 0.0 {
                    b.per_second / r.per_second
                } else {
                    0.0
                },
                p50: lat(|l| l.p50_us),
                p99: lat(|l| l.p99_us),
            });
        }
    }
    Ok(NatsBenchReport {
        url: args.url.clone(),
        server_version,
        machine: Machine::detect(),
        concurrency: args.concurrency,
        publishers: args.publishers,
        payload_bytes: args.payload,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        rounds: args.rounds,
        loadavg_before,
        loadavg_after,
        results,
        ratios,
    })
}

type RoundsResult = (Vec<Measured>, String, String);

async fn run_rounds(
    args: &NatsBenchArgs,
    names: &Names,
    measurements: &[Measurement],
    client: &async_nats::Client,
    bus: &NatsBus,
    js: &jetstream::Context,
    peer: &Peer,
) -> Result<RoundsResult> {
    let payload = Bytes::from(vec![0x5a_u8; args.payload]);
    let loadavg_before = loadavg();
    let mut results = Vec::new();
    for round in 1..=args.rounds {
        // Pairs stay together; even-numbered rounds put the bus first.
        let mut order = measurements.to_vec();
        if round % 2 == 0 {
            let mut i = 0;
            while i + 1 < order.len() {
                if order[i + 1].raw_of() == Some(order[i]) {
                    order.swap(i, i + 1);
                    i += 2;
                } else {
                    i += 1;
                }
            }
        }
        for m in order {
            let cpu_before = cpu_now(peer.pid, args.server_pid);
            let mut measured = match m {
                Measurement::RequestReply => {
                    let op = Op::RawRequest {
                        client: client.clone(),
                        subject: names.raw_request().into(),
                    };
                    closed_loop(args, op, payload.clone(), m, round).await
                }
                Measurement::BusRequestReply => {
                    let op = Op::BusRequest {
                        bus: bus.clone(),
                        subject: names.bus_request(),
                    };
                    closed_loop(args, op, payload.clone(), m, round).await
                }
                Measurement::Jetstream => {
                    let op = Op::RawJetstream {
                        js: js.clone(),
                        subject: names.js_subject().into(),
                    };
                    closed_loop(args, op, payload.clone(), m, round).await
                }
                Measurement::BusEnqueue => {
                    let op = Op::BusEnqueue {
                        bus: bus.clone(),
                        queue: names.bus_queue(),
                    };
                    closed_loop(args, op, payload.clone(), m, round).await
                }
                Measurement::Publish => {
                    publish_raw(args, client, names, payload.clone(), round).await?
                }
                Measurement::BusPublish => {
                    publish_bus(args, bus, names, payload.clone(), round).await?
                }
                Measurement::Jobs => jobs(args, client, bus, names, payload.clone(), round).await?,
            };
            let cpu_after = cpu_now(peer.pid, args.server_pid);
            measured.cpu = Cpu {
                this_s: cpu_after.0 - cpu_before.0,
                peer_s: cpu_after.1 - cpu_before.1,
                server_s: cpu_after.2.zip(cpu_before.2).map(|(a, b)| a - b),
            };
            results.push(measured);
        }
    }
    Ok((results, loadavg_before, loadavg()))
}

/// One operation of a closed-loop measurement.
#[derive(Clone)]
enum Op {
    RawRequest {
        client: async_nats::Client,
        subject: async_nats::Subject,
    },
    BusRequest {
        bus: NatsBus,
        subject: String,
    },
    RawJetstream {
        js: jetstream::Context,
        subject: async_nats::Subject,
    },
    BusEnqueue {
        bus: NatsBus,
        queue: String,
    },
    Counting(Box<CountingOp>),
}

impl Op {
    async fn once(&self, payload: &Bytes, timeout: Duration) -> Result<(), String> {
        match self {
            Op::RawRequest { client, subject } => {
                let request = async_nats::Request::new()
                    .payload(payload.clone())
                    .timeout(Some(timeout));
                let reply = client
                    .send_request(subject.clone(), request)
                    .await
                    .map_err(|e| e.to_string())?;
                check_len(reply.payload.len(), payload.len())
            }
            Op::BusRequest { bus, subject } => {
                let request = Echo {
                    payload: payload.clone(),
                };
                let reply: Echo = rpc::call(bus, subject, &request, timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                check_len(reply.payload.len(), payload.len())
            }
            Op::RawJetstream { js, subject } => {
                let ack = js
                    .publish(subject.clone(), payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| e.to_string())
            }
            Op::BusEnqueue { bus, queue } => bus
                .enqueue(queue, Headers::new(), payload.clone())
                .await
                .map_err(|e| e.to_string()),
            Op::Counting(counting) => {
                Box::pin(counting.op.once(payload, timeout)).await?;
                counting.ops.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

fn check_len(got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("reply of {got} bytes, expected {want}"))
    }
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// One operation of a closed loop, done again as soon as it completes.
/// Each task of [`drive`] holds a clone.
pub(crate) trait Operation: Clone + Send + Sync + 'static {
    fn once(&self) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// What [`drive`] counted in its measured window.
pub(crate) struct Driven {
    /// Latencies of the successful operations, in microseconds.
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `concurrency` tasks, each doing `op` again as soon as it completes, for
/// `warmup` then `duration`; operations started in the measured window count.
pub(crate) async fn drive<O: Operation>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    op: O,
) -> Driven {
    let start = Instant::now();
    let measured_from = start + warmup;
    let end = measured_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let op = op.clone();
        tasks.spawn(async move {
            let mut hist = histogram();
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let result = op.once().await;
                if began < measured_from {
                    continue;
                }
                match result {
                    Ok(()) => {
                        ok += 1;
                        hist.saturating_record(began.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (hist, ok, errors, first_error)
        });
    }
    let mut driven = Driven {
        hist: histogram(),
        ok: 0,
        errors: 0,
        first_error: None,
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((h, o, e, f)) => {
                let _ = driven.hist.add(&h);
                driven.ok += o;
                driven.errors += e;
                if driven.first_error.is_none() {
                    driven.first_error = f;
                }
            }
            Err(e) => {
                driven.errors += 1;
                driven
                    .first_error
                    .get_or_insert(format!("a task failed: {e}"));
            }
        }
    }
    driven
}

/// An [`Op`] with its payload and timeout, as [`drive`] runs it.
#[derive(Clone)]
struct OpCall {
    op: Op,
    payload: Bytes,
    timeout: Duration,
}

impl Operation for OpCall {
    async fn once(&self) -> Result<(), String> {
        self.op.once(&self.payload, self.timeout).await
    }
}

/// `--concurrency` tasks, each doing `op` again as soon as it completes;
/// operations started in the measured window count.
async fn closed_loop(
    args: &NatsBenchArgs,
    op: Op,
    payload: Bytes,
    measurement: Measurement,
    round: u32,
) -> Measured {
    let call = OpCall {
        op,
        payload,
        timeout: args.request_timeout,
    };
    let driven = drive(args.concurrency, args.warmup, args.duration, call).await;
    let seconds = args.duration.as_secs_f64();
    Measured {
        round,
        measurement,
        operations: driven.ok,
        errors: driven.errors,
        first_error: driven.first_error,
        seconds,
        per_second: driven.ok as f64 / seconds,
        sent: None,
        sent_per_second: None,
        backlog: None,
        drain_s: None,
        latency: latency(&driven.hist),
        cpu: Cpu::default(),
    }
}

pub(crate) fn latency(hist: &Histogram<u64>) -> Option<Latency> {
    (!hist.is_empty()).then(|| Latency {
        count: hist.len(),
        mean_us: hist.mean(),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        p99_9_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
    })
}

/// Publishes for `duration` from `publishers` tasks; returns messages sent.
async fn publish_for<F, Fut>(publishers: usize, duration: Duration, publish: F) -> (u64, u64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let end = Instant::now() + duration;
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..publishers {
        let (publish, sent, failed) = (publish.clone(), sent.clone(), failed.clone());
        tasks.spawn(async move {
            let (mut n, mut f) = (0u64, 0u64);
            // Check the clock every 64 messages: publishing is a channel send.
            'outer: loop {
                for _ in 0..64 {
                    if publish().await {
                        n += 1;
                    } else {
                        f += 1;
                    }
                }
                if Instant::now() >= end {
                    break 'outer;
                }
            }
            sent.fetch_add(n, Ordering::Relaxed);
            failed.fetch_add(f, Ordering::Relaxed);
        });
    }
    while tasks.join_next().await.is_some() {}
    (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// Raw core publish to the peer's subscriber: warm-up on a subject of its
/// own, then the measured subject; the peer's count of each comes back as
/// the reply to a last (empty) request on that subject, which it sees after
/// every message published before it.
async fn publish_raw(
    args: &NatsBenchArgs,
    client: &async_nats::Client,
    names: &Names,
    payload: Bytes,
    round: u32,
) -> Result<Measured> {
    let run = |subject: async_nats::Subject, duration: Duration| {
        let client = client.clone();
        let payload = payload.clone();
        let publishers = args.publishers;
        async move {
            let publish = {
                let client = client.clone();
                move || {
                    let (client, subject, payload) =
                        (client.clone(), subject.clone(), payload.clone());
                    async move { client.publish(subject, payload).await.is_ok() }
                }
            };
            publish_for(publishers, duration, publish).await
        }
    };
    if !args.warmup.is_zero() {
        let subject: async_nats::Subject = names.raw_pub(&format!("w{round}")).into();
        run(subject.clone(), args.warmup).await;
        client.flush().await.context("flushing")?;
        raw_count(client, &subject, args.request_timeout).await?;
    }
    let subject: async_nats::Subject = names.raw_pub(&format!("m{round}")).into();
    let start = Instant::now();
    let (sent, failed) = run(subject.clone(), args.duration).await;
    client.flush().await.context("flushing")?;
    let sent_seconds = start.elapsed().as_secs_f64();
    let received = raw_count(client, &subject, args.request_timeout).await?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(publish_result(
        round,
        Measurement::Publish,
        sent,
        failed,
        sent_seconds,
        received,
        seconds,
    ))
}

fn publish_result(
    round: u32,
    measurement: Measurement,
    sent: u64,
    failed: u64,
    sent_seconds: f64,
    received: u64,
    seconds: f64,
) -> Measured {
    Measured {
        round,
        measurement,
        operations: received,
        errors: failed,
        first_error: (failed > 0).then(|| format!("{failed} publish calls failed")),
        seconds,
        per_second: received as f64 / seconds,
        sent: Some(sent),
        sent_per_second: Some(sent as f64 / sent_seconds),
        backlog: None,
        drain_s: None,
        latency: None,
        cpu: Cpu::default(),
    }
}

/// What the peer received on `subject` (asked with retries: a peer that fell
/// behind may have dropped the question too).
async fn raw_count(
    client: &async_nats::Client,
    subject: &async_nats::Subject,
    timeout: Duration,
) -> Result<u64> {
    let mut last = String::new();
    for _ in 0..5 {
        let request = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(timeout));
        match client.send_request(subject.clone(), request).await {
            Ok(reply) => return parse_count(&reply.payload),
            Err(e) => last = e.to_string(),
        }
    }
    bail!("the peer did not report its count on {subject}: {last}")
}

fn parse_count(payload: &[u8]) -> Result<u64> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .context("the peer's count is not a number")
}

/// Core publish through the bus; the count comes back on a reply subject
/// named in a header of the last message.
async fn publish_bus(
    args: &NatsBenchArgs,
    bus: &NatsBus,
    names: &Names,
    payload: Bytes,
    round: u32,
) -> Result<Measured> {
    let run = |subject: String, duration: Duration| {
        let bus = bus.clone();
        let payload = payload.clone();
        let publishers = args.publishers;
        async move {
            let subject: Arc<str> = subject.into();
            let publish = move || {
                let (bus, subject, payload) = (bus.clone(), subject.clone(), payload.clone());
                async move { bus.publish(&subject, Headers::new(), payload).await.is_ok() }
            };
            publish_for(publishers, duration, publish).await
        }
    };
    if !args.warmup.is_zero() {
        let tag = format!("w{round}");
        run(names.bus_pub(&tag), args.warmup).await;
        bus.client().flush().await.context("flushing")?;
        bus_count(bus, names, &tag, args.request_timeout).await?;
    }
    let tag = format!("m{round}");
    let start = Instant::now();
    let (sent, failed) = run(names.bus_pub(&tag), args.duration).await;
    bus.client().flush().await.context("flushing")?;
    let sent_seconds = start.elapsed().as_secs_f64();
    let received = bus_count(bus, names, &tag, args.request_timeout).await?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(publish_result(
        round,
        Measurement::BusPublish,
        sent,
        failed,
        sent_seconds,
        received,
        seconds,
    ))
}

async fn bus_count(bus: &NatsBus, names: &Names, tag: &str, timeout: Duration) -> Result<u64> {
    let mut last = String::from("no answer");
    for attempt in 0..5 {
        let reply_subject = names.bus_pub_reply(&format!("{tag}x{attempt}"));
        let mut replies = bus.subscribe(&reply_subject).await?;
        let headers = Headers::from([(REPLY_HEADER.to_owned(), reply_subject.clone())]);
        bus.publish(&names.bus_pub(tag), headers, Bytes::new())
            .await?;
        match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(reply)) => return parse_count(&reply.payload),
            Ok(None) => last = "the reply subscription ended".into(),
            Err(_) => last = format!("no answer within {timeout:?}"),
        }
    }
    bail!("the peer did not report its count for {tag}: {last}")
}

/// The job path: enqueue in a closed loop (as `bus-enqueue`) on the queue
/// the peer consumes; the rate is what the peer acked during the measured
/// window. Then waits for the backlog to be acked, so that the next
/// measurement starts on a quiet server.
async fn jobs(
    args: &NatsBenchArgs,
    client: &async_nats::Client,
    bus: &NatsBus,
    names: &Names,
    payload: Bytes,
    round: u32,
) -> Result<Measured> {
    let subject: async_nats::Subject = names.jobs_count().into();
    let before = peer_jobs(client, &subject, args.request_timeout).await?;
    let op = Op::BusEnqueue {
        bus: bus.clone(),
        queue: names.consumed_queue(),
    };
    // Counts read at the start and the end of the measured window, while the
    // producers run.
    let probe = {
        let (client, subject) = (client.clone(), subject.clone());
        let (warmup, duration, timeout) = (args.warmup, args.duration, args.request_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            let start = peer_jobs(&client, &subject, timeout).await?;
            let at = Instant::now();
            tokio::time::sleep(duration).await;
            let end = peer_jobs(&client, &subject, timeout).await?;
            Ok::<_, anyhow::Error>((start, end, at.elapsed().as_secs_f64()))
        })
    };
    let ops = Arc::new(AtomicU64::new(0));
    let mut measured = {
        let ops = ops.clone();
        let op = CountingOp { op, ops };
        closed_loop_counting(args, op, payload, round).await
    };
    let (start, end, seconds) = probe.await.context("the jobs probe")??;
    let enqueued = ops.load(Ordering::Relaxed);
    let drain_from = Instant::now();
    let deadline = drain_from + args.drain_timeout;
    let mut acked = peer_jobs(client, &subject, args.request_timeout).await?;
    let backlog = (before + enqueued).saturating_sub(acked);
    while acked < before + enqueued && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        acked = peer_jobs(client, &subject, args.request_timeout).await?;
    }
    if acked < before + enqueued {
        bail!(
            "the peer acked {} of {enqueued} jobs within {:?}",
            acked - before,
            args.drain_timeout
        );
    }
    measured.measurement = Measurement::Jobs;
    measured.sent = Some(measured.operations);
    measured.sent_per_second = Some(measured.per_second);
    measured.operations = end - start;
    measured.seconds = seconds;
    measured.per_second = (end - start) as f64 / seconds;
    measured.backlog = Some(backlog);
    measured.drain_s = Some(drain_from.elapsed().as_secs_f64());
    Ok(measured)
}

/// An operation that also counts every success (warm-up included).
#[derive(Clone)]
struct CountingOp {
    op: Op,
    ops: Arc<AtomicU64>,
}

async fn closed_loop_counting(
    args: &NatsBenchArgs,
    op: CountingOp,
    payload: Bytes,
    round: u32,
) -> Measured {
    closed_loop(
        args,
        Op::Counting(Box::new(op)),
        payload,
        Measurement::Jobs,
        round,
    )
    .await
}

/// Jobs the peer acked so far.
async fn peer_jobs(
    client: &async_nats::Client,
    subject: &async_nats::Subject,
    timeout: Duration,
) -> Result<u64> {
    let request = async_nats::Request::new()
        .payload(Bytes::new())
        .timeout(Some(timeout));
    let reply = client
        .send_request(subject.clone(), request)
        .await
        .context("asking the peer for its job count")?;
    parse_count(&reply.payload)
}

/// `/proc/loadavg`, trimmed.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// CPU seconds (user + system) of a process so far, from /proc.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn cpu_now(peer: Option<u32>, server: Option<u32>) -> (f64, f64, Option<f64>) {
    (
        cpu_seconds("self").unwrap_or(0.0),
        peer.and_then(|p| cpu_seconds(&p.to_string()))
            .unwrap_or(0.0),
        server.and_then(|p| cpu_seconds(&p.to_string())),
    )
}

/// The peer process, from start to stop.
struct Peer {
    child: tokio::process::Child,
    pid: Option<u32>,
}

impl Peer {
    async fn start(args: &NatsBenchArgs, names: &Names) -> Result<Peer> {
        let exe = match &args.peer_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().context("finding this program")?,
        };
        let mut child = tokio::process::Command::new(&exe)
            .arg("nats-peer")
            .arg("--url")
            .arg(&args.url)
            .arg("--prefix")
            .arg(&names.prefix)
            .arg("--job-consumers")
            .arg(args.job_consumers.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the peer {}", exe.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("the peer's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line.trim() == "ready" => Ok(Peer { child, pid }),
            Ok(Ok(other)) => {
                let status = child.wait().await.ok();
                bail!("the peer did not start ({other:?}, {status:?})")
            }
            Ok(Err(e)) => bail!("reading from the peer: {e}"),
            Err(_) => bail!("the peer was not ready within 30 s"),
        }
    }

    /// Closes the peer's standard input (its signal to stop) and waits.
    async fn stop(&mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The peer: echoes requests (raw and through the bus's rpc server) and
/// counts published messages per subject until its standard input closes.
pub async fn peer(args: NatsPeerArgs) -> Result<()> {
    let names = Names {
        prefix: args.prefix.clone(),
    };
    let client = async_nats::connect(&args.url)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let bus = NatsBus::connect(NatsConfig {
        prefix: args.prefix.clone(),
        connection_name: "chappe-loadtest-nats-peer".into(),
        ..NatsConfig::with_url(&args.url)
    })
    .await
    .context("connecting the bus")?;

    // Raw request/reply: one queue subscription, replies in order.
    let mut requests = client
        .queue_subscribe(names.raw_request(), "bench".to_owned())
        .await?;
    let responder = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(message) = requests.next().await {
                if let Some(reply) = message.reply {
                    let _ = client.publish(reply, message.payload).await;
                }
            }
        })
    };

    // Raw publish: count per subject; a request is the question "how many".
    let mut published = client.subscribe(names.raw_pub_all()).await?;
    let counter = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut counts: BTreeMap<async_nats::Subject, u64> = BTreeMap::new();
            while let Some(message) = published.next().await {
                match message.reply {
                    Some(reply) => {
                        let n = counts.get(&message.subject).copied().unwrap_or(0);
                        let _ = client.publish(reply, n.to_string().into()).await;
                    }
                    None => *counts.entry(message.subject).or_default() += 1,
                }
            }
        })
    };
    client.flush().await?;

    // Through the bus: the rpc server, and a subscription counting.
    let shared: Arc<dyn Bus> = Arc::new(bus.clone());
    let server = rpc::Server::new(shared, "bench", args.max_in_flight)
        .route(names.bus_request(), |request: Echo| async move {
            Ok::<_, rpc::RpcError>(request)
        })
        .start()
        .await?;
    let mut bus_published = bus.subscribe(&names.bus_pub_all()).await?;
    let bus_counter = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut counts: HashMap<String, u64> = HashMap::new();
            while let Some(message) = bus_published.next().await {
                match message.headers.get(REPLY_HEADER) {
                    Some(reply) => {
                        let n = counts.get(&message.subject).copied().unwrap_or(0);
                        let _ = bus
                            .publish(reply, Headers::new(), n.to_string().into())
                            .await;
                    }
                    None => *counts.entry(message.subject).or_default() += 1,
                }
            }
        })
    };

    // The job path: consumers acking every job, and their count on request.
    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = tokio::task::JoinSet::new();
    if args.job_consumers > 0 {
        for _ in 0..args.job_consumers {
            let mut jobs = bus.consume(&names.consumed_queue(), "bench").await?;
            let acked = acked.clone();
            consumers.spawn(async move {
                while let Some(job) = jobs.next().await {
                    if job.ack().await.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
    let mut questions = client.subscribe(names.jobs_count()).await?;
    let answers = {
        let client = client.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Some(message) = questions.next().await {
                if let Some(reply) = message.reply {
                    let n = acked.load(Ordering::Relaxed);
                    let _ = client.publish(reply, n.to_string().into()).await;
                }
            }
        })
    };
    client.flush().await?;

    println!("ready");
    use std::io::Write as _;
    std::io::stdout().flush()?;

    // Until the measuring process closes our standard input (or goes away).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;

    server.stop().await;
    consumers.abort_all();
    answers.abort();
    responder.abort();
    counter.abort();
    bus_counter.abort();
    let _ = client.flush().await;
    Ok(())
}
