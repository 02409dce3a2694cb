//! Starts the CQL test node the suite uses (Cassandra 5 from the cache
//! `scripts/install-cassandra.sh` fills, or ScyllaDB when `scylla` is on
//! PATH) on a free loopback port, prints the `--store` URL to reach it,
//! and keeps it running until stdin closes or Ctrl-C: for benchmarks
//! (`chappe-loadtest store --cql URL`) and trying `chappe up --store`.
//!
//! `chappe-test-cql [KEYSPACE]` (default `chappe_bench`).

use std::io::Read as _;

fn main() {
    let keyspace = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "chappe_bench".to_owned());
    let mut server = chappe_testkit::cql::CqlServer::start();
    let dc = server.datacenter().to_owned();
    eprintln!("{server:?}");
    println!(
        "scylla://{}/{keyspace}?dc={dc}&rf={dc}:1",
        server.contact_point()
    );
    // Runs until whoever started it closes stdin; on Ctrl-C the node dies
    // with this process (it is started with PR_SET_PDEATHSIG).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    server.stop();
}
