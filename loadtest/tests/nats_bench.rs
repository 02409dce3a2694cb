//! `chappe-loadtest nats` against a real nats-server: two processes, every
//! measurement, a report with a rate for each.

use std::process::Command;

use chappe_loadtest::nats_bench::{Measurement, NatsBenchReport};
use chappe_testkit::NatsServer;

#[test]
fn nats_bench_measures_every_operation_between_two_processes() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nats.json");
    let output = Command::new(env!("CARGO_BIN_EXE_chappe-loadtest"))
        .args(["nats", "--url", &server.url()])
        .args(["--duration", "1s", "--warmup", "200ms"])
        .args(["--concurrency", "8", "--payload", "128"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running chappe-loadtest nats");
    assert!(
        output.status.success(),
        "chappe-loadtest nats failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report = NatsBenchReport::from_json(&std::fs::read_to_string(&out).unwrap()).unwrap();

    assert_eq!(report.results.len(), Measurement::ALL.len());
    for m in Measurement::ALL {
        let r = report
            .result(1, m)
            .unwrap_or_else(|| panic!("{m:?} measured"));
        assert!(r.operations > 0, "{m:?}: {r:?}");
        assert!(r.per_second > 0.0, "{m:?}: {r:?}");
        assert_eq!(r.errors, 0, "{m:?}: {r:?}");
        match m {
            Measurement::Publish | Measurement::BusPublish => {
                let sent = r.sent.expect("publishes count what they sent");
                assert!(sent >= r.operations, "{m:?}: received more than sent");
            }
            Measurement::Jobs => {
                // Latencies are the enqueues'; every job was acked in the end.
                let l = r.latency.as_ref().expect("latencies recorded");
                assert_eq!(Some(l.count), r.sent);
                assert!(r.drain_s.is_some() && r.backlog.is_some());
            }
            _ => {
                let l = r.latency.as_ref().expect("latencies recorded");
                assert_eq!(l.count, r.operations);
                assert!(l.p50_us > 0 && l.p50_us <= l.p99_us, "{m:?}: {l:?}");
            }
        }
    }
    // One ratio per pair, all positive.
    assert_eq!(report.ratios.len(), 3);
    assert!(
        report.ratios.iter().all(|r| r.rate > 0.0),
        "{:?}",
        report.ratios
    );
    assert!(report.to_text().contains("bus-request-reply"));
    assert!(!report.loadavg_before.is_empty());
}
