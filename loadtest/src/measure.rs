//! Measurement: a cheap, cloneable [`Recorder`] that the engine's tasks feed
//! concurrently with latencies and events, a [`Progress`] line for the
//! terminal, and [`Recorder::finish`] to turn it all into a [`Report`].
//!
//! Latencies go into HdrHistograms (µs, 1 µs .. 10 min, 3 significant
//! digits): one per metric for the whole run and, for send → stored and
//! send → delivered, one per second of the timeline. Seconds older than the
//! previous one are sealed (serialized) so that memory stays flat on long
//! runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::report::{
    Counts, Interval, Report, RunMeta, SCHEMA, WorkerInfo, decode_histogram, duration_us,
    encode_histogram, format_us, new_histogram, round3,
};

/// Longest timeline kept: 7 days.
pub const MAX_SECONDS: u64 = 7 * 86_400;

/// Live histograms by metric.
type Hists = BTreeMap<Metric, Histogram<u64>>;

/// What a latency measures.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// From the send call to the server's acknowledgement that it stored
    /// the message.
    SendToStored,
    /// From the send call to the message arriving at one recipient device
    /// (one sample per recipient device).
    SendToDelivered,
    /// Opening a device's connection to the gateway.
    Connect,
    /// A device catching up with what it missed.
    Sync,
    /// Establishing an end-to-end session with a peer device.
    SessionSetup,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::SendToStored,
        Metric::SendToDelivered,
        Metric::Connect,
        Metric::Sync,
        Metric::SessionSetup,
    ];

    /// The name used in JSON: `"send_to_delivered"`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::SendToStored => "send_to_stored",
            Metric::SendToDelivered => "send_to_delivered",
            Metric::Connect => "connect",
            Metric::Sync => "sync",
            Metric::SessionSetup => "session_setup",
        }
    }

    /// The name for people: `"send → delivered"`.
    pub fn label(self) -> &'static str {
        match self {
            Metric::SendToStored => "send → stored",
            Metric::SendToDelivered => "send → delivered",
            Metric::Connect => "connect",
            Metric::Sync => "sync",
            Metric::SessionSetup => "session setup",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the timeline keeps a histogram of this metric per second.
    pub fn in_timeline(self) -> bool {
        matches!(self, Metric::SendToStored | Metric::SendToDelivered)
    }
}

/// A counted event, for [`Recorder::count_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Sent,
    Stored,
    Delivered,
    Dropped,
    Late,
}

/// The canonical gRPC name of a status code: `"RESOURCE_EXHAUSTED"`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Collects the measurements of one process. Cloning is cheap; all clones
/// record into the same place.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    totals: Hists,
    counts: Counts,
    slots: Vec<Slot>,
    /// Highest slot index that received anything.
    newest: usize,
    connected: u64,
    notes: Vec<String>,
}

/// One second of the timeline: counts in `interval`; histograms live in
/// `live` until the slot is sealed, then encoded in `interval`.
struct Slot {
    interval: Interval,
    live: Option<Hists>,
}

impl Slot {
    fn new(second: u64) -> Self {
        Self {
            interval: Interval {
                second,
                ..Interval::default()
            },
            live: Some(BTreeMap::new()),
        }
    }

    /// The interval with its histograms encoded.
    fn snapshot(&self) -> Result<Interval, crate::report::ReportError> {
        match &self.live {
            Some(h) => Interval::from_histograms(self.interval.second, &self.interval, h),
            None => Ok(self.interval.clone()),
        }
    }
}

impl State {
    fn slot(&mut self, idx: usize) -> &mut Slot {
        if idx >= self.slots.len() {
            let from = self.slots.len();
            self.slots.extend((from..=idx).map(|s| Slot::new(s as u64)));
        }
        if idx > self.newest {
            self.newest = idx;
            self.seal_before(idx.saturating_sub(1));
        }
        let reopen = self.slots[idx].live.is_none();
        if reopen {
            self.reopen(idx);
        }
        &mut self.slots[idx]
    }

    /// Encodes the histograms of every live slot before `end`.
    fn seal_before(&mut self, end: usize) {
        for slot in &mut self.slots[..end] {
            if slot.live.is_none() {
                continue;
            }
            match slot.snapshot() {
                Ok(i) => {
                    slot.interval = i;
                    slot.live = None;
                }
                Err(e) => {
                    let n = format!("second {} kept unsealed: {e}", slot.interval.second);
                    self.notes.push(n);
                }
            }
        }
    }

    /// Decodes a sealed slot so that a late sample can be added to it.
    fn reopen(&mut self, idx: usize) {
        let slot = &mut self.slots[idx];
        let mut live = BTreeMap::new();
        for (m, s) in std::mem::take(&mut slot.interval.histograms) {
            match decode_histogram(&s, m.name()) {
                Ok(h) => {
                    live.insert(m, h);
                }
                Err(e) => self.notes.push(format!(
                    "second {}: samples of {} lost: {e}",
                    slot.interval.second,
                    m.name()
                )),
            }
        }
        slot.interval.latency.clear();
        slot.live = Some(live);
    }
}

/// For the live line on the terminal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub elapsed: Duration,
    /// Sends in the last complete second.
    pub sent_per_s: f64,
    /// Deliveries in the last complete second.
    pub delivered_per_s: f64,
    /// send → delivered over the whole run so far.
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub errors: u64,
    pub connected: u64,
    pub dropped: u64,
    pub late: u64,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lat = |d: Option<Duration>| {
            d.map_or_else(|| "-".to_owned(), |d| format_us(d.as_micros() as f64))
        };
        write!(
            f,
            "{:>4}s  sent {:.0}/s  delivered {:.0}/s  p50 {}  p99 {}  errors {}  devices {}",
            self.elapsed.as_secs(),
            self.sent_per_s,
            self.delivered_per_s,
            lat(self.p50),
            lat(self.p99),
            self.errors,
            self.connected
        )?;
        if self.dropped > 0 {
            write!(f, "  dropped {}", self.dropped)?;
        }
        if self.late > 0 {
            write!(f, "  late {}", self.late)?;
        }
        Ok(())
    }
}

impl Recorder {
    /// `origin` is second 0 of the timeline.
    pub fn new(origin: Instant) -> Self {
        Self {
            inner: Arc::new(Inner {
                origin,
                state: Mutex::new(State::default()),
            }),
        }
    }

    pub fn origin(&self) -> Instant {
        self.inner.origin
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind,
        // still worth reporting.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The timeline second of `at`; a time beyond [`MAX_SECONDS`] is filed
    /// in the last second.
    fn index(&self, at: Instant) -> usize {
        let s = at.saturating_duration_since(self.inner.origin).as_secs();
        usize::try_from(s.min(MAX_SECONDS)).unwrap_or(0)
    }

    /// Records a latency now. Latencies are kept in whole µs, 1 µs .. 10 min.
    pub fn record(&self, metric: Metric, latency: Duration) {
        let mut st = self.lock();
        let idx = self.index(Instant::now());
        record_locked(&mut st, metric, latency, idx);
    }

    /// Records a latency as if it completed at `at`.
    pub fn record_at(&self, metric: Metric, latency: Duration, at: Instant) {
        let mut st = self.lock();
        record_locked(&mut st, metric, latency, self.index(at));
    }

    pub fn sent(&self) {
        self.count(Event::Sent);
    }
    pub fn stored(&self) {
        self.count(Event::Stored);
    }
    pub fn delivered(&self) {
        self.count(Event::Delivered);
    }
    pub fn dropped(&self) {
        self.count(Event::Dropped);
    }
    pub fn late(&self) {
        self.count(Event::Late);
    }

    fn count(&self, event: Event) {
        let mut st = self.lock();
        let idx = self.index(Instant::now());
        count_locked(&mut st, event, idx);
    }

    /// Counts an event as if it happened at `at`.
    pub fn count_at(&self, event: Event, at: Instant) {
        let mut st = self.lock();
        count_locked(&mut st, event, self.index(at));
    }

    /// Adds `n` to the deliveries the sends should cause (recipient devices
    /// of a message, the sender's other devices included if they get it).
    pub fn expect_deliveries(&self, n: u64) {
        self.lock().counts.expected_deliveries += n;
    }

    /// Counts a failed call by its gRPC status name.
    pub fn error(&self, code: tonic::Code) {
        self.error_kind(code_name(code));
    }

    /// Counts a failure that is not a gRPC status, by a name of the engine's
    /// choosing (`"DELIVERY_TIMEOUT"`, `"DECRYPT_FAILED"`).
    pub fn error_kind(&self, kind: &str) {
        let mut st = self.lock();
        let idx = self.index(Instant::now());
        error_locked(&mut st, kind, idx);
    }

    /// Counts a failure as if it happened at `at`.
    pub fn error_at(&self, kind: &str, at: Instant) {
        let mut st = self.lock();
        error_locked(&mut st, kind, self.index(at));
    }

    pub fn set_connected(&self, n: u64) {
        self.lock().connected = n;
    }

    pub fn progress(&self) -> Progress {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.inner.origin);
        let st = self.lock();
        let idx = self.index(now);
        let (sent_per_s, delivered_per_s) = if idx >= 1 {
            st.slots.get(idx - 1).map_or((0.0, 0.0), |s| {
                (s.interval.sent as f64, s.interval.delivered as f64)
            })
        } else {
            let secs = elapsed.as_secs_f64();
            match st.slots.first() {
                Some(s) if secs > 0.0 => (
                    s.interval.sent as f64 / secs,
                    s.interval.delivered as f64 / secs,
                ),
                _ => (0.0, 0.0),
            }
        };
        let h = st.totals.get(&Metric::SendToDelivered);
        let q = |q: f64| {
            h.filter(|h| !h.is_empty())
                .map(|h| Duration::from_micros(h.value_at_quantile(q)))
        };
        Progress {
            elapsed,
            sent_per_s,
            delivered_per_s,
            p50: q(0.5),
            p99: q(0.99),
            errors: st.counts.errors,
            connected: st.connected,
            dropped: st.counts.dropped,
            late: st.counts.late,
        }
    }

    /// A complete report of this process. May be called while tasks still
    /// record; it then reports what was recorded until now.
    pub fn finish(&self, meta: RunMeta) -> Report {
        let elapsed = self.inner.origin.elapsed();
        let (totals, counts, mut slots, mut notes) = {
            let st = self.lock();
            let slots: Vec<(Interval, Option<Hists>)> = st
                .slots
                .iter()
                .map(|s| (s.interval.clone(), s.live.clone()))
                .collect();
            (
                st.totals.clone(),
                st.counts.clone(),
                slots,
                st.notes.clone(),
            )
        };
        let len = usize::try_from(elapsed.as_secs_f64().ceil() as u64).unwrap_or(usize::MAX);
        while slots.len() < len {
            let second = slots.len() as u64;
            slots.push((
                Interval {
                    second,
                    ..Interval::default()
                },
                None,
            ));
        }
        let mut timeline = Vec::with_capacity(slots.len());
        for (interval, live) in slots {
            match live {
                None => timeline.push(interval),
                Some(h) => match Interval::from_histograms(interval.second, &interval, &h) {
                    Ok(i) => timeline.push(i),
                    Err(e) => {
                        notes.push(format!("second {}: latency lost: {e}", interval.second));
                        timeline.push(Interval {
                            latency: BTreeMap::new(),
                            histograms: BTreeMap::new(),
                            ..interval
                        });
                    }
                },
            }
        }
        let mut histograms = BTreeMap::new();
        for (m, h) in &totals {
            match encode_histogram(h) {
                Ok(s) => {
                    histograms.insert(*m, s);
                }
                Err(e) => notes.push(format!("{}: latency lost: {e}", m.name())),
            }
        }
        let duration_s = round3(elapsed.as_secs_f64());
        let mut meta = meta;
        meta.notes.extend(notes);
        let mut report = Report {
            schema: SCHEMA.to_owned(),
            workers: vec![WorkerInfo {
                index: meta.worker.index,
                devices: meta.devices,
                started_at_unix_ms: meta.started_at_unix_ms,
                duration_s,
                machine: meta.machine.clone(),
            }],
            meta,
            duration_s,
            counts,
            histograms,
            timeline,
            ..Report::default()
        };
        if let Err(e) = report.recompute() {
            report.meta.notes.push(format!("summaries incomplete: {e}"));
        }
        report
    }
}

fn record_locked(st: &mut State, metric: Metric, latency: Duration, idx: usize) {
    let us = duration_us(latency);
    st.totals
        .entry(metric)
        .or_insert_with(new_histogram)
        .saturating_record(us);
    if metric.in_timeline()
        && let Some(live) = &mut st.slot(idx).live
    {
        live.entry(metric)
            .or_insert_with(new_histogram)
            .saturating_record(us);
    }
}

fn count_locked(st: &mut State, event: Event, idx: usize) {
    let c = &mut st.counts;
    match event {
        Event::Sent => c.sent += 1,
        Event::Stored => c.stored += 1,
        Event::Delivered => c.delivered += 1,
        Event::Dropped => c.dropped += 1,
        Event::Late => c.late += 1,
    }
    let i = &mut st.slot(idx).interval;
    match event {
        Event::Sent => i.sent += 1,
        Event::Stored => i.stored += 1,
        Event::Delivered => i.delivered += 1,
        Event::Dropped => i.dropped += 1,
        Event::Late => i.late += 1,
    }
}

fn error_locked(st: &mut State, kind: &str, idx: usize) {
    st.counts.errors += 1;
    match st.counts.errors_by_status.get_mut(kind) {
        Some(n) => *n += 1,
        None => {
            st.counts.errors_by_status.insert(kind.to_owned(), 1);
        }
    }
    st.slot(idx).interval.errors += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_names() {
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn metric_names_match_serde() {
        for m in Metric::ALL {
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
            assert_eq!(Metric::from_name(m.name()), Some(m));
        }
    }

    #[test]
    fn old_seconds_are_sealed_and_reopened_exactly() {
        let origin = Instant::now();
        let r = Recorder::new(origin);
        let at = |s: u64| origin + Duration::from_millis(s * 1000 + 500);
        r.record_at(Metric::SendToDelivered, Duration::from_millis(3), at(0));
        r.record_at(Metric::SendToDelivered, Duration::from_millis(5), at(5));
        {
            let st = r.lock();
            assert!(st.slots[0].live.is_none(), "second 0 sealed");
            assert!(st.slots[4].live.is_some() && st.slots[5].live.is_some());
        }
        // A late sample for a sealed second still lands in it.
        r.record_at(Metric::SendToDelivered, Duration::from_millis(7), at(0));
        r.count_at(Event::Sent, at(0));
        let rep = r.finish(RunMeta::default());
        let s0 = &rep.timeline[0];
        assert_eq!(s0.sent, 1);
        assert_eq!(s0.latency[&Metric::SendToDelivered].count, 2);
        assert_eq!(rep.latency[&Metric::SendToDelivered].count, 3);
        assert!(rep.timeline.len() >= 6);
    }

    #[test]
    fn progress_line_reads_well() {
        let p = Progress {
            elapsed: Duration::from_secs(12),
            sent_per_s: 980.0,
            delivered_per_s: 1960.0,
            p50: Some(Duration::from_micros(3_100)),
            p99: Some(Duration::from_micros(12_400)),
            errors: 0,
            connected: 200,
            ..Progress::default()
        };
        assert_eq!(
            p.to_string(),
            "  12s  sent 980/s  delivered 1960/s  p50 3.1ms  p99 12.4ms  errors 0  devices 200"
        );
        let r = Recorder::new(Instant::now());
        r.sent();
        r.error(tonic::Code::Unavailable);
        let p = r.progress();
        assert_eq!((p.errors, p.p50), (1, None));
    }
}
