//! `chappe-loadtest media` and `chappe-loadtest presence`, tiny, against
//! Chappe in processes of its own (nats-server, keydir, presence, media,
//! fanouts and gateways): the reports are complete and their figures sane.

use std::path::Path;
use std::process::Command;

use chappe_loadtest::media_bench::MediaBenchReport;
use chappe_loadtest::nats_bench::Measurement;
use chappe_loadtest::presence_bench::PresenceBenchReport;
use chappe_testkit::cluster::{Cluster, ClusterConfig};

/// The pid of the cluster's process running `program` (the one whose
/// command line holds `arg`, if given): found in /proc by its store path.
fn service_pid(cluster_dir: &Path, program: &str, arg: Option<&str>) -> u32 {
    let store = format!("CHAPPE_STORE={}", cluster_dir.join("chappe.db").display());
    let found = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let runs = |e: &std::path::PathBuf| e.file_name().is_some_and(|n| n == program);
            if !exe.as_ref().is_some_and(runs) {
                return false;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let has = |bytes: &[u8], s: &str| bytes.split(|&b| b == 0).any(|v| v == s.as_bytes());
            has(&environ, &store) && arg.is_none_or(|a| has(&cmdline, a))
        });
    found.unwrap_or_else(|| panic!("no {program} process of the cluster in /proc"))
}

fn loadtest(args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_chappe-loadtest"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running chappe-loadtest");
    assert!(
        output.status.success(),
        "chappe-loadtest {args:?} failed: {}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn media_and_presence_benches_measure_a_cluster() {
    let mut cluster = Cluster::start(ClusterConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let target = cluster.gateway_urls()[0].clone();
    let listen = target.trim_start_matches("http://").to_owned();
    let gateway = service_pid(cluster.dir(), "chappe-gateway", Some(&listen));
    let media = service_pid(cluster.dir(), "chappe-media", None);
    let presence = service_pid(cluster.dir(), "chappe-presence", None);
    let nats_url = cluster.nats().url();

    // 2 MiB up through a gateway and down again, its bytes verified.
    let out = dir.path().join("media.json");
    loadtest(&[
        "media",
        "--target",
        &target,
        "--size-mib",
        "2",
        "--pid",
        &format!("gateway={gateway}"),
        "--pid",
        &format!("media={media}"),
        "--dir",
        dir.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let report = MediaBenchReport::from_json(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(report.verified, "{report:?}");
    assert_eq!(report.size_bytes, 2 << 20);
    assert!(report.chunks >= 2, "{report:?}");
    assert_eq!(
        report.chunks_sent, report.chunks,
        "a fresh upload sends all"
    );
    assert!(report.upload.mib_per_s > 0.0 && report.download.mib_per_s > 0.0);
    let first_pass = report.upload.first_pass_seconds.expect("first pass timed");
    assert!(first_pass > 0.0 && first_pass < report.upload.seconds);
    let names: Vec<_> = report.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["loadtest", "gateway", "media"]);
    for p in &report.processes {
        assert!(p.rss_before > 0, "{p:?}");
        assert!(p.peak >= p.rss_before, "{p:?}");
        assert_eq!(p.growth, p.peak as i64 - p.rss_before as i64);
        for phase in [&p.upload, &p.download] {
            assert!(phase.samples > 0, "{p:?}");
            assert!(phase.peak().is_some_and(|peak| peak > 0), "{p:?}");
            assert!(phase.cpu_s.is_some_and(|s| s >= 0.0), "{p:?}");
        }
    }
    // Nothing left behind in the directory it was given.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // Heartbeats to the running presence service, and the reference.
    let out = dir.path().join("presence.json");
    loadtest(&[
        "presence",
        "--nats",
        &nats_url,
        "--callers",
        "4",
        "--users",
        "50",
        "--duration-s",
        "2",
        "--warmup-s",
        "0.5",
        "--pid",
        &format!("presence={presence}"),
        "--out",
        out.to_str().unwrap(),
    ]);
    let report = PresenceBenchReport::from_json(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert!(
        report.updates > 0 && report.updates_per_s > 0.0,
        "{report:?}"
    );
    let latency = report.latency.as_ref().expect("latencies recorded");
    assert_eq!(latency.count, report.updates);
    assert!(latency.p50_us > 0 && latency.p50_us <= latency.p99_us);
    for m in [
        Measurement::RequestReply,
        Measurement::BusRequestReply,
        Measurement::Jetstream,
    ] {
        let r = report.reference_rate(m).expect("the reference ran");
        assert!(r.per_second > 0.0 && r.errors == 0, "{m:?}: {r:?}");
    }
    assert!(report.ratio_to_raw.is_some_and(|r| r > 0.0));
    assert!(report.ratio_to_bus.is_some_and(|r| r > 0.0));
    assert!(report.ratio_to_jetstream.is_some_and(|r| r > 0.0));
    let cpu: Vec<_> = report.cpu.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(cpu, ["loadtest", "presence"]);
    assert!(report.cpu[1].seconds.is_some_and(|s| s > 0.0), "{report:?}");

    cluster.stop();
}
