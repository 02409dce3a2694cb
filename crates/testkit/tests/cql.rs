//! The CQL test database the harness starts: one node, the shared node, and
//! two nodes in two datacenters. Start times and memory are printed
//! (`cargo test -p chappe-testkit --test cql -- --nocapture`), not asserted.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use chappe_testkit::cql::{CqlCluster, CqlServer, DC1, DC2, Engine, cql_options};

/// The tests start JVMs: one at a time, so that two do not fight over the
/// machine's two cores and the printed start times mean something.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".to_owned(), |b| format!("{} MiB", b >> 20))
}

fn assert_speaks_cql_v4(contact_point: &str) {
    let supported = cql_options(contact_point)
        .unwrap_or_else(|e| panic!("OPTIONS to {contact_point} failed: {e}"));
    let versions = supported
        .get("PROTOCOL_VERSIONS")
        .or_else(|| supported.get("CQL_VERSION"))
        .unwrap_or_else(|| panic!("{contact_point} answered {supported:?}"));
    assert!(!versions.is_empty(), "{supported:?}");
    assert!(supported.contains_key("CQL_VERSION"), "{supported:?}");
    if let Some(protocols) = supported.get("PROTOCOL_VERSIONS") {
        assert!(
            protocols.iter().any(|p| p.starts_with("4/")),
            "{contact_point} does not offer protocol v4: {protocols:?}"
        );
    }
}

#[test]
fn a_node_answers_the_cql_handshake_and_stops() {
    let _turn = one_at_a_time();
    let started = Instant::now();
    let mut server = CqlServer::start();
    let elapsed = started.elapsed();
    eprintln!(
        "one {:?} node: started in {elapsed:.1?}, RSS {}",
        server.engine(),
        mib(server.rss_bytes())
    );
    let contact_point = server.contact_point();
    assert_eq!(server.datacenter(), DC1);
    assert_speaks_cql_v4(&contact_point);
    if server.engine() == Engine::External {
        return;
    }
    let address: SocketAddr = contact_point.parse().expect("contact point is an address");
    assert_eq!(address.ip(), IpAddr::from([127, 0, 0, 1]));
    assert!(server.pid().is_some());
    assert!(!server.log_tail().is_empty(), "the node logs");
    assert_eq!(
        server.peers().expect("system.peers is readable"),
        Vec::new(),
        "a single node has no peers"
    );

    let stopping = Instant::now();
    server.stop();
    eprintln!("one node: stopped in {:.1?}", stopping.elapsed());
    assert!(
        cql_options(&contact_point).is_err(),
        "{contact_point} still answers after stop"
    );
}

#[test]
fn the_shared_node_is_started_once_per_process() {
    let _turn = one_at_a_time();
    let started = Instant::now();
    let first = CqlServer::shared();
    eprintln!("shared node: ready in {:.1?}", started.elapsed());
    let second = CqlServer::shared();
    assert!(std::ptr::eq(first, second));
    assert_speaks_cql_v4(&first.contact_point());
}

#[test]
fn two_datacenters_on_two_loopback_addresses_see_each_other() {
    let _turn = one_at_a_time();
    let started = Instant::now();
    let cluster = CqlCluster::start_two_datacenters();
    let elapsed = started.elapsed();
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 2);
    for node in nodes {
        eprintln!(
            "two datacenters: {} ({}) RSS {}",
            node.contact_point(),
            node.datacenter(),
            mib(node.rss_bytes())
        );
    }
    eprintln!("two datacenters: both up and joined in {elapsed:.1?}");

    let dc1 = cluster.node(DC1).expect("a node in dc1");
    let dc2 = cluster.node(DC2).expect("a node in dc2");
    assert!(dc1.contact_point().starts_with("127.0.0.2:"));
    assert!(dc2.contact_point().starts_with("127.0.0.3:"));
    let port = |s: &CqlServer| {
        s.contact_point()
            .rsplit_once(':')
            .map(|(_, p)| p.to_owned())
    };
    assert_eq!(port(dc1), port(dc2), "both nodes serve CQL on one port");
    for (node, other, other_dc) in [(dc1, dc2, DC2), (dc2, dc1, DC1)] {
        assert_speaks_cql_v4(&node.contact_point());
        let peers = node.peers().expect("system.peers is readable");
        let other_ip = other
            .contact_point()
            .parse::<SocketAddr>()
            .expect("an address")
            .ip();
        let peer = peers
            .iter()
            .find(|p| p.address == other_ip)
            .unwrap_or_else(|| {
                panic!(
                    "{} does not list {other_ip}: {peers:?}",
                    node.contact_point()
                )
            });
        assert_eq!(peer.datacenter.as_deref(), Some(other_dc));
    }
}
