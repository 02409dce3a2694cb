//! A real Kubernetes API server for tests, started by the test itself.
//!
//! - [`KubeApiServer`]: `etcd` and `kube-apiserver` on free loopback ports
//!   in a temporary directory, with a test CA, a serving certificate, a
//!   service-account key pair and one bearer token in the `system:masters`
//!   group; stopped when the value is dropped. [`KubeApiServer::shared`] is
//!   one server per test process (a start costs 3-5 s and ~280 MB), in
//!   which every test makes its own namespace.
//! - What a client needs, without tying the harness to a client library:
//!   [`KubeApiServer::server_url`], [`KubeApiServer::ca_pem`],
//!   [`KubeApiServer::token`], or all of them as a kubeconfig
//!   ([`KubeApiServer::kubeconfig`], [`KubeApiServer::kubeconfig_path`]).
//!
//! Only the API server runs: no controller-manager, no scheduler, no
//! kubelet. Nothing creates pods, fills in the status of Deployments or
//! Jobs, or deletes what owner references point at: a test plays those
//! controllers itself (it patches `/status` subresources).
//!
//! The binaries are built from source by `scripts/install-kube-apiserver.sh`
//! (the Go module proxy only; no Docker, no kind). The harness looks in
//! `CHAPPE_KUBE_APISERVER_BIN` (a directory holding `kube-apiserver` and
//! `etcd`), else in the script's default directory; without them it panics
//! and says what to run: a test never passes silently without its server
//! (CONVENTIONS.md, "Tests"). The certificates are made with the `openssl`
//! command.
//!
//! The processes are started by one long-lived thread with
//! `PR_SET_PDEATHSIG`, so they die with the test process even when no
//! destructor runs (the shared server lives in a static); their
//! directories, left behind then, are removed by the next start once their
//! test process is gone.

use crate::process::{self, owned_temp_dir, spawn_tied_to_process};
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;

/// The Kubernetes release `scripts/install-kube-apiserver.sh` builds
/// (change both together).
pub const KUBE_VERSION: &str = "v1.34.4";
/// A directory holding `kube-apiserver` and `etcd`; without it,
/// [`default_bin_dir`].
pub const KUBE_APISERVER_BIN_ENV: &str = "CHAPPE_KUBE_APISERVER_BIN";
/// The bearer token of the test user (`chappe-admin`, in `system:masters`).
pub const TOKEN: &str = "chappe-test-token";
/// The name of the test user.
pub const USER: &str = "chappe-admin";

/// How long etcd may take to answer `/health`.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long kube-apiserver may take to answer `/readyz` (3-5 s measured).
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Connect, read and write timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How many times the server is started on new ports when its ports were
/// taken.
const PORT_ATTEMPTS: usize = 3;
/// Lines of each log given in a failure message.
const LOG_TAIL_LINES: usize = 40;

const INSTALL_HINT: &str = "run `scripts/install-kube-apiserver.sh` (it builds kube-apiserver \
    and etcd from source with Go >= 1.24, about 10 minutes the first time, and prints the bin \
    directory), or set CHAPPE_KUBE_APISERVER_BIN to a directory holding `kube-apiserver` and \
    `etcd`";

/// A kube-apiserver and its etcd, owned by a test. Dropping the value stops
/// both and removes their directory.
pub struct KubeApiServer {
    dir: TempDir,
    port: u16,
    etcd_port: u16,
    ca_pem: String,
    apiserver: Process,
    etcd: Process,
}

impl fmt::Debug for KubeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeApiServer")
            .field("server_url", &self.server_url())
            .field("etcd_url", &self.etcd_url())
            .field("dir", &self.dir.path())
            .field("pid", &self.pid())
            .finish()
    }
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver on free loopback ports and waits until
    /// the API server answers `/readyz`.
    ///
    /// Panics with what to install when the binaries (or `openssl`) are
    /// missing, and with the logs when a server does not start.
    pub fn start() -> KubeApiServer {
        let bin = find_bin_dir();
        let openssl = crate::on_path("openssl").unwrap_or_else(|| {
            panic!(
                "`openssl` is not on PATH: the kube-apiserver harness makes its certificates \
                 with it (apt-get install openssl)"
            )
        });
        let dir = owned_temp_dir("chappe-kube-")
            .unwrap_or_else(|e| panic!("cannot create a directory for kube-apiserver: {e}"));
        let pki = dir.path().join("pki");
        if let Err(e) = make_pki(&openssl, &pki) {
            panic!("cannot make the kube-apiserver test certificates: {e}");
        }
        let ca_pem = fs::read_to_string(pki.join("ca.crt"))
            .unwrap_or_else(|e| panic!("reading the test CA: {e}"));
        let tls = tls_config(&ca_pem).unwrap_or_else(|e| panic!("the test CA: {e}"));

        let mut last_error = String::new();
        for attempt in 0..PORT_ATTEMPTS {
            let [etcd_port, peer_port, port] = free_ports();
            let mut etcd = match Process::spawn(
                "etcd",
                etcd_command(&bin, dir.path(), attempt, etcd_port, peer_port),
                dir.path().join(format!("etcd-{attempt}.log")),
            ) {
                Ok(p) => p,
                Err(e) => panic!("etcd does not start: {e}"),
            };
            if let Err(e) = etcd.wait_ready(ETCD_READY_TIMEOUT, || etcd_healthy(etcd_port)) {
                etcd.kill();
                if etcd.port_taken() {
                    last_error = e;
                    continue;
                }
                panic!("etcd did not start: {e}");
            }
            let mut apiserver = match Process::spawn(
                "kube-apiserver",
                apiserver_command(&bin, dir.path(), etcd_port, port),
                dir.path().join(format!("kube-apiserver-{attempt}.log")),
            ) {
                Ok(p) => p,
                Err(e) => {
                    etcd.kill();
                    panic!("kube-apiserver does not start: {e}");
                }
            };
            let ready = apiserver.wait_ready(APISERVER_READY_TIMEOUT, || {
                https_get(&tls, port, "/readyz").is_ok_and(|(status, _)| status == 200)
            });
            if let Err(e) = ready {
                apiserver.kill();
                etcd.kill();
                if apiserver.port_taken() {
                    last_error = e;
                    continue;
                }
                panic!(
                    "kube-apiserver did not start: {e}\netcd log:\n{}",
                    etcd.log_tail()
                );
            }
            let server = KubeApiServer {
                dir,
                port,
                etcd_port,
                ca_pem,
                apiserver,
                etcd,
            };
            if let Err(e) = fs::write(server.kubeconfig_path(), server.kubeconfig()) {
                panic!("writing the kubeconfig: {e}");
            }
            return server;
        }
        panic!("kube-apiserver did not start: {last_error}");
    }

    /// One server for the whole test process, started by the first caller:
    /// tests share it and isolate themselves with their own namespace. It
    /// is killed when the test process exits.
    pub fn shared() -> &'static KubeApiServer {
        static SHARED: OnceLock<Result<KubeApiServer, String>> = OnceLock::new();
        process::shared(&SHARED, KubeApiServer::start, "kube-apiserver")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` of etcd (no TLS, no authentication).
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    /// The PEM of the CA that signed the server's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The file holding [`KubeApiServer::ca_pem`].
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("pki").join("ca.crt")
    }

    /// The bearer token of a user in `system:masters` (every permission).
    pub fn token(&self) -> &str {
        TOKEN
    }

    /// A kubeconfig for the server: cluster, user and context
    /// `chappe-test`, the CA by path, the token inline.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: chappe-test\n\
             \x20 cluster:\n\
             \x20   server: {server}\n\
             \x20   certificate-authority: {ca:?}\n\
             users:\n\
             - name: {USER}\n\
             \x20 user:\n\
             \x20   token: {TOKEN}\n\
             contexts:\n\
             - name: chappe-test\n\
             \x20 context:\n\
             \x20   cluster: chappe-test\n\
             \x20   user: {USER}\n\
             \x20   namespace: default\n\
             current-context: chappe-test\n",
            server = self.server_url(),
            ca = self.ca_path().to_string_lossy(),
        )
    }

    /// The file holding [`KubeApiServer::kubeconfig`] (for `kubectl
    /// --kubeconfig` while debugging a test).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The operating system's id of the kube-apiserver process.
    pub fn pid(&self) -> Option<u32> {
        self.apiserver.pid()
    }

    /// The resident memory of kube-apiserver and etcd together, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let apiserver = crate::cql::rss_bytes(self.apiserver.pid()?)?;
        let etcd = crate::cql::rss_bytes(self.etcd.pid()?)?;
        Some(apiserver + etcd)
    }

    /// The last lines of the kube-apiserver and etcd logs, for a failure
    /// message.
    pub fn log_tail(&self) -> String {
        format!(
            "kube-apiserver log ({}):\n{}\netcd log ({}):\n{}",
            self.apiserver.log.display(),
            self.apiserver.log_tail(),
            self.etcd.log.display(),
            self.etcd.log_tail()
        )
    }

    /// Stops kube-apiserver, then etcd (SIGTERM, then SIGKILL after 15 s).
    /// Dropping the value does the same.
    pub fn stop(&mut self) {
        self.apiserver.stop();
        self.etcd.stop();
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The default install directory of `scripts/install-kube-apiserver.sh`:
/// `${XDG_CACHE_HOME:-$HOME/.cache}/chappe/kube-apiserver-<version>/bin`.
pub fn default_bin_dir() -> Option<PathBuf> {
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
            .join(format!("kube-apiserver-{KUBE_VERSION}"))
            .join("bin"),
    )
}

/// The directory holding `kube-apiserver` and `etcd`; panics with what to
/// run when there is none.
fn find_bin_dir() -> PathBuf {
    let (dir, from) = match std::env::var_os(KUBE_APISERVER_BIN_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => (PathBuf::from(dir), KUBE_APISERVER_BIN_ENV),
        None => (
            default_bin_dir().unwrap_or_else(|| {
                panic!(
                    "neither HOME nor XDG_CACHE_HOME is set to find kube-apiserver: {INSTALL_HINT}"
                )
            }),
            "the default directory",
        ),
    };
    for binary in ["kube-apiserver", "etcd"] {
        if !dir.join(binary).is_file() {
            panic!("no {binary} in {} ({from}): {INSTALL_HINT}", dir.display());
        }
    }
    dir
}

/// Three different ports that were free a moment ago.
fn free_ports() -> [u16; 3] {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 3 {
        let port = crate::free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    [ports[0], ports[1], ports[2]]
}

/// Runs `openssl` in `dir` and fails with its output when it fails.
fn openssl(openssl: &Path, dir: &Path, args: &[&str]) -> Result<(), String> {
    let output = Command::new(openssl)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", openssl.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Writes into `dir` a CA, the serving certificate of 127.0.0.1 and
/// localhost, the service-account key pair and the token file.
fn make_pki(openssl_bin: &Path, dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let run = |args: &[&str]| openssl(openssl_bin, dir, args);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "365",
        "-subj",
        "/CN=chappe-test-ca",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "serving.key",
        "-out",
        "serving.csr",
        "-subj",
        "/CN=kube-apiserver",
    ])?;
    fs::write(
        dir.join("serving.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| format!("writing serving.ext: {e}"))?;
    run(&[
        "x509",
        "-req",
        "-in",
        "serving.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "serving.crt",
        "-days",
        "365",
        "-extfile",
        "serving.ext",
    ])?;
    run(&["genrsa", "-out", "sa.key", "2048"])?;
    run(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    fs::write(
        dir.join("tokens.csv"),
        format!("{TOKEN},{USER},{USER}-uid,\"system:masters\"\n"),
    )
    .map_err(|e| format!("writing tokens.csv: {e}"))?;
    Ok(())
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn etcd_command(bin: &Path, dir: &Path, attempt: usize, port: u16, peer_port: u16) -> Command {
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new(bin.join("etcd"));
    command
        .arg("--name=default")
        // A new directory per attempt: a failed attempt may have written
        // its peer URL into the last one.
        .arg(format!(
            "--data-dir={}",
            path_str(&dir.join(format!("etcd-data-{attempt}")))
        ))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=default={peer}"))
        // A test server is never restarted: what it stored need not
        // survive a power loss.
        .arg("--unsafe-no-fsync=true")
        .arg("--log-level=warn");
    command
}

fn apiserver_command(bin: &Path, dir: &Path, etcd_port: u16, port: u16) -> Command {
    let pki = |name: &str| path_str(&dir.join("pki").join(name));
    let mut command = Command::new(bin.join("kube-apiserver"));
    command
        .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--tls-cert-file={}", pki("serving.crt")))
        .arg(format!("--tls-private-key-file={}", pki("serving.key")))
        .arg(format!("--cert-dir={}", path_str(&dir.join("certdir"))))
        .arg(format!("--service-account-key-file={}", pki("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki("sa.key")
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--token-auth-file={}", pki("tokens.csv")))
        .arg("--authorization-mode=RBAC")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        // No controller-manager creates service accounts' tokens.
        .arg("--disable-admission-plugins=ServiceAccount")
        // No kubelet: nothing to put in the `kubernetes` Service's endpoints.
        .arg("--endpoint-reconciler-type=none")
        .arg("--allow-privileged=true")
        .arg("--profiling=false");
    command
}

/// Whether etcd answers `GET /health` with `"health":"true"`.
fn etcd_healthy(port: u16) -> bool {
    process::http_get_ok(port, "/health", PROBE_TIMEOUT)
        .is_some_and(|body| body.replace(' ', "").contains("\"health\":\"true\""))
}

/// A TLS client configuration that trusts the test CA only.
fn tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("reading the CA PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("adding the CA to the roots: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS versions: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `GET https://127.0.0.1:PORT{path}` with the test token: the status code
/// and the body.
fn https_get(
    tls: &Arc<rustls::ClientConfig>,
    port: u16,
    path: &str,
) -> Result<(u16, String), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut socket =
        TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let _ = socket.set_read_timeout(Some(PROBE_TIMEOUT));
    let _ = socket.set_write_timeout(Some(PROBE_TIMEOUT));
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut connection =
        rustls::ClientConnection::new(tls.clone(), name).map_err(|e| format!("TLS: {e}"))?;
    let mut stream = rustls::Stream::new(&mut connection, &mut socket);
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    // The server may close without a TLS close_notify: keep what was read.
    if let Err(e) = stream.read_to_end(&mut response)
        && response.is_empty()
    {
        return Err(format!("read: {e}"));
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One server process, its output in a log file.
struct Process {
    name: &'static str,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Result<Process, String> {
        let file =
            fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let file_err = file
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", log.display()))?;
        command.stdin(Stdio::null()).stdout(file).stderr(file_err);
        let child = spawn_tied_to_process(command).map_err(|e| format!("running {name}: {e}"))?;
        Ok(Process {
            name,
            log,
            child: Some(child),
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Polls `ready` until it holds; fails when the process exits or the
    /// time is up, with the log's tail.
    fn wait_ready(&mut self, timeout: Duration, ready: impl Fn() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "{} exited with {status}; log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                ));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} is not ready after {timeout:?}; log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    /// Whether the log says a port was taken.
    fn port_taken(&self) -> bool {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains("address already in use")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// SIGTERM, then SIGKILL if the process has not exited in time.
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

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_bin_dir_is_the_install_scripts() {
        let dir = default_bin_dir().expect("HOME is set");
        assert!(dir.ends_with(format!("chappe/kube-apiserver-{KUBE_VERSION}/bin")));
        let script = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install-kube-apiserver.sh"),
        )
        .expect("scripts/install-kube-apiserver.sh");
        assert!(
            script.contains(&format!("KUBE_VERSION={KUBE_VERSION}\n")),
            "scripts/install-kube-apiserver.sh builds another version than {KUBE_VERSION}"
        );
    }
}
