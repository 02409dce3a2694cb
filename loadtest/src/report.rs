//! The report of a load test run: a serde type with a stable JSON schema
//! (`chappe-loadtest/v1`, documented in `docs/loadtest-report.md`), and the
//! exact merge of the partial reports of several worker processes.
//!
//! Exactness: every latency is kept as an HdrHistogram (1 µs .. 10 min,
//! 3 significant digits), serialized with the V2 deflate encoding in base64.
//! Merging adds histograms bucket by bucket, so a percentile of a merged
//! report equals the percentile of one histogram that saw every sample.
//! Summaries are only ever derived from histograms, never averaged.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

use crate::measure::Metric;

/// The value of [`Report::schema`] this build writes and reads.
pub const SCHEMA: &str = "chappe-loadtest/v1";
/// Smallest latency a histogram tells apart, in microseconds.
pub const LOWEST_US: u64 = 1;
/// Largest latency a histogram holds (10 minutes), in microseconds; larger
/// latencies are recorded as this value.
pub const HIGHEST_US: u64 = 600_000_000;
/// Significant decimal digits kept by every histogram.
pub const SIGFIG: u8 = 3;

/// Errors of reading, merging and evaluating reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no reports to merge")]
    Empty,
    #[error("unsupported report schema {found:?}; this build reads {SCHEMA:?}")]
    Schema { found: String },
    #[error("invalid report JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("histogram {what}: {reason}")]
    Histogram { what: String, reason: String },
    #[error("reports are not parts of one run: {field} differs ({a} vs {b})")]
    Mismatch {
        field: &'static str,
        a: String,
        b: String,
    },
    #[error("worker {0} appears in more than one report")]
    DuplicateWorker(u32),
}

pub type Result<T, E = ReportError> = std::result::Result<T, E>;

/// How the generator offers load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadMode {
    /// A fixed send rate, independent of how fast the server answers.
    #[default]
    Open,
    /// A fixed number of messages in flight per device.
    Closed,
    /// An open rate raised step by step until latency or errors break.
    Step,
    /// A mode written by a newer version.
    #[serde(other)]
    Other,
}

/// Whether messages are encrypted for every send or once ahead of the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CryptoMode {
    #[default]
    Full,
    PreEncrypted,
    /// A mode written by a newer version.
    #[serde(other)]
    Other,
}

/// The load model of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadModel {
    pub mode: LoadMode,
    /// Messages per second this process was asked to send (open mode; the
    /// first step in step mode). Summed when reports are merged.
    #[serde(default)]
    pub target_rate: Option<f64>,
    /// Messages in flight per device (closed mode).
    #[serde(default)]
    pub in_flight_per_device: Option<u32>,
    /// Seconds of load before the measured phase.
    #[serde(default)]
    pub warmup_s: f64,
    /// Seconds of the measured phase; 0 means the whole timeline is measured.
    #[serde(default)]
    pub measure_s: f64,
    /// Seconds after the last send spent waiting for outstanding deliveries.
    #[serde(default)]
    pub drain_s: f64,
    /// A send later than scheduled by more than this is counted as late.
    #[serde(default)]
    pub late_threshold_us: u64,
}

/// Which worker process wrote a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub index: u32,
    pub count: u32,
}

impl Default for Worker {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

/// The machine a worker ran on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub os: String,
}

impl Machine {
    /// Describes the machine this process runs on (Linux `/proc` and
    /// `/etc/os-release`; fields it cannot read are left empty or 0).
    pub fn detect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let hostname = read("/proc/sys/kernel/hostname")
            .or_else(|| read("/etc/hostname"))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let memory_bytes = read("/proc/meminfo")
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb.saturating_mul(1024));
        let pretty = read("/etc/os-release").and_then(|r| {
            r.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        });
        let kernel = read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned());
        let mut os = format!("{} {}", std::env::consts::OS, std::env::consts::ARCH);
        if let Some(p) = pretty {
            os.push_str(&format!(", {p}"));
        }
        if let Some(k) = kernel {
            os.push_str(&format!(", kernel {k}"));
        }
        Self {
            hostname,
            cpus,
            memory_bytes,
            os,
        }
    }
}

/// What the engine knows about a run; passed to
/// [`Recorder::finish`](crate::measure::Recorder::finish).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub scenario: String,
    /// The scenario's parameters as given.
    #[serde(default)]
    pub parameters: serde_json::Value,
    #[serde(default)]
    pub load: LoadModel,
    #[serde(default)]
    pub crypto: CryptoMode,
    /// `"embedded"` or the URL of the deployment under test.
    #[serde(default)]
    pub target: String,
    /// Connected devices simulated by this process (summed when merged).
    #[serde(default)]
    pub devices: u64,
    #[serde(default)]
    pub worker: Worker,
    /// When second 0 of the timeline began, Unix epoch milliseconds (the
    /// earliest of all workers when merged).
    #[serde(default)]
    pub started_at_unix_ms: u64,
    #[serde(default)]
    pub machine: Machine,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One worker process whose data is in a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub index: u32,
    pub devices: u64,
    pub started_at_unix_ms: u64,
    pub duration_s: f64,
    pub machine: Machine,
}

/// Event counts of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub sent: u64,
    pub stored: u64,
    pub delivered: u64,
    /// Deliveries the sends should cause: one per recipient device per send.
    #[serde(default)]
    pub expected_deliveries: u64,
    /// Sum of `errors_by_status`.
    pub errors: u64,
    /// Errors by gRPC status name (`"RESOURCE_EXHAUSTED"`) or, for failures
    /// that are not gRPC statuses, by the name the engine gave them.
    #[serde(default)]
    pub errors_by_status: BTreeMap<String, u64>,
    /// Sends the generator could not make at their scheduled time at all.
    #[serde(default)]
    pub dropped: u64,
    /// Sends made later than scheduled by more than `late_threshold_us`.
    #[serde(default)]
    pub late: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.sent += o.sent;
        self.stored += o.stored;
        self.delivered += o.delivered;
        self.expected_deliveries += o.expected_deliveries;
        self.errors += o.errors;
        for (k, v) in &o.errors_by_status {
            *self.errors_by_status.entry(k.clone()).or_default() += v;
        }
        self.dropped += o.dropped;
        self.late += o.late;
    }
}

/// Percentiles of one histogram, all in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p99_9_us: u64,
    pub max_us: u64,
}

impl Summary {
    /// The summary of a histogram; `None` when it holds no sample.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        Some(Self {
            count: h.len(),
            min_us: h.min(),
            mean_us: round3(h.mean()),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p99_9_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
    }

    /// `(label, value)` of the percentiles, for tables.
    pub fn percentiles(&self) -> [(&'static str, u64); 6] {
        [
            ("min", self.min_us),
            ("p50", self.p50_us),
            ("p90", self.p90_us),
            ("p99", self.p99_us),
            ("p99.9", self.p99_9_us),
            ("max", self.max_us),
        ]
    }
}

/// One second of the timeline: what happened in `[second, second + 1)`
/// after the process's origin.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub second: u64,
    pub sent: u64,
    pub stored: u64,
    pub delivered: u64,
    pub errors: u64,
    #[serde(default)]
    pub dropped: u64,
    #[serde(default)]
    pub late: u64,
    /// Latency of samples recorded in this second (send → stored and
    /// send → delivered), derived from `histograms`.
    #[serde(default, deserialize_with = "metric_map::deserialize")]
    pub latency: BTreeMap<Metric, Summary>,
    #[serde(default, deserialize_with = "metric_map::deserialize")]
    pub histograms: BTreeMap<Metric, String>,
}

impl Interval {
    /// An interval with these counts and histograms (empty ones omitted).
    pub fn from_histograms(
        second: u64,
        counts: &Interval,
        hists: &BTreeMap<Metric, Histogram<u64>>,
    ) -> Result<Self> {
        let mut i = Interval {
            second,
            latency: BTreeMap::new(),
            histograms: BTreeMap::new(),
            ..counts.clone()
        };
        for (m, h) in hists {
            if let Some(s) = Summary::of(h) {
                i.latency.insert(*m, s);
                i.histograms.insert(*m, encode_histogram(h)?);
            }
        }
        Ok(i)
    }

    fn add_counts(&mut self, o: &Interval) {
        self.sent += o.sent;
        self.stored += o.stored;
        self.delivered += o.delivered;
        self.errors += o.errors;
        self.dropped += o.dropped;
        self.late += o.late;
    }
}

/// Rates over the measured phase: whole seconds `[from_s, to_s)` of the
/// timeline (after warm-up, `measure_s` long; the whole timeline when
/// `measure_s` is 0).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub from_s: u64,
    pub to_s: u64,
    /// Length of the window; shorter than `to_s - from_s` when the run
    /// ended inside its last second.
    pub seconds: f64,
    pub sent: u64,
    pub stored: u64,
    pub delivered: u64,
    pub sent_per_s: f64,
    pub stored_per_s: f64,
    pub delivered_per_s: f64,
}

/// A step of a step-mode run, as given by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepWindow {
    /// Offered messages per second during the step.
    pub rate: f64,
    /// Seconds of the timeline the step covers: `[from_s, to_s)`.
    pub from_s: u64,
    pub to_s: u64,
}

/// The verdict on one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub rate: f64,
    pub from_s: u64,
    pub to_s: u64,
    /// p99 of send → delivered in the step; `null` when nothing was delivered.
    pub p99_us: Option<u64>,
    pub errors: u64,
    #[serde(default)]
    pub dropped: u64,
    /// p99 ≤ threshold, no error and no dropped send.
    pub held: bool,
}

/// Result of a step-mode run: where it breaks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub threshold_us: u64,
    pub steps: Vec<Step>,
    /// Rate of the last step that held before the first that did not (the
    /// last step when all held); `null` when the first step failed.
    pub knee_rate: Option<f64>,
    /// Rate of the first step that did not hold; `null` when all held.
    #[serde(default)]
    pub broke_at_rate: Option<f64>,
}

/// How long connecting and setting up the devices took.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SetupReport {
    pub devices: u64,
    pub seconds: f64,
    pub devices_per_second: f64,
}

impl SetupReport {
    pub fn new(devices: u64, took: Duration) -> Self {
        let seconds = round3(took.as_secs_f64());
        Self {
            devices,
            seconds,
            devices_per_second: rate(devices, seconds),
        }
    }
}

/// The report of one process, or of several merged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: String,
    pub meta: RunMeta,
    /// The worker processes whose data this report holds.
    #[serde(default)]
    pub workers: Vec<WorkerInfo>,
    /// Seconds from the origin to the end of the run (the longest worker).
    #[serde(default)]
    pub duration_s: f64,
    pub counts: Counts,
    #[serde(default)]
    pub throughput: Throughput,
    /// Latency of every sample, derived from `histograms`.
    #[serde(default, deserialize_with = "metric_map::deserialize")]
    pub latency: BTreeMap<Metric, Summary>,
    /// Latency of samples recorded in the measured phase (the `throughput`
    /// window), for the metrics of the timeline.
    #[serde(default, deserialize_with = "metric_map::deserialize")]
    pub measured_latency: BTreeMap<Metric, Summary>,
    /// Every sample of each metric: V2 deflate HdrHistogram in base64.
    #[serde(default, deserialize_with = "metric_map::deserialize")]
    pub histograms: BTreeMap<Metric, String>,
    #[serde(default)]
    pub timeline: Vec<Interval>,
    #[serde(default)]
    pub server_metrics: Option<serde_json::Value>,
    #[serde(default)]
    pub step: Option<StepReport>,
    #[serde(default)]
    pub setup: Option<SetupReport>,
}

impl Report {
    pub fn summary(&self, metric: Metric) -> Option<&Summary> {
        self.latency.get(&metric)
    }

    pub fn to_json_pretty(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Reads a report; unknown fields are ignored, a different `schema` is
    /// refused.
    pub fn from_json(json: &str) -> Result<Self> {
        let r: Report = serde_json::from_str(json)?;
        if r.schema != SCHEMA {
            return Err(ReportError::Schema { found: r.schema });
        }
        Ok(r)
    }

    /// Every send stored, every expected delivery made, nothing failed.
    pub fn accounting_ok(&self) -> bool {
        self.accounting_problems().is_empty()
    }

    /// What [`accounting_ok`](Self::accounting_ok) objects to, in words.
    pub fn accounting_problems(&self) -> Vec<String> {
        let c = &self.counts;
        let mut p = Vec::new();
        if c.errors != 0 {
            p.push(format!("{} errors", c.errors));
        }
        if c.dropped != 0 {
            p.push(format!("{} sends dropped", c.dropped));
        }
        if c.stored != c.sent {
            p.push(format!("{} sent but {} stored", c.sent, c.stored));
        }
        if c.delivered != c.expected_deliveries {
            p.push(format!(
                "{} deliveries expected but {} made",
                c.expected_deliveries, c.delivered
            ));
        }
        p
    }

    /// The decoded histogram of every sample of `metric`.
    pub fn histogram(&self, metric: Metric) -> Result<Option<Histogram<u64>>> {
        self.histograms
            .get(&metric)
            .map(|s| decode_histogram(s, metric.name()))
            .transpose()
    }

    /// Whole seconds `[from, to)` of the measured phase.
    pub fn measured_window(&self) -> (u64, u64) {
        let len = self.timeline.len() as u64;
        let l = &self.meta.load;
        if l.measure_s > 0.0 && l.warmup_s >= 0.0 && (l.warmup_s + l.measure_s).is_finite() {
            let from = l.warmup_s.round() as u64;
            let to = ((l.warmup_s + l.measure_s).round() as u64).min(len);
            if from < to {
                return (from, to);
            }
        }
        (0, len)
    }

    /// Exact latency of the samples recorded in timeline seconds `[from, to)`.
    pub fn window_latency(&self, from: u64, to: u64) -> Result<BTreeMap<Metric, Summary>> {
        let mut acc: BTreeMap<Metric, Histogram<u64>> = BTreeMap::new();
        for i in self
            .timeline
            .iter()
            .filter(|i| (from..to).contains(&i.second))
        {
            for (m, s) in &i.histograms {
                let h = decode_histogram(s, &format!("{} at second {}", m.name(), i.second))?;
                add_histogram(acc.entry(*m).or_insert_with(new_histogram), &h, m.name())?;
            }
        }
        Ok(acc
            .iter()
            .filter_map(|(m, h)| Summary::of(h).map(|s| (*m, s)))
            .collect())
    }

    /// Judges each step (p99 of send → delivered against `threshold`, no
    /// errors, no dropped sends) and finds the knee; sets `self.step`.
    pub fn evaluate_steps(&mut self, windows: &[StepWindow], threshold: Duration) -> Result<()> {
        let threshold_us = duration_us(threshold);
        let mut steps = Vec::with_capacity(windows.len());
        for w in windows {
            let lat = self.window_latency(w.from_s, w.to_s)?;
            let p99_us = lat.get(&Metric::SendToDelivered).map(|s| s.p99_us);
            let (mut errors, mut dropped) = (0, 0);
            for i in self
                .timeline
                .iter()
                .filter(|i| (w.from_s..w.to_s).contains(&i.second))
            {
                errors += i.errors;
                dropped += i.dropped;
            }
            let held = p99_us.is_some_and(|p| p <= threshold_us) && errors == 0 && dropped == 0;
            steps.push(Step {
                rate: w.rate,
                from_s: w.from_s,
                to_s: w.to_s,
                p99_us,
                errors,
                dropped,
                held,
            });
        }
        let first_fail = steps.iter().position(|s| !s.held);
        let knee_rate = match first_fail {
            Some(0) => None,
            Some(n) => Some(steps[n - 1].rate),
            None => steps.last().map(|s| s.rate),
        };
        let broke_at_rate = first_fail.map(|n| steps[n].rate);
        self.step = Some(StepReport {
            threshold_us,
            steps,
            knee_rate,
            broke_at_rate,
        });
        Ok(())
    }

    /// Derives every summary from the histograms and the timeline:
    /// `latency`, `throughput`, `measured_latency`, and the step verdicts.
    pub(crate) fn recompute(&mut self) -> Result<()> {
        let mut latency = BTreeMap::new();
        for m in Metric::ALL {
            if let Some(s) = self.histogram(m)?.as_ref().and_then(Summary::of) {
                latency.insert(m, s);
            }
        }
        self.latency = latency;
        let (from, to) = self.measured_window();
        let mut t = Throughput {
            from_s: from,
            to_s: to,
            ..Throughput::default()
        };
        for i in self
            .timeline
            .iter()
            .filter(|i| (from..to).contains(&i.second))
        {
            t.sent += i.sent;
            t.stored += i.stored;
            t.delivered += i.delivered;
        }
        // The run may have ended inside the window's last second.
        let end = if self.duration_s > to as f64 - 1.0 && self.duration_s < to as f64 {
            self.duration_s
        } else {
            to as f64
        };
        t.seconds = round3(end - from as f64);
        t.sent_per_s = rate(t.sent, t.seconds);
        t.stored_per_s = rate(t.stored, t.seconds);
        t.delivered_per_s = rate(t.delivered, t.seconds);
        self.throughput = t;
        self.measured_latency = self.window_latency(from, to)?;
        if let Some(step) = &self.step {
            let windows: Vec<StepWindow> = step
                .steps
                .iter()
                .map(|s| StepWindow {
                    rate: s.rate,
                    from_s: s.from_s,
                    to_s: s.to_s,
                })
                .collect();
            let threshold = Duration::from_micros(step.threshold_us);
            self.evaluate_steps(&windows, threshold)?;
        }
        Ok(())
    }
}

/// Merges the partial reports of the workers of one run, exactly:
/// histograms are added, counts summed, timelines aligned by second index,
/// and every summary is recomputed from the merged histograms.
pub fn merge(parts: Vec<Report>) -> Result<Report> {
    let first = parts.first().ok_or(ReportError::Empty)?;
    for p in &parts {
        if p.schema != SCHEMA {
            return Err(ReportError::Schema {
                found: p.schema.clone(),
            });
        }
        check_same_run(first, p)?;
    }

    let mut meta = first.meta.clone();
    let mut workers: Vec<WorkerInfo> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut counts = Counts::default();
    let mut notes: Vec<String> = Vec::new();
    meta.devices = 0;
    meta.load.target_rate = Some(0.0);
    meta.worker.count = 0;
    for p in &parts {
        let infos = if p.workers.is_empty() {
            vec![WorkerInfo {
                index: p.meta.worker.index,
                devices: p.meta.devices,
                started_at_unix_ms: p.meta.started_at_unix_ms,
                duration_s: p.duration_s,
                machine: p.meta.machine.clone(),
            }]
        } else {
            p.workers.clone()
        };
        for w in infos {
            if !seen.insert(w.index) {
                return Err(ReportError::DuplicateWorker(w.index));
            }
            workers.push(w);
        }
        meta.devices += p.meta.devices;
        meta.load.target_rate = match (meta.load.target_rate, p.meta.load.target_rate) {
            (Some(a), Some(b)) => Some(round3(a + b)),
            _ => None,
        };
        meta.worker.index = meta.worker.index.min(p.meta.worker.index);
        meta.worker.count = meta.worker.count.max(p.meta.worker.count);
        meta.started_at_unix_ms = meta.started_at_unix_ms.min(p.meta.started_at_unix_ms);
        for n in &p.meta.notes {
            if !notes.contains(n) {
                notes.push(n.clone());
            }
        }
        counts.add(&p.counts);
    }
    workers.sort_by_key(|w| w.index);
    if (workers.len() as u64) < u64::from(meta.worker.count) {
        notes.push(format!(
            "partial merge: {} of {} workers",
            workers.len(),
            meta.worker.count
        ));
    }
    let starts = workers.iter().map(|w| w.started_at_unix_ms);
    if let (Some(lo), Some(hi)) = (starts.clone().min(), starts.max())
        && hi - lo > 1000
    {
        notes.push(format!(
            "worker start times differ by {} ms; timelines are aligned by second index",
            hi - lo
        ));
    }
    meta.notes = notes;

    let mut histograms = BTreeMap::new();
    for m in Metric::ALL {
        let mut acc: Option<Histogram<u64>> = None;
        for p in &parts {
            if let Some(s) = p.histograms.get(&m) {
                let h = decode_histogram(s, m.name())?;
                add_histogram(acc.get_or_insert_with(new_histogram), &h, m.name())?;
            }
        }
        if let Some(h) = acc {
            histograms.insert(m, encode_histogram(&h)?);
        }
    }

    let mut by_second: BTreeMap<u64, Vec<&Interval>> = BTreeMap::new();
    for p in &parts {
        for i in &p.timeline {
            by_second.entry(i.second).or_default().push(i);
        }
    }
    let len = by_second.keys().next_back().map_or(0, |s| s + 1);
    let mut timeline = Vec::with_capacity(len as usize);
    for second in 0..len {
        let mut c = Interval::default();
        let mut hists: BTreeMap<Metric, Histogram<u64>> = BTreeMap::new();
        for i in by_second.get(&second).into_iter().flatten() {
            c.add_counts(i);
            for (m, s) in &i.histograms {
                let what = format!("{} at second {second}", m.name());
                let h = decode_histogram(s, &what)?;
                add_histogram(hists.entry(*m).or_insert_with(new_histogram), &h, &what)?;
            }
        }
        timeline.push(Interval::from_histograms(second, &c, &hists)?);
    }

    let step = match &first.step {
        None => None,
        Some(s0) => {
            let mut steps = s0.steps.clone();
            for p in parts.iter().skip(1) {
                if let Some(s) = &p.step {
                    for (a, b) in steps.iter_mut().zip(&s.steps) {
                        a.rate = round3(a.rate + b.rate);
                    }
                }
            }
            Some(StepReport {
                threshold_us: s0.threshold_us,
                steps,
                ..StepReport::default()
            })
        }
    };
    let setup =
        parts
            .iter()
            .filter_map(|p| p.setup.as_ref())
            .fold(None, |acc: Option<SetupReport>, s| {
                let (devices, seconds) = match acc {
                    None => (s.devices, s.seconds),
                    Some(a) => (a.devices + s.devices, a.seconds.max(s.seconds)),
                };
                Some(SetupReport {
                    devices,
                    seconds,
                    devices_per_second: rate(devices, seconds),
                })
            });

    let mut merged = Report {
        schema: SCHEMA.to_owned(),
        meta,
        workers,
        duration_s: parts.iter().map(|p| p.duration_s).fold(0.0, f64::max),
        counts,
        histograms,
        timeline,
        server_metrics: parts.iter().find_map(|p| p.server_metrics.clone()),
        step,
        setup,
        ..Report::default()
    };
    merged.recompute()?;
    Ok(merged)
}

fn check_same_run(a: &Report, b: &Report) -> Result<()> {
    fn differ<T: PartialEq + std::fmt::Debug>(field: &'static str, a: T, b: T) -> Result<()> {
        if a == b {
            Ok(())
        } else {
            Err(ReportError::Mismatch {
                field,
                a: format!("{a:?}"),
                b: format!("{b:?}"),
            })
        }
    }
    let (x, y) = (&a.meta, &b.meta);
    differ("scenario", &x.scenario, &y.scenario)?;
    differ("load.mode", x.load.mode, y.load.mode)?;
    differ("load.warmup_s", x.load.warmup_s, y.load.warmup_s)?;
    differ("load.measure_s", x.load.measure_s, y.load.measure_s)?;
    differ("crypto", x.crypto, y.crypto)?;
    differ("target", &x.target, &y.target)?;
    let windows = |r: &Report| {
        r.step.as_ref().map(|s| {
            let w: Vec<(u64, u64)> = s.steps.iter().map(|s| (s.from_s, s.to_s)).collect();
            (s.threshold_us, w)
        })
    };
    differ("step (threshold, windows)", windows(a), windows(b))
}

fn rate(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        round3(n as f64 / seconds)
    } else {
        0.0
    }
}

/// Rounds to 3 decimals. Computed floats in a report are rounded so that
/// they survive a JSON round trip bit for bit.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A duration in whole microseconds, at least 1, at most [`HIGHEST_US`].
pub fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(LOWEST_US, HIGHEST_US)
}

/// An empty latency histogram: 1 µs .. 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGFIG) {
        Ok(h) => h,
        // The bounds are constants within hdrhistogram's preconditions
        // (low ≥ 1, high ≥ 2·low, sigfig ≤ 5); a unit test creates one.
        Err(e) => unreachable!("constant histogram bounds rejected: {e:?}"),
    }
}

/// V2 deflate serialization, base64 (standard alphabet, padded).
pub fn encode_histogram(h: &Histogram<u64>) -> Result<String> {
    let mut buf = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| ReportError::Histogram {
            what: "encoding".to_owned(),
            reason: format!("{e:?}"),
        })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// Decodes [`encode_histogram`]'s output; refuses histograms whose precision
/// differs from this build's, whose sums would not be exact.
pub fn decode_histogram(s: &str, what: &str) -> Result<Histogram<u64>> {
    let err = |reason: String| ReportError::Histogram {
        what: what.to_owned(),
        reason,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| err(format!("base64: {e}")))?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| err(format!("{e:?}")))?;
    if h.sigfig() != SIGFIG || h.low() != LOWEST_US {
        return Err(err(format!(
            "precision {} digits from {} µs; expected {SIGFIG} digits from {LOWEST_US} µs",
            h.sigfig(),
            h.low()
        )));
    }
    Ok(h)
}

fn add_histogram(acc: &mut Histogram<u64>, h: &Histogram<u64>, what: &str) -> Result<()> {
    acc.add(h).map_err(|e| ReportError::Histogram {
        what: what.to_owned(),
        reason: format!("{e:?}"),
    })
}

/// Microseconds for people: `850µs`, `3.1ms`, `12.4ms`, `1.25s`.
pub fn format_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.1}ms", us / 1_000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Map keyed by [`Metric`] that skips metrics this build does not know
/// (written by a newer version) instead of failing.
mod metric_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer};

    use crate::measure::Metric;

    pub fn deserialize<'de, D, T>(d: D) -> Result<BTreeMap<Metric, T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let raw: BTreeMap<String, T> = BTreeMap::deserialize(d)?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| Metric::from_name(&k).map(|m| (m, v)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bounds_are_valid_and_round_trip() {
        let mut h = new_histogram();
        for v in [1, 7, 1_000, 123_456, HIGHEST_US] {
            h.record(v).unwrap();
        }
        let back = decode_histogram(&encode_histogram(&h).unwrap(), "t").unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn other_precision_is_refused() {
        let h = Histogram::<u64>::new_with_bounds(1, HIGHEST_US, 2).unwrap();
        let s = encode_histogram(&h).unwrap();
        assert!(decode_histogram(&s, "t").is_err());
    }

    #[test]
    fn format_us_picks_units() {
        assert_eq!(format_us(850.0), "850µs");
        assert_eq!(format_us(3_100.0), "3.1ms");
        assert_eq!(format_us(1_250_000.0), "1.25s");
    }

    #[test]
    fn unknown_modes_parse_as_other() {
        let m: LoadMode = serde_json::from_str("\"ramp\"").unwrap();
        assert_eq!(m, LoadMode::Other);
        let c: CryptoMode = serde_json::from_str("\"pre-encrypted\"").unwrap();
        assert_eq!(c, CryptoMode::PreEncrypted);
    }

    fn timeline_report(per_second: &[(u64, u64, u64, &[u64])]) -> Report {
        let mut r = Report {
            schema: SCHEMA.to_owned(),
            duration_s: per_second.len() as f64,
            ..Report::default()
        };
        for (s, (sent, errors, dropped, lat)) in per_second.iter().enumerate() {
            let mut h = new_histogram();
            for v in *lat {
                h.record(*v).unwrap();
            }
            let c = Interval {
                sent: *sent,
                errors: *errors,
                dropped: *dropped,
                ..Interval::default()
            };
            let hists = BTreeMap::from([(Metric::SendToDelivered, h)]);
            r.timeline
                .push(Interval::from_histograms(s as u64, &c, &hists).unwrap());
        }
        r
    }

    #[test]
    fn steps_find_the_knee() {
        let mut r = timeline_report(&[
            (10, 0, 0, &[1_000, 2_000]),
            (20, 0, 0, &[3_000, 4_000]),
            (40, 0, 0, &[90_000]),
            (80, 2, 0, &[5_000]),
        ]);
        let w = |rate, s| StepWindow {
            rate,
            from_s: s,
            to_s: s + 1,
        };
        r.evaluate_steps(
            &[w(10.0, 0), w(20.0, 1), w(40.0, 2), w(80.0, 3)],
            Duration::from_millis(10),
        )
        .unwrap();
        let s = r.step.unwrap();
        assert_eq!(s.knee_rate, Some(20.0));
        assert_eq!(s.broke_at_rate, Some(40.0));
        assert!(!s.steps[3].held, "errors fail a step");
        assert_eq!(s.steps[3].errors, 2);
    }

    #[test]
    fn throughput_uses_the_measured_window() {
        let mut r = timeline_report(&[
            (5, 0, 0, &[]),
            (10, 0, 0, &[]),
            (10, 0, 0, &[]),
            (1, 0, 0, &[]),
        ]);
        r.meta.load.warmup_s = 1.0;
        r.meta.load.measure_s = 2.0;
        r.recompute().unwrap();
        assert_eq!((r.throughput.from_s, r.throughput.to_s), (1, 3));
        assert_eq!(r.throughput.sent, 20);
        assert_eq!(r.throughput.sent_per_s, 10.0);
    }
}
