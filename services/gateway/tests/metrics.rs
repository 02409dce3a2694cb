//! The operations endpoints of a deployment, scraped as Prometheus would:
//! keydir, fanout and a gateway as processes over a real nats-server, two
//! devices chatting through them, and counters that match what they did.
//! `/readyz` follows the NATS connection.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use chappe_client::ids::UserId;
use chappe_client::{Client, ClientConfig, ConversationKind, Event, KdfParams};
use chappe_testkit::cluster::{Cluster, ClusterConfig};

const WAIT: Duration = Duration::from_secs(30);

/// `GET path` over HTTP/1.0: the status and the body.
fn get(base: &str, path: &str) -> (u16, String) {
    let addr = base.strip_prefix("http://").expect("an http:// address");
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Every sample of a scrape, parsed with a Prometheus exposition parser, by
/// metric name and sorted `k=v` labels.
fn scrape(base: &str) -> HashMap<(String, String), f64> {
    let (status, body) = get(base, "/metrics");
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let mut samples = HashMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            // Histograms: their sample count.
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        samples.insert((s.metric, labels.join(",")), value);
    }
    samples
}

fn sample(samples: &HashMap<(String, String), f64>, name: &str, labels: &str) -> f64 {
    samples
        .get(&(name.to_owned(), labels.to_owned()))
        .copied()
        .unwrap_or_else(|| {
            let names: Vec<_> = samples
                .keys()
                .filter(|(n, _)| n.starts_with(name))
                .collect();
            panic!("no {name}{{{labels}}}; have {names:?}")
        })
}

/// Waits until `check` holds on a fresh scrape of `base`.
fn eventually(base: &str, what: &str, check: impl Fn(&HashMap<(String, String), f64>) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if check(&scrape(base)) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_status(base: &str, path: &str, want: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(base, path);
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{base}{path} stayed {status}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metrics_address(line: Option<String>, service: &str) -> String {
    let line = line.unwrap_or_else(|| panic!("{service} printed no metrics line"));
    line.strip_prefix(&format!("{service} metrics on "))
        .unwrap_or_else(|| panic!("unexpected metrics line {line:?}"))
        .to_owned()
}

fn config(cluster: &Cluster, name: &str) -> ClientConfig {
    let mut config = ClientConfig::new(
        cluster.gateway_urls()[0].clone(),
        cluster.dir().join("devices").join(name),
        format!("{name} passphrase"),
    );
    config.kdf = KdfParams::insecure_fast();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_follow_what_devices_do_and_readiness_follows_nats() {
    let mut cluster = Cluster::start(ClusterConfig {
        gateways: 1,
        fanouts: 1,
        env: Vec::new(),
    });
    let gateway = metrics_address(cluster.gateway_line(0, "metrics on"), "chappe-gateway");
    let fanout = metrics_address(cluster.fanout_line(0, "metrics on"), "chappe-fanout");
    let keydir = metrics_address(cluster.keydir_line("metrics on"), "chappe-keydir");
    for base in [&gateway, &fanout, &keydir] {
        assert_eq!(get(base, "/healthz").0, 200, "{base}");
        assert_eq!(wait_status(base, "/readyz", 200), "ready\n");
    }

    // Two devices, one conversation, N messages from alice to bob.
    const N: usize = 3;
    let alice = Client::login_dev(config(&cluster, "alice"), "alice", "laptop")
        .await
        .expect("alice logs in");
    let bob = Client::login_dev(config(&cluster, "bob"), "bob", "phone")
        .await
        .expect("bob logs in");
    let _alice_events = alice.connect().await.unwrap();
    let mut bob_events = bob.connect().await.unwrap();
    let chat = alice
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap();
    for i in 0..N {
        alice
            .send_text(&chat.id, &format!("hello {i}"))
            .await
            .unwrap();
    }
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while got < N {
        match tokio::time::timeout_at(deadline, bob_events.next()).await {
            Ok(Some(Event::Message(_))) => got += 1,
            Ok(Some(_)) => {}
            Ok(None) => panic!("bob's events ended"),
            Err(_) => panic!("bob got {got} of {N} messages"),
        }
    }

    let (submit, send) = (
        "code=OK,route=chappe.rpc.fanout.submit,service=fanout",
        "code=OK,method=Connect/Send",
    );
    // fanout: N submits answered, N messages stored, N jobs delivered, and
    // the store timed on insert.
    let f = scrape(&fanout);
    assert_eq!(
        sample(&f, "chappe_bus_rpc_requests_total", submit),
        N as f64
    );
    assert_eq!(
        sample(&f, "chappe_fanout_messages_stored_total", ""),
        N as f64
    );
    assert_eq!(
        sample(
            &f,
            "chappe_fanout_store_operation_duration_seconds_count",
            "operation=insert_message"
        ),
        N as f64
    );
    eventually(&fanout, "N delivery jobs delivered", |f| {
        f.get(&(
            "chappe_fanout_delivery_jobs_total".to_owned(),
            "outcome=delivered".to_owned(),
        )) == Some(&(N as f64))
    });
    eventually(&fanout, "the delivery queue drained", |f| {
        f.get(&(
            "chappe_fanout_delivery_queue_depth".to_owned(),
            String::new(),
        )) == Some(&0.0)
    });
    // keydir: both devices uploaded their keys, timed in the store.
    let k = scrape(&keydir);
    assert!(
        sample(
            &k,
            "chappe_keydir_store_operation_duration_seconds_count",
            "operation=put_device"
        ) >= 2.0
    );
    assert!(
        sample(
            &k,
            "chappe_bus_rpc_requests_total",
            "code=OK,route=chappe.rpc.keydir.upload_keys,service=keydir"
        ) >= 2.0
    );
    // gateway: N Send frames, two connected devices, N messages pushed.
    let g = scrape(&gateway);
    assert_eq!(sample(&g, "chappe_gateway_requests_total", send), N as f64);
    assert_eq!(
        sample(
            &g,
            "chappe_gateway_request_duration_seconds_count",
            "method=Connect/Send"
        ),
        N as f64
    );
    assert_eq!(sample(&g, "chappe_gateway_connected_devices", ""), 2.0);
    assert!(sample(&g, "chappe_gateway_requests_total", "code=OK,method=Login") >= 2.0);
    assert_eq!(
        sample(&g, "chappe_gateway_pushed_frames_total", "kind=message"),
        N as f64
    );
    // Each pushed message has its storage-to-push lag observed.
    assert_eq!(
        sample(&g, "chappe_gateway_delivery_lag_seconds_count", ""),
        N as f64
    );

    // The OpenMetrics form is offered to scrapers that ask for it.
    {
        let addr = gateway.strip_prefix("http://").unwrap();
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.contains("application/openmetrics-text"),
            "{response}"
        );
        assert!(response.trim_end().ends_with("# EOF"));
    }

    // Without NATS no service is ready (but all are alive); with it back,
    // all are again.
    cluster.nats().stop();
    for base in [&gateway, &fanout, &keydir] {
        let body = wait_status(base, "/readyz", 503);
        assert!(body.contains("bus: "), "{body}");
        assert_eq!(get(base, "/healthz").0, 200);
    }
    cluster.nats().restart();
    for base in [&gateway, &fanout, &keydir] {
        wait_status(base, "/readyz", 200);
    }

    alice.disconnect();
    bob.disconnect();
    cluster.stop();
}
