//! Chappe as a deployment runs it: one `chappe-keydir`, one
//! `chappe-presence`, one `chappe-media`, some `chappe-fanout` and some
//! `chappe-gateway` processes over one nats-server, sharing one embedded
//! store file. A test kills, restarts and stops any of them.
//!
//! The service binaries are built (once per test process, with the test's
//! own profile) by `cargo build`, so a test never runs stale ones: cargo
//! only offers `CARGO_BIN_EXE_*` to the tests of the binary's own package.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

use crate::{NatsServer, ServiceProcess, free_port};

/// How many of each service to run, and extra settings for them.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub gateways: usize,
    pub fanouts: usize,
    /// `CHAPPE_*` variables given to every service process.
    pub env: Vec<(String, String)>,
}

impl Default for ClusterConfig {
    /// Two gateways, two fanouts (and always one keydir, one presence, one
    /// media): every path that crosses processes is crossed.
    fn default() -> Self {
        Self {
            gateways: 2,
            fanouts: 2,
            env: Vec::new(),
        }
    }
}

/// One service process and how to start it again.
struct Service {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    process: Option<ServiceProcess>,
}

impl Service {
    fn new(program: PathBuf, args: Vec<OsString>, env: Vec<(OsString, OsString)>) -> Self {
        let mut service = Self {
            program,
            args,
            env,
            process: None,
        };
        service.start();
        service
    }

    fn start(&mut self) {
        assert!(self.process.is_none(), "{} already runs", self.name());
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG");
        let (process, _ready) = ServiceProcess::start(&mut command);
        self.process = Some(process);
    }

    fn name(&self) -> String {
        self.program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.process.take().map(ServiceProcess::terminate)
    }

    fn process(&self) -> &ServiceProcess {
        self.process
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name()))
    }
}

/// keydir, presence, media, fanouts and gateways in processes of their own
/// over a nats-server of their own. Dropping it kills everything.
pub struct Cluster {
    // Services first: they are killed before NATS goes.
    keydir: Service,
    presence: Service,
    media: Service,
    fanouts: Vec<Service>,
    gateways: Vec<Service>,
    gateway_urls: Vec<String>,
    nats: NatsServer,
    dir: TempDir,
}

impl Cluster {
    /// Starts NATS, then keydir, the fanouts and the gateways (each waited
    /// for until ready). Gateways listen on fixed loopback ports, so a
    /// restarted gateway is found where it was.
    pub fn start(config: ClusterConfig) -> Cluster {
        assert!(config.gateways > 0, "a cluster needs a gateway");
        let nats = NatsServer::start();
        let dir = tempfile::Builder::new()
            .prefix("chappe-cluster-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create the cluster's directory: {e}"));
        let key = dir.path().join("session.key");
        std::fs::write(&key, rand_key()).expect("session key written");
        let mut env: Vec<(OsString, OsString)> = vec![
            ("CHAPPE_NATS_URL".into(), nats.url().into()),
            (
                "CHAPPE_STORE".into(),
                dir.path().join("chappe.db").into_os_string(),
            ),
            ("CHAPPE_SESSION_KEY_FILE".into(), key.into_os_string()),
        ];
        env.extend(
            config
                .env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        let binaries = binaries();
        let keydir = Service::new(binaries.join("chappe-keydir"), Vec::new(), env.clone());
        let presence = Service::new(binaries.join("chappe-presence"), Vec::new(), env.clone());
        let media = Service::new(binaries.join("chappe-media"), Vec::new(), env.clone());
        let fanouts = (0..config.fanouts)
            .map(|_| Service::new(binaries.join("chappe-fanout"), Vec::new(), env.clone()))
            .collect();
        let mut gateway_urls = Vec::new();
        let gateways = (0..config.gateways)
            .map(|_| {
                let addr = format!("127.0.0.1:{}", free_port());
                gateway_urls.push(format!("http://{addr}"));
                Service::new(
                    binaries.join("chappe-gateway"),
                    vec!["--dev-login".into(), "--listen".into(), addr.into()],
                    env.clone(),
                )
            })
            .collect();
        Cluster {
            keydir,
            presence,
            media,
            fanouts,
            gateways,
            gateway_urls,
            nats,
            dir,
        }
    }

    /// Every gateway's `http://127.0.0.1:port`, in order.
    pub fn gateway_urls(&self) -> &[String] {
        &self.gateway_urls
    }

    /// The cluster's directory (its store file is `chappe.db` in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn nats(&mut self) -> &mut NatsServer {
        &mut self.nats
    }

    /// `kill -9` of fanout `i`.
    pub fn kill_fanout(&mut self, i: usize) {
        self.fanouts[i].kill();
    }

    /// Starts fanout `i` again (after a kill) and waits until it is ready.
    pub fn start_fanout(&mut self, i: usize) {
        self.fanouts[i].start();
    }

    /// SIGTERM to fanout `i`, returning how it exited.
    pub fn terminate_fanout(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.fanouts[i].terminate()
    }

    /// `kill -9` of gateway `i`.
    pub fn kill_gateway(&mut self, i: usize) {
        self.gateways[i].kill();
    }

    /// SIGTERM to gateway `i`, returning how it exited.
    pub fn terminate_gateway(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.gateways[i].terminate()
    }

    /// Starts gateway `i` again, on its port.
    pub fn start_gateway(&mut self, i: usize) {
        self.gateways[i].start();
    }

    /// A line gateway `i` printed before it was ready.
    pub fn gateway_line(&self, i: usize, needle: &str) -> Option<String> {
        self.gateways[i].process().line_with(needle).map(Into::into)
    }

    /// A line the presence service printed before it was ready.
    pub fn presence_line(&self, needle: &str) -> Option<String> {
        self.presence.process().line_with(needle).map(Into::into)
    }

    /// A line the media service printed before it was ready.
    pub fn media_line(&self, needle: &str) -> Option<String> {
        self.media.process().line_with(needle).map(Into::into)
    }

    /// A line keydir printed before it was ready.
    pub fn keydir_line(&self, needle: &str) -> Option<String> {
        self.keydir.process().line_with(needle).map(Into::into)
    }

    /// A line fanout `i` printed before it was ready.
    pub fn fanout_line(&self, i: usize, needle: &str) -> Option<String> {
        self.fanouts[i].process().line_with(needle).map(Into::into)
    }

    /// Stops every service with SIGTERM (gateways first, so clients are told
    /// to go), and panics unless each exits cleanly.
    pub fn stop(mut self) {
        let mut unclean = Vec::new();
        let services = self
            .gateways
            .iter_mut()
            .chain(self.fanouts.iter_mut())
            .chain([&mut self.media, &mut self.presence, &mut self.keydir]);
        for service in services {
            if let Some(status) = service.terminate()
                && !status.success()
            {
                unclean.push(format!("{}: {status}", service.name()));
            }
        }
        assert!(unclean.is_empty(), "unclean exits: {unclean:?}");
    }
}

fn rand_key() -> [u8; 32] {
    use std::io::Read as _;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("random bytes");
    key
}

/// The directory holding the service binaries, built for this test's
/// profile on first use.
fn binaries() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // target/<profile>/deps/<test binary>
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in target/<profile>/deps")
            .to_path_buf();
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let mut build = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        // Cargo gives each test process its package's CARGO_PKG_* and
        // CARGO_MANIFEST_* variables; build scripts (ring's) read them, so
        // passing them on made every test package rebuild the services
        // (a minute or more each) instead of finding them built.
        for (name, _) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    name,
                    "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR"
                )
            {
                build.env_remove(name);
            }
        }
        // The whole workspace's binaries and tests, as `cargo test
        // --workspace` builds them: features are unified over what a build
        // selects, so building only the five services' binaries gave their
        // dependencies other features (serde_json, regex, chrono, …: the
        // operator's dependencies add some) and rebuilt them all, over two
        // minutes of the suite. Under the suite this finds everything built;
        // alone (`cargo test -p chappe-cli`), the first run builds the
        // workspace's tests too.
        build
            .arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["--workspace", "--bins", "--tests"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to build the services: {e}"));
        assert!(status.success(), "building the service binaries failed");
        profile_dir
    })
    .clone()
}
