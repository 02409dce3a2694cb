//! Short load runs against a real in-process platform: the report's
//! accounting, and the open model's honesty about queueing.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chappe_bus::memory::MemoryBus;
use chappe_bus::{Bus, Headers, Jobs, Message, Requests, Subscription};
use chappe_cli::platform::{Platform, PlatformConfig};
use chappe_loadtest::cli::{Cli, Command, run_load};
use chappe_loadtest::config::RunArgs;
use chappe_loadtest::engine::Engine;
use chappe_loadtest::measure::Metric;
use chappe_loadtest::report::{CryptoMode, Report};
use clap::Parser as _;

fn args(line: &str) -> RunArgs {
    let argv = ["chappe-loadtest", "run"]
        .into_iter()
        .map(String::from)
        .chain(line.split_whitespace().map(String::from));
    match Cli::parse_from(argv).command {
        Command::Run(args) => *args,
        _ => unreachable!("parsed a run"),
    }
}

fn assert_accounting(report: &Report) {
    let c = &report.counts;
    assert!(c.sent > 0, "something was sent: {c:?}");
    assert_eq!(c.sent, c.stored, "every send stored: {c:?}");
    assert_eq!(
        c.delivered, c.expected_deliveries,
        "every recipient device got every message: {c:?}"
    );
    assert!(c.errors_by_status.is_empty(), "no errors: {c:?}");
    assert_eq!(c.dropped, 0);
    assert!(report.accounting_ok());
    let delivered = report
        .summary(Metric::SendToDelivered)
        .expect("latencies recorded");
    assert_eq!(delivered.count, c.delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_with_full_crypto_accounts_for_every_message() {
    let report = run_load(args(
        "--embedded --quiet --scenario one-to-one --users 4 --devices-per-user 2 \
         --crypto full --mode open --rate 40 --ramp-up 500ms --steady 1s --ramp-down 500ms",
    ))
    .await
    .expect("run");
    assert_accounting(&report);
    // 2 pairs; each message reaches the 3 other devices of its pair.
    assert_eq!(report.counts.expected_deliveries, report.counts.stored * 3);
    assert_eq!(report.meta.crypto, CryptoMode::Full);
    assert!(report.setup.as_ref().is_some_and(|s| s.devices == 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_pre_encrypted_in_closed_mode_account_for_every_message() {
    let report = run_load(args(
        "--embedded --quiet --scenario group --users 6 --group-size 3 --crypto pre-encrypted \
         --mode closed --in-flight 2 --ramp-up 0ms --steady 1s --ramp-down 0ms",
    ))
    .await
    .expect("run");
    assert_accounting(&report);
    assert_eq!(report.counts.expected_deliveries, report.counts.stored * 2);
    assert_eq!(report.meta.crypto, CryptoMode::PreEncrypted);
}

/// A bus whose fanout submits go one at a time, each taking `delay`: a
/// server with a fixed capacity of 1/delay messages per second.
struct SlowSubmits {
    inner: MemoryBus,
    delay: Duration,
    one_at_a_time: tokio::sync::Mutex<()>,
}

#[async_trait]
impl Bus for SlowSubmits {
    async fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> chappe_bus::Result<()> {
        self.inner.publish(subject, headers, payload).await
    }
    async fn subscribe(&self, subject: &str) -> chappe_bus::Result<Subscription> {
        self.inner.subscribe(subject).await
    }
    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> chappe_bus::Result<Message> {
        if subject.ends_with(".rpc.fanout.submit") {
            let _turn = self.one_at_a_time.lock().await;
            tokio::time::sleep(self.delay).await;
            return self.inner.request(subject, headers, payload, timeout).await;
        }
        self.inner.request(subject, headers, payload, timeout).await
    }
    async fn serve(&self, subject: &str, group: &str) -> chappe_bus::Result<Requests> {
        self.inner.serve(subject, group).await
    }
    async fn enqueue(
        &self,
        queue: &str,
        headers: Headers,
        payload: Bytes,
    ) -> chappe_bus::Result<()> {
        self.inner.enqueue(queue, headers, payload).await
    }
    async fn consume(&self, queue: &str, group: &str) -> chappe_bus::Result<Jobs> {
        self.inner.consume(queue, group).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_model_counts_queueing_that_the_closed_model_hides() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = PlatformConfig::new(dir.path().join("data"));
    config.gateway.listen = "127.0.0.1:0".parse().unwrap();
    config.gateway.send_rate_per_second = 1_000_000;
    config.gateway.send_burst = 1_000_000;
    let memory = MemoryBus::default();
    let slow = SlowSubmits {
        inner: memory.clone(),
        delay: Duration::from_millis(20),
        one_at_a_time: tokio::sync::Mutex::new(()),
    };
    let platform = Platform::start_on(config, Some(memory), Arc::new(slow))
        .await
        .unwrap();
    let target = platform.gateway_url();

    // Capacity is 50 messages/s. The open model offers 100/s for 2 s: a
    // queue builds, and every message waiting in it is charged its wait.
    let open = Engine::new(
        args(&format!(
            "--target {target} --quiet --scenario one-to-one --users 2 --crypto pre-encrypted \
             --mode open --rate 100 --ramp-up 0ms --steady 2s --ramp-down 0ms --drain-timeout 30s"
        )),
        target.clone(),
    )
    .unwrap()
    .run()
    .await
    .unwrap();
    // The closed model with one send in flight never queues: it just sends
    // less, and reports only the service time.
    let closed = Engine::new(
        args(&format!(
            "--target {target} --quiet --scenario one-to-one --users 2 --crypto pre-encrypted \
             --mode closed --in-flight 1 --ramp-up 0ms --steady 2s --ramp-down 0ms"
        )),
        target.clone(),
    )
    .unwrap()
    .run()
    .await
    .unwrap();

    let open_stored = open.summary(Metric::SendToStored).unwrap();
    let closed_stored = closed.summary(Metric::SendToStored).unwrap();
    let open_delivered = open.summary(Metric::SendToDelivered).unwrap();
    let closed_delivered = closed.summary(Metric::SendToDelivered).unwrap();
    eprintln!(
        "send→stored p50/p99: open {}/{} µs, closed {}/{} µs",
        open_stored.p50_us, open_stored.p99_us, closed_stored.p50_us, closed_stored.p99_us
    );
    // The closed model sees about the service time (20 ms, one at a time,
    // two senders), so even its worst is below the open model's median.
    assert!(
        closed_stored.p99_us < open_stored.p50_us,
        "{closed_stored:?} vs {open_stored:?}"
    );
    // The open model sees the queue: offering 200 messages at 50/s leaves the
    // last ones waiting about 2 s; its p99 is many times the closed one.
    assert!(open_stored.p99_us > 1_000_000, "{open_stored:?}");
    assert!(
        open_stored.p50_us > 5 * closed_stored.p50_us,
        "{open_stored:?} vs {closed_stored:?}"
    );
    assert!(open_delivered.p99_us > 5 * closed_delivered.p99_us);
    // Both still account for every message.
    assert_accounting(&open);
    assert_accounting(&closed);
    platform.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_report_and_the_coordinator_merges_them_exactly() {
    let report = run_load(args(&format!(
        "--embedded --quiet --processes 2 --scenario one-to-one --users 4 --crypto pre-encrypted \
         --mode open --rate 40 --ramp-up 0ms --steady 1s --ramp-down 0ms --worker-exe {}",
        env!("CARGO_BIN_EXE_chappe-loadtest")
    )))
    .await
    .expect("run");
    assert_accounting(&report);
    assert_eq!(report.workers.len(), 2, "one part per worker");
    assert_eq!(report.meta.devices, 8, "devices of both workers");
    // 40/s for 1 s across both workers.
    assert_eq!(report.counts.sent, 40);
}

/// Stands in for a service's `/metrics` (the services export none yet): a
/// counter that goes up by one per scrape.
async fn metrics_endpoint() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut scrapes = 0u64;
        while let Ok((mut socket, _)) = listener.accept().await {
            scrapes += 1;
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let body = format!(
                "# TYPE chappe_test_scrapes_total counter\nchappe_test_scrapes_total {scrapes}\n"
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    format!("http://{addr}/metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_metrics_are_scraped_before_and_after() {
    let url = metrics_endpoint().await;
    let report = run_load(args(&format!(
        "--embedded --quiet --scenario idle --users 2 --crypto pre-encrypted --steady 100ms \
         --metrics-url {url},http://127.0.0.1:1/metrics"
    )))
    .await
    .expect("run");
    let scraped = &report.server_metrics.as_ref().expect("metrics")["prometheus"];
    let counter = &scraped[&url]["chappe_test_scrapes_total"];
    assert_eq!(counter["before"], 1.0);
    assert_eq!(counter["after"], 2.0);
    assert_eq!(counter["delta"], 1.0);
    // An endpoint that cannot be reached is noted, not fatal.
    assert!(scraped["http://127.0.0.1:1/metrics"]["error"].is_string());
    assert!(
        report
            .meta
            .notes
            .iter()
            .any(|n| n.contains("metrics not scraped"))
    );
}
