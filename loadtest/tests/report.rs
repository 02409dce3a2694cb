//! The measurement and reporting layer at its boundary: recorders fed with
//! samples, reports merged, written, read, rendered and compared.

use std::time::{Duration, Instant};

use chappe_loadtest::compare::compare;
use chappe_loadtest::html::render;
use chappe_loadtest::measure::{Event, Metric, Recorder};
use chappe_loadtest::report::{
    self, LoadMode, LoadModel, Machine, Report, RunMeta, SCHEMA, StepWindow, Summary, Worker,
    duration_us, merge, new_histogram,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECONDS: u64 = 6;

fn meta(index: u32, devices: u64) -> RunMeta {
    RunMeta {
        scenario: "group-chat".to_owned(),
        parameters: serde_json::json!({"group_size": 5, "message_bytes": 200}),
        load: LoadModel {
            mode: LoadMode::Open,
            target_rate: Some(100.0),
            warmup_s: 1.0,
            measure_s: 4.0,
            drain_s: 1.0,
            late_threshold_us: 10_000,
            ..LoadModel::default()
        },
        target: "embedded".to_owned(),
        devices,
        worker: Worker { index, count: 2 },
        started_at_unix_ms: report::unix_ms_now(),
        machine: Machine::detect(),
        ..RunMeta::default()
    }
}

/// A recorder whose origin lies `SECONDS` in the past, so that samples can
/// be placed in each second of the timeline.
fn recorder() -> (Recorder, Instant) {
    let origin = Instant::now()
        .checked_sub(Duration::from_secs(SECONDS))
        .expect("monotonic clock far enough from its start");
    (Recorder::new(origin), origin)
}

/// Latency log-uniform between 50 µs and 3 s, to exercise many buckets.
fn latency(rng: &mut StdRng) -> Duration {
    let exp: f64 = rng.random_range(50f64.ln()..3_000_000f64.ln());
    Duration::from_micros(exp.exp() as u64)
}

struct Fed {
    report: Report,
}

/// Feeds one or both recorders (the sample goes to `a` or `b` at random;
/// `all` gets every sample) and returns the three reports.
fn feed() -> (Fed, Fed, Fed) {
    let (a, origin) = recorder();
    let b = Recorder::new(origin);
    let all = Recorder::new(origin);
    let mut rng = StdRng::seed_from_u64(7);
    for second in 0..SECONDS {
        for k in 0..2_000u64 {
            let at = origin + Duration::from_secs(second) + Duration::from_micros(k * 400);
            let to = if rng.random_bool(0.4) { &a } else { &b };
            let metric = match k % 7 {
                0 => Metric::SendToStored,
                1 if second == 0 => Metric::Connect,
                2 if second == 0 => Metric::SessionSetup,
                3 if second == 1 => Metric::Sync,
                _ => Metric::SendToDelivered,
            };
            let l = latency(&mut rng);
            for r in [to, &all] {
                r.record_at(metric, l, at);
                if k % 10 == 0 {
                    r.count_at(Event::Sent, at);
                    r.count_at(Event::Stored, at);
                    r.expect_deliveries(4);
                }
                if k % 3 == 0 {
                    r.count_at(Event::Delivered, at);
                }
                if k == 1_999 && second == 3 {
                    r.error_at("RESOURCE_EXHAUSTED", at);
                    r.count_at(Event::Dropped, at);
                }
            }
        }
    }
    a.error(tonic::Code::Unavailable);
    all.error(tonic::Code::Unavailable);
    b.late();
    all.late();
    (
        Fed {
            report: a.finish(meta(0, 10)),
        },
        Fed {
            report: b.finish(meta(1, 15)),
        },
        Fed {
            report: all.finish(meta(0, 25)),
        },
    )
}

fn key(s: &Summary) -> (u64, u64, u64, u64, u64, u64, u64) {
    (
        s.count, s.min_us, s.p50_us, s.p90_us, s.p99_us, s.p99_9_us, s.max_us,
    )
}

#[test]
fn merge_is_exact() {
    let (a, b, all) = feed();
    let (a, b, all) = (a.report, b.report, all.report);
    let merged = merge(vec![a.clone(), b.clone()]).unwrap();

    // Percentiles of the merge equal those of one histogram holding every sample.
    for m in Metric::ALL {
        let one = all.summary(m).unwrap();
        let got = merged.summary(m).unwrap();
        assert_eq!(key(got), key(one), "{m:?}");
        assert!((got.mean_us - one.mean_us).abs() < 0.01, "{m:?} mean");
    }
    // The same, against a histogram built here from the JSON of `all`.
    let h = all.histogram(Metric::SendToDelivered).unwrap().unwrap();
    let mut direct = new_histogram();
    direct.add(&h).unwrap();
    assert_eq!(
        key(&Summary::of(&direct).unwrap()),
        key(merged.summary(Metric::SendToDelivered).unwrap())
    );
    assert_eq!(
        merged.histograms, all.histograms,
        "merged histograms are identical"
    );

    // Counts add up.
    let c = &merged.counts;
    assert_eq!(c.sent, a.counts.sent + b.counts.sent);
    assert_eq!(c.sent, all.counts.sent);
    assert_eq!(c.delivered, all.counts.delivered);
    assert_eq!(c.expected_deliveries, all.counts.expected_deliveries);
    assert_eq!(c.errors, 2);
    assert_eq!(c.errors_by_status["RESOURCE_EXHAUSTED"], 1);
    assert_eq!(c.errors_by_status["UNAVAILABLE"], 1);
    assert_eq!(c.late, 1);
    assert_eq!(c.dropped, 1);

    // The timeline: aligned by second, each second exact.
    assert_eq!(merged.timeline.len(), all.timeline.len());
    for (m, x) in merged.timeline.iter().zip(&all.timeline) {
        assert_eq!(m.second, x.second);
        assert_eq!(
            (m.sent, m.stored, m.delivered, m.errors, m.dropped),
            (x.sent, x.stored, x.delivered, x.errors, x.dropped)
        );
        assert_eq!(m.histograms, x.histograms, "second {}", m.second);
        for metric in [Metric::SendToStored, Metric::SendToDelivered] {
            assert_eq!(
                m.latency.get(&metric).map(key),
                x.latency.get(&metric).map(key)
            );
        }
    }
    let sum: u64 = merged.timeline.iter().map(|i| i.sent).sum();
    assert_eq!(sum, c.sent);
    let sum: u64 = merged.timeline.iter().map(|i| i.delivered).sum();
    assert_eq!(sum, c.delivered);
    let per_second: u64 = merged
        .timeline
        .iter()
        .filter_map(|i| i.latency.get(&Metric::SendToDelivered))
        .map(|s| s.count)
        .sum();
    assert_eq!(
        per_second,
        merged.summary(Metric::SendToDelivered).unwrap().count
    );

    // Measured phase: seconds 1..5.
    assert_eq!((merged.throughput.from_s, merged.throughput.to_s), (1, 5));
    assert_eq!(merged.throughput.sent, 4 * 200);
    assert_eq!(merged.throughput.sent_per_s, 200.0);
    assert_eq!(
        merged
            .measured_latency
            .get(&Metric::SendToDelivered)
            .map(key),
        all.measured_latency.get(&Metric::SendToDelivered).map(key)
    );

    // Meta combined.
    assert_eq!(merged.meta.devices, 25);
    assert_eq!(merged.meta.load.target_rate, Some(200.0));
    assert_eq!(
        merged.workers.iter().map(|w| w.index).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(merged.meta.worker.count, 2);
    assert!(!merged.accounting_ok());

    // Merging is associative with already merged reports, and refuses
    // double counting.
    let again = merge(vec![merged.clone()]).unwrap();
    assert_eq!(again.histograms, merged.histograms);
    assert!(merge(vec![a.clone(), a.clone()]).is_err());
    let mut other = b.clone();
    other.meta.scenario = "one-to-one".to_owned();
    assert!(merge(vec![a, other]).is_err());
    assert!(merge(vec![]).is_err());
}

#[test]
fn steps_merge_by_summed_rate() {
    let (a, b, _) = feed();
    let windows = |rate: f64| {
        (0..SECONDS)
            .map(|s| StepWindow {
                rate: rate * (s + 1) as f64,
                from_s: s,
                to_s: s + 1,
            })
            .collect::<Vec<_>>()
    };
    let mut a = a.report;
    let mut b = b.report;
    a.evaluate_steps(&windows(10.0), Duration::from_secs(10))
        .unwrap();
    b.evaluate_steps(&windows(15.0), Duration::from_secs(10))
        .unwrap();
    let m = merge(vec![a, b]).unwrap();
    let s = m.step.unwrap();
    assert_eq!(s.steps.len(), SECONDS as usize);
    assert_eq!(s.steps[0].rate, 25.0);
    // Second 3 holds the injected errors: the knee is the step before.
    assert!(s.steps[..3].iter().all(|s| s.held));
    assert!(!s.steps[3].held);
    assert_eq!(s.knee_rate, Some(75.0));
    assert_eq!(s.broke_at_rate, Some(100.0));
}

#[test]
fn json_round_trip() {
    let (a, _, _) = feed();
    let mut r = a.report;
    r.server_metrics = Some(serde_json::json!({"fanout_queue_depth": 3}));
    r.setup = Some(report::SetupReport::new(10, Duration::from_millis(2_500)));
    r.evaluate_steps(
        &[StepWindow {
            rate: 10.0,
            from_s: 1,
            to_s: 3,
        }],
        Duration::from_millis(50),
    )
    .unwrap();
    let json = r.to_json_pretty().unwrap();
    let back = Report::from_json(&json).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.to_json_pretty().unwrap(), json);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["schema"], SCHEMA);
    assert!(v["latency"]["send_to_delivered"]["p99_9_us"].is_u64());
    assert!(v["histograms"]["send_to_delivered"].is_string());
    assert!(v["timeline"][0]["sent"].is_u64());
}

#[test]
fn newer_report_with_extra_fields_parses() {
    let (a, _, _) = feed();
    let mut v = serde_json::to_value(&a.report).unwrap();
    v["a_field_from_the_future"] = serde_json::json!({"x": 1});
    v["counts"]["retries"] = serde_json::json!(5);
    v["meta"]["load"]["mode"] = serde_json::json!("ramp");
    v["meta"]["machine"]["gpu"] = serde_json::json!("none");
    v["latency"]["key_fetch"] = v["latency"]["connect"].clone();
    v["histograms"]["key_fetch"] = v["histograms"]["connect"].clone();
    v["timeline"][0]["reconnects"] = serde_json::json!(2);
    let r = Report::from_json(&v.to_string()).unwrap();
    assert_eq!(r.counts, a.report.counts);
    assert_eq!(r.meta.load.mode, LoadMode::Other);
    assert_eq!(r.latency.len(), Metric::ALL.len());

    // An older report without the optional sections parses too.
    let mut v = serde_json::to_value(&a.report).unwrap();
    for k in [
        "server_metrics",
        "step",
        "setup",
        "measured_latency",
        "workers",
    ] {
        v.as_object_mut().unwrap().remove(k);
    }
    v["meta"].as_object_mut().unwrap().remove("notes");
    let r = Report::from_json(&v.to_string()).unwrap();
    assert!(r.step.is_none() && r.meta.notes.is_empty());

    // A breaking schema is refused.
    let mut v = serde_json::to_value(&a.report).unwrap();
    v["schema"] = serde_json::json!("chappe-loadtest/v2");
    assert!(Report::from_json(&v.to_string()).is_err());
}

#[test]
fn html_has_three_plots_and_escapes() {
    let (a, _, _) = feed();
    let mut r = a.report;
    r.meta.scenario = "<script>alert('x')</script>&".to_owned();
    r.meta.notes.push("<b>note</b>".to_owned());
    let page = render(&r);
    assert_eq!(page.matches("<svg").count(), 3, "three plots");
    assert!(!page.contains("<script>"), "scenario name escaped");
    assert!(!page.contains("<b>note"), "notes escaped");
    assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;"));
    assert!(page.contains("99.9%"), "log-scaled percentile axis");
    assert!(!page.contains("src="), "no external assets");

    // An empty report renders too.
    let empty = Recorder::new(Instant::now()).finish(RunMeta::default());
    assert_eq!(render(&empty).matches("<svg").count(), 3);
}

#[test]
fn compare_prints_ratios() {
    let (a, b, _) = feed();
    let (a, mut b) = (a.report, b.report);
    b.meta.load.target_rate = Some(200.0);
    let text = compare(&a, &b);
    assert!(text.contains("Parameters that differ"));
    assert!(
        text.contains("load.target_rate: A=100.0  B=200.0"),
        "{text}"
    );
    assert!(text.contains("devices"));
    let devices = text.lines().find(|l| l.starts_with("devices")).unwrap();
    assert!(devices.trim_end().ends_with("1.50"), "{devices}");
    assert!(text.contains("send → delivered p99"));
    assert!(text.contains("sent/s"));
    let same = compare(&a, &a);
    assert!(same.contains("Parameters: identical"));
    assert!(
        same.lines()
            .filter(|l| l.contains("p99"))
            .all(|l| l.ends_with("1.00"))
    );
}

#[test]
fn recorder_is_shared_across_tasks() {
    let r = Recorder::new(Instant::now());
    std::thread::scope(|s| {
        for _ in 0..4 {
            let r = r.clone();
            s.spawn(move || {
                for i in 0..1_000u64 {
                    r.sent();
                    r.record(Metric::SendToStored, Duration::from_micros(100 + i));
                }
            });
        }
    });
    r.set_connected(4);
    let p = r.progress();
    assert_eq!(p.connected, 4);
    let rep = r.finish(RunMeta::default());
    assert_eq!(rep.counts.sent, 4_000);
    assert_eq!(rep.summary(Metric::SendToStored).unwrap().count, 4_000);
    assert_eq!(rep.summary(Metric::SendToStored).unwrap().min_us, 100);
    assert_eq!(duration_us(Duration::from_nanos(10)), 1);
    assert_eq!(duration_us(Duration::from_secs(3600)), report::HIGHEST_US);
}
