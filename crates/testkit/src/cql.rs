//! A CQL database for tests, started by the test itself.
//!
//! - [`CqlServer`]: one node on a free loopback port in a temporary
//!   directory, stopped when the value is dropped; [`CqlServer::shared`] is
//!   one node per test process (a start costs seconds to tens of seconds), in
//!   which every test makes its own keyspace.
//! - [`CqlCluster::start_two_datacenters`]: two nodes of one cluster, on
//!   127.0.0.2 in `dc1` and 127.0.0.3 in `dc2`, as two regions run.
//! - [`cql_options`]: the CQL `OPTIONS` handshake, written by hand (no
//!   driver), with which the harness knows a node is up.
//!
//! Which database (DESIGN.md §4 runs ScyllaDB; both speak CQL):
//!
//! 1. `CHAPPE_TEST_CQL=host:port[,host:port...]` (and `CHAPPE_TEST_CQL_DC`,
//!    default `dc1`): an existing cluster, for example a real ScyllaDB; the
//!    harness starts nothing and [`CqlServer::start`] hands out that
//!    cluster. [`CqlCluster::start_two_datacenters`] still starts its own
//!    two nodes.
//! 2. a `scylla` binary on `PATH` (`CHAPPE_SCYLLA` names another): ScyllaDB
//!    in developer mode, one shard, 1 GiB.
//! 3. Apache Cassandra 5.0 (the same CQL protocol), installed by
//!    `scripts/install-cassandra.sh` into `CHAPPE_CASSANDRA_HOME` or the
//!    default directory, run with Java 17 (`JAVA_HOME` or `java` on `PATH`)
//!    and a 512 MiB–1 GiB heap.
//!
//! With none of them the harness panics and says what to run: a test never
//! passes silently without its database (CONVENTIONS.md, "Tests").
//!
//! The nodes are started by one long-lived thread with `PR_SET_PDEATHSIG`,
//! so they die with the test process even when no destructor runs (the
//! shared node lives in a static); their directories, left behind then, are
//! removed by the next start once their test process is gone.

use crate::process::{self, owned_temp_dir, spawn_tied_to_process};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The Cassandra release `scripts/install-cassandra.sh` installs (change
/// both together).
pub const CASSANDRA_VERSION: &str = "5.0.9";
/// Where Cassandra is installed (a directory with `lib/*.jar`); without it,
/// [`default_cassandra_home`].
pub const CASSANDRA_HOME_ENV: &str = "CHAPPE_CASSANDRA_HOME";
/// Contact points of an existing cluster to test against, comma-separated
/// `host:port`.
pub const TEST_CQL_ENV: &str = "CHAPPE_TEST_CQL";
/// The local datacenter of the cluster named by [`TEST_CQL_ENV`].
pub const TEST_CQL_DC_ENV: &str = "CHAPPE_TEST_CQL_DC";
/// The ScyllaDB binary to use instead of `scylla` on `PATH`.
pub const SCYLLA_ENV: &str = "CHAPPE_SCYLLA";
/// More JVM options for Cassandra nodes, separated by spaces, after the
/// harness's own (a later `-Xmx` wins).
pub const CASSANDRA_JVM_OPTS_ENV: &str = "CHAPPE_CASSANDRA_JVM_OPTS";

/// The datacenter of a single node, and of the first of two.
pub const DC1: &str = "dc1";
/// The datacenter of the second of two nodes.
pub const DC2: &str = "dc2";
/// The cluster name of every node the harness starts.
const CLUSTER_NAME: &str = "chappe-test";

/// How long a node may take to answer CQL.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long two nodes may take to see each other and agree on the schema.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a node may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect, read and write timeout of one hand-written CQL exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a node is started on new ports when its ports were taken.
const PORT_ATTEMPTS: usize = 3;
/// Lines of the node's log given in a failure message.
const LOG_TAIL_LINES: usize = 40;

/// The heap of a Cassandra node: enough for the test suites, small enough
/// for three nodes (one shared, two for the datacenter tests) on 24 GiB.
const CASSANDRA_HEAP: [&str; 2] = ["-Xms512m", "-Xmx1g"];

/// JVM options from Cassandra 5.0's `conf/jvm-server.options` and
/// `conf/jvm17-server.options` (the `cassandra-all` jar has no `conf/`): the
/// module exports and opens Java 17 needs, Netty's settings, G1.
const CASSANDRA_JVM_OPTIONS: &[&str] = &[
    "-ea",
    "-da:net.openhft...",
    "-XX:+UseThreadPriorities",
    "-Xss256k",
    "-XX:+UseTLAB",
    "-XX:+ResizeTLAB",
    "-XX:+PerfDisableSharedMem",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.net.preferIPv4Stack=true",
    "-XX:+UseG1GC",
    "-XX:+ParallelRefProcEnabled",
    "-XX:MaxTenuringThreshold=1",
    "-XX:G1HeapRegionSize=16m",
    "-XX:G1RSetUpdatingPauseTimePercent=5",
    "-XX:MaxGCPauseMillis=300",
    "-XX:InitiatingHeapOccupancyPercent=70",
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
];

/// Options that make a test node start (and stop) in seconds: no wait for
/// gossip to settle nor for the ring, no delay before the (unused) superuser
/// is set up, system and schema tables not flushed on every change (a test
/// node is never restarted), no pause to announce a shutdown, and no C2
/// compiler (a benchmark puts it back with
/// `CHAPPE_CASSANDRA_JVM_OPTS=-XX:TieredStopAtLevel=4`).
const CASSANDRA_FAST_START: &[&str] = &[
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    "-Dcassandra.ring_delay_ms=0",
    "-Dcassandra.superuser_setup_delay_ms=0",
    "-Dcassandra.unsafesystem=true",
    "-Dcassandra.test.flush_local_schema_changes=false",
    "-Dcassandra.shutdown_announce_in_ms=0",
    // The client-side compiler only: a test node's code is short-lived, and
    // C2 compiling in the background takes one of two cores for seconds.
    "-XX:TieredStopAtLevel=1",
];

const INSTALL_HINT: &str = "run `scripts/install-cassandra.sh` (scripts/test.sh does it; it \
    needs Java 17 and Maven) and set CHAPPE_CASSANDRA_HOME to the directory it prints, or put \
    a `scylla` binary on PATH, or name an existing cluster with CHAPPE_TEST_CQL=host:port \
    (and CHAPPE_TEST_CQL_DC)";

/// Which database a [`CqlServer`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Apache Cassandra started by the harness.
    Cassandra,
    /// ScyllaDB started by the harness.
    Scylla,
    /// A cluster named by `CHAPPE_TEST_CQL`, not started by the harness.
    External,
}

/// A CQL node for a test: started by the harness (and stopped when dropped)
/// or an existing cluster named by `CHAPPE_TEST_CQL`.
pub struct CqlServer {
    engine: Engine,
    contact_points: Vec<String>,
    datacenter: String,
    node: Option<Node>,
}

impl fmt::Debug for CqlServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqlServer")
            .field("engine", &self.engine)
            .field("contact_points", &self.contact_points)
            .field("datacenter", &self.datacenter)
            .field("pid", &self.pid())
            .finish()
    }
}

impl CqlServer {
    /// Starts one node on 127.0.0.1 in `dc1` and waits until it answers CQL,
    /// or hands out the cluster named by `CHAPPE_TEST_CQL` (see the module
    /// documentation for which database).
    ///
    /// Panics with what to install when there is no database, and with the
    /// node's log when it does not start within 120 s.
    pub fn start() -> CqlServer {
        if let Some(server) = external_from_env() {
            return server;
        }
        let launcher = Launcher::find();
        let address = Ipv4Addr::LOCALHOST;
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let ports = free_ports(&[address]);
            let spec = NodeSpec {
                address,
                datacenter: DC1,
                seeds: vec![address],
                ports,
            };
            match launcher.start_node(&spec) {
                Ok(node) => return CqlServer::from_node(launcher.engine(), node, DC1),
                Err(StartError::PortTaken(e)) => last_error = e,
                Err(StartError::Failed(e)) => panic!("the CQL test node did not start: {e}"),
            }
        }
        panic!("the CQL test node did not start: {last_error}");
    }

    /// One node for the whole test process, started by the first caller:
    /// tests share it and isolate themselves with their own keyspace. It is
    /// killed when the test process exits.
    pub fn shared() -> &'static CqlServer {
        static SHARED: OnceLock<Result<CqlServer, String>> = OnceLock::new();
        process::shared(&SHARED, CqlServer::start, "CQL test node")
    }

    fn from_node(engine: Engine, node: Node, datacenter: &str) -> CqlServer {
        CqlServer {
            engine,
            contact_points: vec![node.contact_point()],
            datacenter: datacenter.to_owned(),
            node: Some(node),
        }
    }

    /// `127.0.0.1:PORT`: the node's CQL address (the first contact point of
    /// an external cluster).
    pub fn contact_point(&self) -> String {
        self.contact_points[0].clone()
    }

    /// Every contact point (one for a node the harness started).
    pub fn contact_points(&self) -> &[String] {
        &self.contact_points
    }

    /// The node's datacenter, the one a client prefers (`dc1`, or
    /// `CHAPPE_TEST_CQL_DC`).
    pub fn datacenter(&self) -> &str {
        &self.datacenter
    }

    /// Which database this is.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The operating system's id of the node's process (none for an
    /// external cluster).
    pub fn pid(&self) -> Option<u32> {
        self.node.as_ref().and_then(Node::pid)
    }

    /// The resident memory of the node's process in bytes, from
    /// `/proc/PID/status` (none for an external cluster or off Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid()?)
    }

    /// The last lines of the node's log (empty for an external cluster).
    pub fn log_tail(&self) -> String {
        self.node.as_ref().map(Node::log_tail).unwrap_or_default()
    }

    /// The node's view of the other nodes (`system.peers`), read over CQL.
    pub fn peers(&self) -> Result<Vec<Peer>, String> {
        peers(&self.contact_point())
    }

    /// Stops the node (SIGTERM, then SIGKILL after 20 s); nothing for an
    /// external cluster. Dropping the value does the same.
    pub fn stop(&mut self) {
        if let Some(node) = self.node.as_mut() {
            node.stop();
        }
    }
}

impl Drop for CqlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Another node as one node sees it (a row of `system.peers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its listen address.
    pub address: IpAddr,
    /// Its datacenter, once gossip told it.
    pub datacenter: Option<String>,
    /// Its schema version, once gossip told it.
    pub schema_version: Option<[u8; 16]>,
}

/// Two nodes of one cluster in two datacenters: 127.0.0.2 in `dc1` and
/// 127.0.0.3 in `dc2`, both on the same CQL port (a driver that
/// discovers the other node from `system.peers` connects to it on the port
/// of its contact point). Stopped when dropped.
#[derive(Debug)]
pub struct CqlCluster {
    nodes: Vec<CqlServer>,
}

impl CqlCluster {
    /// The addresses of the two nodes (Linux answers on all of 127.0.0.0/8
    /// without setup).
    pub const ADDRESSES: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];

    /// Starts the two nodes (Cassandra side by side, ScyllaDB one after the
    /// other) and waits until each sees the other in its datacenter with the
    /// same schema. Always starts its own nodes (ScyllaDB or Cassandra), even
    /// with `CHAPPE_TEST_CQL` set.
    ///
    /// Panics with what to install when there is no database, and with the
    /// nodes' logs when they do not start or join.
    pub fn start_two_datacenters() -> CqlCluster {
        let launcher = Launcher::find();
        let specs = [(Self::ADDRESSES[0], DC1), (Self::ADDRESSES[1], DC2)];
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let ports = free_ports(&Self::ADDRESSES);
            let specs = specs.map(|(address, datacenter)| NodeSpec {
                address,
                datacenter,
                seeds: Self::ADDRESSES.to_vec(),
                ports,
            });
            let started = match launcher {
                // Both nodes are seeds (no shadow round that needs the other
                // one up), do not bootstrap and skip the ring delay: they
                // start side by side and meet through gossip.
                Launcher::Cassandra { .. } => {
                    let mut nodes = Vec::new();
                    for spec in &specs {
                        match launcher.spawn_node(spec) {
                            Ok(node) => nodes.push(node),
                            Err(e) => panic!(
                                "the CQL test node {} ({}) did not start: {e}",
                                spec.address, spec.datacenter
                            ),
                        }
                    }
                    nodes
                        .into_iter()
                        .map(|mut node| node.wait_started().map(|()| node))
                        .collect::<Result<Vec<Node>, StartError>>()
                }
                // ScyllaDB adds nodes to its Raft topology one at a time.
                Launcher::Scylla { .. } => specs
                    .iter()
                    .map(|spec| launcher.start_node(spec))
                    .collect::<Result<Vec<Node>, StartError>>(),
            };
            let nodes = match started {
                Ok(nodes) => nodes,
                Err(StartError::PortTaken(e)) => {
                    last_error = e;
                    continue;
                }
                Err(StartError::Failed(e)) => panic!("a CQL test node did not start: {e}"),
            };
            let nodes = nodes
                .into_iter()
                .zip(specs)
                .map(|(node, spec)| CqlServer::from_node(launcher.engine(), node, spec.datacenter))
                .collect();
            let cluster = CqlCluster { nodes };
            if let Err(e) = cluster.wait_joined(JOIN_TIMEOUT) {
                panic!("{e}");
            }
            return cluster;
        }
        panic!("the two CQL test nodes did not start: {last_error}");
    }

    /// The nodes: `[dc1 on 127.0.0.2, dc2 on 127.0.0.3]`.
    pub fn nodes(&self) -> &[CqlServer] {
        &self.nodes
    }

    /// Stops both nodes at once (SIGTERM, then SIGKILL after 20 s).
    /// Dropping the value does the same.
    pub fn stop(&mut self) {
        for node in self.nodes.iter().filter_map(|n| n.node.as_ref()) {
            node.terminate();
        }
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// The node of a datacenter (`dc1` or `dc2`).
    pub fn node(&self, datacenter: &str) -> Option<&CqlServer> {
        self.nodes.iter().find(|n| n.datacenter() == datacenter)
    }

    /// Waits until every node lists every other one in `system.peers` with
    /// its datacenter, and all have the same schema version.
    fn wait_joined(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.join_state();
            match &state {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => {
                    let logs: Vec<String> = self
                        .nodes
                        .iter()
                        .map(|n| format!("log of {}:\n{}", n.contact_point(), n.log_tail()))
                        .collect();
                    return Err(format!(
                        "the two CQL test nodes did not join within {timeout:?}: {e}\n{}",
                        logs.join("\n")
                    ));
                }
            }
        }
    }

    fn join_state(&self) -> Result<(), String> {
        let mut versions = Vec::new();
        for node in &self.nodes {
            let contact_point = node.contact_point();
            versions.push(local_schema_version(&contact_point)?);
            let peers = peers(&contact_point)?;
            for other in self
                .nodes
                .iter()
                .filter(|o| o.contact_point() != contact_point)
            {
                let address = other
                    .contact_point()
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("{}: {e}", other.contact_point()))?
                    .ip();
                let peer = peers
                    .iter()
                    .find(|p| p.address == address)
                    .ok_or_else(|| format!("{contact_point} does not list {address} yet"))?;
                if peer.datacenter.as_deref() != Some(other.datacenter()) {
                    return Err(format!(
                        "{contact_point} sees {address} in {:?}, not {}",
                        peer.datacenter,
                        other.datacenter()
                    ));
                }
                versions.push(peer.schema_version);
            }
        }
        if versions.windows(2).any(|w| w[0] != w[1] || w[0].is_none()) {
            return Err("the nodes do not agree on the schema yet".to_owned());
        }
        Ok(())
    }
}

impl Drop for CqlCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The default Cassandra install directory, where `scripts/install-cassandra.sh`
/// puts it: `${XDG_CACHE_HOME:-$HOME/.cache}/chappe/cassandra-<version>`.
pub fn default_cassandra_home() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".cache"))
        })?;
    Some(
        cache
            .join("chappe")
            .join(format!("cassandra-{CASSANDRA_VERSION}")),
    )
}

fn external_from_env() -> Option<CqlServer> {
    let value = std::env::var(TEST_CQL_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())?;
    let contact_points: Vec<String> = value
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if contact_points.is_empty() {
        panic!("{TEST_CQL_ENV}={value:?} names no host:port");
    }
    for contact_point in &contact_points {
        if contact_point.to_socket_addrs().is_err() {
            panic!("{TEST_CQL_ENV}={value}: {contact_point:?} is not a host:port");
        }
    }
    let datacenter = std::env::var(TEST_CQL_DC_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DC1.to_owned());
    Some(CqlServer {
        engine: Engine::External,
        contact_points,
        datacenter,
        node: None,
    })
}

/// The ports of one node; a cluster's nodes share them, on their own
/// addresses.
#[derive(Clone, Copy, Debug)]
struct Ports {
    native: u16,
    storage: u16,
    /// ScyllaDB only: its REST API and its shard-aware CQL port.
    api: u16,
    shard_aware: u16,
}

struct NodeSpec<'a> {
    address: Ipv4Addr,
    datacenter: &'a str,
    /// The seeds' addresses (the node itself when alone); their storage
    /// port is the cluster's.
    seeds: Vec<Ipv4Addr>,
    ports: Ports,
}

enum StartError {
    /// Another process took one of the node's ports: try others.
    PortTaken(String),
    Failed(String),
}

enum Launcher {
    Cassandra { java: PathBuf, home: PathBuf },
    Scylla { binary: PathBuf },
}

impl Launcher {
    /// ScyllaDB when there is one, else Cassandra; panics with what to
    /// install when neither is there.
    fn find() -> Launcher {
        if let Some(binary) = std::env::var_os(SCYLLA_ENV).filter(|v| !v.is_empty()) {
            let binary = PathBuf::from(binary);
            if !binary.is_file() {
                panic!("{SCYLLA_ENV}={} is not a file", binary.display());
            }
            return Launcher::Scylla { binary };
        }
        if let Some(binary) = crate::on_path("scylla") {
            return Launcher::Scylla { binary };
        }
        let home = match std::env::var_os(CASSANDRA_HOME_ENV).filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home),
            None => default_cassandra_home().unwrap_or_else(|| {
                panic!("neither HOME nor XDG_CACHE_HOME is set to find Cassandra: {INSTALL_HINT}")
            }),
        };
        if !cassandra_installed(&home) {
            panic!(
                "no Cassandra {CASSANDRA_VERSION} install in {} (no lib/cassandra-all-*.jar and \
                 .complete stamp): {INSTALL_HINT}",
                home.display()
            );
        }
        let java = std::env::var_os("JAVA_HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join("bin").join("java"))
            .filter(|p| p.is_file())
            .or_else(|| crate::on_path("java"))
            .unwrap_or_else(|| {
                panic!(
                    "java is not on PATH (nor in JAVA_HOME): Cassandra needs Java 17 \
                     (apt-get install openjdk-17-jdk-headless)"
                )
            });
        Launcher::Cassandra { java, home }
    }

    fn engine(&self) -> Engine {
        match self {
            Launcher::Cassandra { .. } => Engine::Cassandra,
            Launcher::Scylla { .. } => Engine::Scylla,
        }
    }

    /// Starts one node and waits until it answers CQL.
    fn start_node(&self, spec: &NodeSpec<'_>) -> Result<Node, StartError> {
        let mut node = self.spawn_node(spec).map_err(StartError::Failed)?;
        node.wait_started()?;
        Ok(node)
    }

    /// Writes a node's configuration into a new directory and starts it.
    fn spawn_node(&self, spec: &NodeSpec<'_>) -> Result<Node, String> {
        let dir = owned_temp_dir("chappe-cql-")
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let mut node = Node {
            dir,
            address: spec.address,
            native_port: spec.ports.native,
            child: None,
        };
        let command = match self {
            Launcher::Cassandra { java, home } => node.cassandra_command(java, home, spec),
            Launcher::Scylla { binary } => node.scylla_command(binary, spec),
        }?;
        node.spawn(command)?;
        Ok(node)
    }
}

fn cassandra_installed(home: &Path) -> bool {
    let Ok(entries) = fs::read_dir(home.join("lib")) else {
        return false;
    };
    home.join(".complete").is_file()
        && entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("cassandra-all-") && name.ends_with(".jar")
        })
}

/// One database process the harness started, in its own directory.
struct Node {
    dir: TempDir,
    address: Ipv4Addr,
    native_port: u16,
    child: Option<Child>,
}

impl Node {
    fn contact_point(&self) -> String {
        format!("{}:{}", self.address, self.native_port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("system.log")
    }

    fn path(&self, name: &str) -> Result<String, String> {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        path.to_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{} is not UTF-8", path.display()))
    }

    fn write(&self, name: &str, text: &str) -> Result<String, String> {
        let path = self.dir.path().join(name);
        fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        path.to_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{} is not UTF-8", path.display()))
    }

    fn cassandra_command(
        &self,
        java: &Path,
        home: &Path,
        spec: &NodeSpec<'_>,
    ) -> Result<Command, String> {
        let config = format!(
            "# Written by chappe-testkit (crates/testkit/src/cql.rs) for one test node.\n\
             cluster_name: {CLUSTER_NAME}\n\
             num_tokens: 1\n\
             auto_bootstrap: false\n\
             partitioner: org.apache.cassandra.dht.Murmur3Partitioner\n\
             endpoint_snitch: GossipingPropertyFileSnitch\n\
             authenticator: AllowAllAuthenticator\n\
             authorizer: AllowAllAuthorizer\n\
             role_manager: CassandraRoleManager\n\
             network_authorizer: AllowAllNetworkAuthorizer\n\
             data_file_directories:\n\
             \x20 - {data:?}\n\
             commitlog_directory: {commitlog:?}\n\
             saved_caches_directory: {saved_caches:?}\n\
             hints_directory: {hints:?}\n\
             cdc_raw_directory: {cdc_raw:?}\n\
             commitlog_sync: periodic\n\
             commitlog_sync_period: 10000ms\n\
             seed_provider:\n\
             \x20 - class_name: org.apache.cassandra.locator.SimpleSeedProvider\n\
             \x20   parameters:\n\
             \x20     - seeds: \"{seeds}\"\n\
             listen_address: {address}\n\
             storage_port: {storage}\n\
             rpc_address: {address}\n\
             native_transport_port: {native}\n\
             start_native_transport: true\n\
             # Tests drop keyspaces and tables all the time: no snapshots.\n\
             auto_snapshot: false\n\
             concurrent_compactors: 1\n\
             # Less memory outside the heap.\n\
             file_cache_size: 32MiB\n\
             networking_cache_size: 16MiB\n",
            data = self.path("data")?,
            commitlog = self.path("commitlog")?,
            saved_caches = self.path("saved_caches")?,
            hints = self.path("hints")?,
            cdc_raw = self.path("cdc_raw")?,
            seeds = spec
                .seeds
                .iter()
                .map(|s| format!("{s}:{}", spec.ports.storage))
                .collect::<Vec<_>>()
                .join(","),
            address = spec.address,
            storage = spec.ports.storage,
            native = spec.ports.native,
        );
        let config = self.write("cassandra.yaml", &config)?;
        let rackdc = self.write(
            "cassandra-rackdc.properties",
            &format!("dc={}\nrack=rack1\n", spec.datacenter),
        )?;
        let logback = self.write(
            "logback.xml",
            &format!(
                "<configuration>\n\
                 \x20 <appender name=\"FILE\" class=\"ch.qos.logback.core.FileAppender\">\n\
                 \x20   <file>{}</file>\n\
                 \x20   <append>true</append>\n\
                 \x20   <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>\n\
                 \x20 </appender>\n\
                 \x20 <root level=\"INFO\"><appender-ref ref=\"FILE\"/></root>\n\
                 </configuration>\n",
                xml_escape(&self.log_path().to_string_lossy())
            ),
        )?;
        let triggers = self.path("triggers")?;
        let storage = self.path("storage")?;
        let mut command = Command::new(java);
        command
            .args(CASSANDRA_HEAP)
            .args(CASSANDRA_JVM_OPTIONS)
            .args(CASSANDRA_FAST_START)
            .arg("-Dcassandra-foreground=yes")
            .arg(format!("-Dcassandra.config=file://{config}"))
            .arg(format!("-Dcassandra-rackdc.properties=file://{rackdc}"))
            .arg(format!("-Dlogback.configurationFile=file://{logback}"))
            .arg(format!("-Dcassandra.storagedir={storage}"))
            .arg(format!("-Dcassandra.triggers_dir={triggers}"))
            .arg(format!("-Dcassandra.logdir={}", self.dir.path().display()))
            .args(
                std::env::var(CASSANDRA_JVM_OPTS_ENV)
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .arg("-cp")
            .arg(home.join("lib").join("*"))
            .arg("org.apache.cassandra.service.CassandraDaemon");
        Ok(command)
    }

    fn scylla_command(&self, binary: &Path, spec: &NodeSpec<'_>) -> Result<Command, String> {
        let conf = self.path("conf")?;
        let config = format!(
            "# Written by chappe-testkit (crates/testkit/src/cql.rs) for one test node.\n\
             cluster_name: {CLUSTER_NAME}\n\
             num_tokens: 16\n\
             endpoint_snitch: GossipingPropertyFileSnitch\n\
             authenticator: AllowAllAuthenticator\n\
             authorizer: AllowAllAuthorizer\n\
             workdir: {workdir:?}\n\
             seed_provider:\n\
             \x20 - class_name: org.apache.cassandra.locator.SimpleSeedProvider\n\
             \x20   parameters:\n\
             \x20     - seeds: \"{seeds}\"\n\
             listen_address: {address}\n\
             storage_port: {storage}\n\
             rpc_address: {address}\n\
             native_transport_port: {native}\n\
             native_shard_aware_transport_port: {shard_aware}\n\
             api_address: {address}\n\
             api_port: {api}\n\
             prometheus_port: 0\n\
             auto_snapshot: false\n",
            workdir = self.path("work")?,
            // The first node founds the cluster; the others join it.
            seeds = spec.seeds.first().unwrap_or(&spec.address),
            address = spec.address,
            storage = spec.ports.storage,
            native = spec.ports.native,
            shard_aware = spec.ports.shard_aware,
            api = spec.ports.api,
        );
        let config = self.write("conf/scylla.yaml", &config)?;
        self.write(
            "conf/cassandra-rackdc.properties",
            &format!("dc={}\nrack=rack1\n", spec.datacenter),
        )?;
        let mut command = Command::new(binary);
        command
            .env("SCYLLA_CONF", &conf)
            .env("SCYLLA_HOME", self.dir.path())
            .arg("--options-file")
            .arg(config)
            .args(["--developer-mode", "1"])
            .args(["--smp", "1"])
            .args(["--memory", "1G"])
            .args(["--overprovisioned", "1"]);
        Ok(command)
    }

    fn spawn(&mut self, mut command: Command) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("opening the log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("opening the log: {e}"))?;
        command
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let program = command.get_program().to_string_lossy().into_owned();
        let child =
            spawn_tied_to_process(command).map_err(|e| format!("running {program}: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the node answers CQL; kills it when it does not.
    fn wait_started(&mut self) -> Result<(), StartError> {
        match self.wait_ready(START_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(e) => {
                let taken = self.port_taken();
                self.kill();
                if taken {
                    Err(StartError::PortTaken(e))
                } else {
                    Err(StartError::Failed(e))
                }
            }
        }
    }

    /// Waits until the node answers a CQL `OPTIONS` request.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let contact_point = self.contact_point();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "it exited with {status}; log:\n{}",
                    self.failure_log()
                ));
            }
            if cql_options(&contact_point).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{contact_point} does not answer CQL after {timeout:?}; log:\n{}",
                    self.failure_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the log says a port was taken.
    fn port_taken(&self) -> bool {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        log.contains("Address already in use") || log.contains("is in use by another process")
    }

    /// What a failure message shows of the log: the first error with the
    /// lines after it (its exception), then the last lines.
    fn failure_log(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail_start = lines.len().saturating_sub(LOG_TAIL_LINES);
        let first_error = lines[..tail_start]
            .iter()
            .position(|l| l.starts_with("ERROR") || l.contains(" ERROR ") || l.contains("] ERROR"));
        let mut report = String::new();
        if let Some(i) = first_error {
            let end = (i + 8).min(tail_start);
            report.push_str(&lines[i..end].join("\n"));
            report.push_str("\n[...]\n");
        }
        report.push_str(&lines[tail_start..].join("\n"));
        report
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Sends SIGTERM, without waiting.
    fn terminate(&self) {
        if let Some(child) = &self.child {
            process::terminate(child);
        }
    }

    /// SIGTERM, then SIGKILL if the process has not exited after 20 s.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            process::stop(child, STOP_TIMEOUT);
        }
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            process::kill(child);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Ports that were free a moment ago on every one of `addresses`, all
/// different.
fn free_ports(addresses: &[Ipv4Addr]) -> Ports {
    let mut taken = Vec::new();
    let mut next = || loop {
        let port = crate::free_port();
        if taken.contains(&port) {
            continue;
        }
        let free_everywhere = addresses
            .iter()
            .all(|a| TcpListener::bind((*a, port)).is_ok());
        if free_everywhere {
            taken.push(port);
            return port;
        }
    };
    Ports {
        native: next(),
        storage: next(),
        api: next(),
        shard_aware: next(),
    }
}

/// The resident memory of a process in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// The CQL native protocol, version 4, as much as the harness needs:
// OPTIONS/SUPPORTED, STARTUP/READY, QUERY/RESULT(Rows).

const PROTOCOL_VERSION: u8 = 0x04;
const RESPONSE_FLAG: u8 = 0x80;
const OP_ERROR: u8 = 0x00;
const OP_STARTUP: u8 = 0x01;
const OP_READY: u8 = 0x02;
const OP_OPTIONS: u8 = 0x05;
const OP_SUPPORTED: u8 = 0x06;
const OP_QUERY: u8 = 0x07;
const OP_RESULT: u8 = 0x08;
const FLAG_TRACING: u8 = 0x02;
const FLAG_CUSTOM_PAYLOAD: u8 = 0x04;
const FLAG_WARNING: u8 = 0x08;
const CONSISTENCY_ONE: u16 = 0x0001;
const RESULT_VOID: i32 = 0x0001;
const RESULT_ROWS: i32 = 0x0002;
const RESULT_SET_KEYSPACE: i32 = 0x0003;
const RESULT_SCHEMA_CHANGE: i32 = 0x0005;
/// The largest response body the harness accepts.
const MAX_BODY: usize = 16 << 20;

/// What a node answers to `OPTIONS`: its `SUPPORTED` multimap (for example
/// `CQL_VERSION` and `PROTOCOL_VERSIONS`).
pub type Supported = BTreeMap<String, Vec<String>>;

/// Sends a CQL `OPTIONS` request (protocol v4) to `contact_point`
/// (`host:port`) and returns the `SUPPORTED` answer; every step times out
/// after 5 s.
pub fn cql_options(contact_point: &str) -> Result<Supported, String> {
    let mut connection = Connection::open(contact_point)?;
    let body = connection.request(OP_OPTIONS, &[], OP_SUPPORTED)?;
    Reader::new(&body).string_multimap()
}

/// Rows of a query on `system.*` tables, each a list of raw values.
type Rows = Vec<Vec<Option<Vec<u8>>>>;

fn query(contact_point: &str, cql: &str, consistency: u16) -> Result<Rows, String> {
    let mut connection = Connection::open(contact_point)?;
    let mut startup = Vec::new();
    put_string_map(&mut startup, &[("CQL_VERSION", "3.0.0")]);
    connection.request(OP_STARTUP, &startup, OP_READY)?;
    let mut body = Vec::new();
    let cql_len = i32::try_from(cql.len()).map_err(|_| "query too long".to_owned())?;
    body.extend_from_slice(&cql_len.to_be_bytes());
    body.extend_from_slice(cql.as_bytes());
    body.extend_from_slice(&consistency.to_be_bytes());
    body.push(0); // no values, no paging options
    let result = connection.request(OP_QUERY, &body, OP_RESULT)?;
    parse_rows(&result).map_err(|e| format!("{contact_point}: `{cql}`: {e}"))
}

fn peers(contact_point: &str) -> Result<Vec<Peer>, String> {
    let rows = query(
        contact_point,
        "SELECT peer, data_center, schema_version FROM system.peers",
        CONSISTENCY_ONE,
    )?;
    rows.into_iter()
        .map(|row| {
            let [peer, datacenter, schema_version] = <[Option<Vec<u8>>; 3]>::try_from(row)
                .map_err(|_| "system.peers: not 3 columns".to_owned())?;
            let address = match peer.as_deref() {
                Some(&[a, b, c, d]) => IpAddr::from([a, b, c, d]),
                Some(bytes) if bytes.len() == 16 => {
                    let mut octets = [0; 16];
                    octets.copy_from_slice(bytes);
                    IpAddr::from(octets)
                }
                other => return Err(format!("system.peers: bad peer {other:?}")),
            };
            let datacenter = datacenter
                .map(|d| String::from_utf8(d).map_err(|e| format!("system.peers: {e}")))
                .transpose()?;
            Ok(Peer {
                address,
                datacenter,
                schema_version: schema_version.as_deref().and_then(uuid),
            })
        })
        .collect()
}

fn local_schema_version(contact_point: &str) -> Result<Option<[u8; 16]>, String> {
    let rows = query(
        contact_point,
        "SELECT schema_version FROM system.local WHERE key = 'local'",
        CONSISTENCY_ONE,
    )?;
    Ok(rows
        .first()
        .and_then(|row| row.first())
        .and_then(|v| v.as_deref())
        .and_then(uuid))
}

fn uuid(bytes: &[u8]) -> Option<[u8; 16]> {
    bytes.try_into().ok()
}

struct Connection {
    stream: TcpStream,
    contact_point: String,
    next_stream_id: i16,
}

impl Connection {
    fn open(contact_point: &str) -> Result<Connection, String> {
        let address = contact_point
            .to_socket_addrs()
            .map_err(|e| format!("{contact_point}: {e}"))?
            .next()
            .ok_or_else(|| format!("{contact_point}: no address"))?;
        let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)
            .map_err(|e| format!("connecting to {contact_point}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| format!("{contact_point}: {e}"))?;
        Ok(Connection {
            stream,
            contact_point: contact_point.to_owned(),
            next_stream_id: 1,
        })
    }

    /// Sends one request and reads its response, which must have `expected`
    /// as opcode (an ERROR becomes its message); returns the body.
    fn request(&mut self, opcode: u8, body: &[u8], expected: u8) -> Result<Vec<u8>, String> {
        let stream_id = self.next_stream_id;
        self.next_stream_id = self.next_stream_id.wrapping_add(1);
        let length = u32::try_from(body.len()).map_err(|_| "request too long".to_owned())?;
        let mut frame = Vec::with_capacity(9 + body.len());
        frame.push(PROTOCOL_VERSION);
        frame.push(0); // flags: no compression, no tracing
        frame.extend_from_slice(&stream_id.to_be_bytes());
        frame.push(opcode);
        frame.extend_from_slice(&length.to_be_bytes());
        frame.extend_from_slice(body);
        let cp = &self.contact_point;
        self.stream
            .write_all(&frame)
            .map_err(|e| format!("writing to {cp}: {e}"))?;
        let mut header = [0u8; 9];
        self.stream
            .read_exact(&mut header)
            .map_err(|e| format!("reading from {cp}: {e}"))?;
        if header[0] != RESPONSE_FLAG | PROTOCOL_VERSION {
            return Err(format!(
                "{cp} answered with protocol byte {:#04x}, not a CQL v4 response",
                header[0]
            ));
        }
        let flags = header[1];
        let got_stream = i16::from_be_bytes([header[2], header[3]]);
        let got_opcode = header[4];
        let length = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        if length > MAX_BODY {
            return Err(format!("{cp} answered a body of {length} bytes"));
        }
        let mut response = vec![0; length];
        self.stream
            .read_exact(&mut response)
            .map_err(|e| format!("reading from {cp}: {e}"))?;
        if got_stream != stream_id {
            return Err(format!(
                "{cp} answered stream {got_stream}, not {stream_id}"
            ));
        }
        let mut reader = Reader::new(&response);
        if flags & FLAG_TRACING != 0 {
            reader.take(16)?;
        }
        if flags & FLAG_WARNING != 0 {
            reader.string_list()?;
        }
        if flags & FLAG_CUSTOM_PAYLOAD != 0 {
            let entries = reader.u16()?;
            for _ in 0..entries {
                reader.string()?;
                reader.bytes()?;
            }
        }
        let rest = reader.rest().to_vec();
        if got_opcode == OP_ERROR {
            let mut reader = Reader::new(&rest);
            let code = reader.i32()?;
            let message = reader.string()?;
            return Err(format!("{cp} answered error {code:#06x}: {message}"));
        }
        if got_opcode != expected {
            return Err(format!(
                "{cp} answered opcode {got_opcode:#04x}, not {expected:#04x}"
            ));
        }
        Ok(rest)
    }
}

fn put_string_map(out: &mut Vec<u8>, entries: &[(&str, &str)]) {
    let put_string = |out: &mut Vec<u8>, s: &str| {
        // Only short literals go here.
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    for (key, value) in entries {
        put_string(out, key);
        put_string(out, value);
    }
}

/// The rows of a `RESULT` body: none unless of kind `Rows`.
fn parse_rows(body: &[u8]) -> Result<Rows, String> {
    let mut reader = Reader::new(body);
    match reader.i32()? {
        RESULT_ROWS => {}
        RESULT_VOID | RESULT_SET_KEYSPACE | RESULT_SCHEMA_CHANGE => return Ok(Vec::new()),
        kind => return Err(format!("result kind {kind:#06x}, not rows")),
    }
    let flags = reader.i32()?;
    let columns = usize::try_from(reader.i32()?).map_err(|_| "negative column count")?;
    const GLOBAL_TABLES_SPEC: i32 = 0x0001;
    const HAS_MORE_PAGES: i32 = 0x0002;
    const NO_METADATA: i32 = 0x0004;
    if flags & HAS_MORE_PAGES != 0 {
        reader.bytes()?;
    }
    if flags & NO_METADATA == 0 {
        if flags & GLOBAL_TABLES_SPEC != 0 {
            reader.string()?;
            reader.string()?;
        }
        for _ in 0..columns {
            if flags & GLOBAL_TABLES_SPEC == 0 {
                reader.string()?;
                reader.string()?;
            }
            reader.string()?;
            reader.skip_type()?;
        }
    }
    let count = usize::try_from(reader.i32()?).map_err(|_| "negative row count")?;
    let mut rows = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let mut row = Vec::with_capacity(columns);
        for _ in 0..columns {
            row.push(reader.bytes()?.map(<[u8]>::to_vec));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Reads the protocol's notations from a body.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() < n {
            return Err(format!(
                "truncated response: {n} bytes wanted, {} left",
                self.data.len()
            ));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn rest(&self) -> &'a [u8] {
        self.data
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = usize::from(self.u16()?);
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("a string is not UTF-8: {e}"))
    }

    fn string_list(&mut self) -> Result<Vec<String>, String> {
        let n = self.u16()?;
        (0..n).map(|_| self.string()).collect()
    }

    fn string_multimap(&mut self) -> Result<Supported, String> {
        let n = self.u16()?;
        let mut map = Supported::new();
        for _ in 0..n {
            let key = self.string()?;
            let values = self.string_list()?;
            map.insert(key, values);
        }
        Ok(map)
    }

    /// `[bytes]`: a length, then as many bytes; a negative length is null.
    fn bytes(&mut self) -> Result<Option<&'a [u8]>, String> {
        let n = self.i32()?;
        match usize::try_from(n) {
            Ok(n) => self.take(n).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Skips an `[option]` naming a column type.
    fn skip_type(&mut self) -> Result<(), String> {
        match self.u16()? {
            0x0000 => {
                self.string()?;
            }
            0x0020 | 0x0022 => self.skip_type()?,
            0x0021 => {
                self.skip_type()?;
                self.skip_type()?;
            }
            0x0030 => {
                self.string()?;
                self.string()?;
                for _ in 0..self.u16()? {
                    self.string()?;
                    self.skip_type()?;
                }
            }
            0x0031 => {
                for _ in 0..self.u16()? {
                    self.skip_type()?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rows_result_parses() {
        // kind=Rows, flags=global spec, 2 columns (inet, varchar), 1 row.
        let mut body = Vec::new();
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        for s in ["system", "peers", "peer"] {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        body.extend_from_slice(&0x0010u16.to_be_bytes());
        body.extend_from_slice(&2u16.to_be_bytes());
        body.extend_from_slice(b"dc");
        body.extend_from_slice(&0x0021u16.to_be_bytes()); // map<varchar, int>
        body.extend_from_slice(&0x000du16.to_be_bytes());
        body.extend_from_slice(&0x0009u16.to_be_bytes());
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&[127, 0, 0, 3]);
        body.extend_from_slice(&(-1i32).to_be_bytes());
        let rows = parse_rows(&body).unwrap();
        assert_eq!(rows, vec![vec![Some(vec![127, 0, 0, 3]), None]]);
    }

    #[test]
    fn a_truncated_body_is_an_error() {
        assert!(parse_rows(&[0, 0, 0, 2, 0]).is_err());
        assert!(Reader::new(&[0, 5, b'a']).string().is_err());
    }

    #[test]
    fn the_default_home_names_the_version() {
        if let Some(home) = default_cassandra_home() {
            assert!(home.ends_with(format!("chappe/cassandra-{CASSANDRA_VERSION}")));
        }
    }
}
