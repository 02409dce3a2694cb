//! What every Chappe command-line program does around its work: parse the
//! command line (a usage error exits 64, sysexits' EX_USAGE; `--help` and
//! `--version` exit 0), start logging, run on a tokio runtime, and on
//! failure print the error with its causes and exit 1. And what every
//! service process shares: [`ServiceArgs`], and [`ServiceTelemetry`], its
//! operations server and trace export.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use crate::LogFormat;
use crate::http::{Health, OpsServer, RunningOpsServer};
use crate::otel::{OtlpConfig, TracingGuard};

/// sysexits' EX_USAGE: the command line or its environment is wrong.
pub const EXIT_USAGE: u8 = 64;

/// Runs a program. `logging` picks the log format and default filter from
/// the parsed command line.
pub fn main<C, F, E>(
    logging: impl FnOnce(&C) -> (LogFormat, &'static str),
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    C: clap::Parser,
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let (format, default_filter) = logging(&cli);
    crate::init(format, default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The settings every service process shares: where NATS is, the subject
/// prefix, the store, the log format, the operations server and trace
/// export. Each service's binary flattens this into its own arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// NATS servers (JetStream enabled), comma-separated.
    #[arg(
        long,
        env = "CHAPPE_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ','
    )]
    pub nats: Vec<String>,
    /// Prefix of every subject.
    #[arg(long, env = "CHAPPE_SUBJECT_PREFIX", default_value = "chappe")]
    pub prefix: String,
    /// Replicas of the JetStream streams and key-value buckets this service
    /// creates (delivery jobs, presence): 3 in a NATS cluster of three or
    /// more, so that losing a NATS server loses no job; at most the
    /// cluster's size.
    #[arg(long, env = "CHAPPE_JETSTREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub jetstream_replicas: u8,
    /// Where data lives: `embedded:PATH` (or a bare PATH), the embedded
    /// SQLite file, which services of one machine may share; or
    /// `scylla://host1:9042,host2/KEYSPACE?dc=DC&rf=DC1:3,DC2:3`, a CQL
    /// cluster whose keyspace `chappe migrate` prepared (parsed by
    /// `chappe_storage::StoreLocation`).
    #[arg(long, env = "CHAPPE_STORE", default_value = "chappe-data/chappe.db")]
    pub store: String,
    /// Log format on stderr: text or json.
    #[arg(long, env = "CHAPPE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Address of the operations HTTP server: `/metrics` (Prometheus),
    /// `/healthz`, `/readyz`. Default: 127.0.0.1 and the service's own port
    /// (gateway 9471, fanout 9472, keydir 9473, presence 9474, media 9475;
    /// `chappe up` 9470), or a
    /// free port when that one is taken; a cluster sets 0.0.0.0:PORT for its
    /// scraper. The address in use is printed as `chappe-<service> metrics
    /// on http://ADDR` before the ready line.
    #[arg(long, env = "CHAPPE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC collector to export traces to (`http://collector:4317`).
    /// Off when unset; OTEL_EXPORTER_OTLP_ENDPOINT (or
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is honoured too.
    #[arg(long, env = "CHAPPE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Default operations ports, one per binary so that a machine may run all.
pub mod ports {
    pub const UP: u16 = 9470;
    pub const GATEWAY: u16 = 9471;
    pub const FANOUT: u16 = 9472;
    pub const KEYDIR: u16 = 9473;
    pub const PRESENCE: u16 = 9474;
    pub const MEDIA: u16 = 9475;
}

/// Prints one line on stdout for whoever started the process (the ready
/// line, the metrics address) and flushes it. A closed stdout is not an
/// error: the service runs on.
pub fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Why telemetry did not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Bind(#[from] crate::http::BindError),
    #[error(transparent)]
    Otlp(#[from] crate::otel::Error),
}

/// The operations server and trace export of a running process.
pub struct ServiceTelemetry {
    server: RunningOpsServer,
    addr: SocketAddr,
    tracing: Option<TracingGuard>,
}

impl ServiceTelemetry {
    /// Starts trace export when an OTLP endpoint is configured, and serves
    /// `/metrics`, `/healthz` and `/readyz` (ready when every `health` check
    /// passes) on `listen` (see [`ServiceTelemetry::addr`]). `name` is the
    /// service name of exported spans.
    pub async fn start(
        name: &str,
        listen: MetricsListen,
        otlp_endpoint: Option<&str>,
        health: Health,
    ) -> Result<Self, TelemetryError> {
        let server = match listen {
            MetricsListen::Given(addr) => OpsServer::bind(addr, health).await?,
            MetricsListen::Default(addr) => match OpsServer::bind(addr, health.clone()).await {
                Ok(server) => server,
                Err(e) if e.source.kind() == std::io::ErrorKind::AddrInUse => {
                    // Several services on one machine (a test cluster): the
                    // default port went to the first; the address in use is
                    // announced, which is what finds it.
                    tracing::warn!(%addr, "default metrics address taken; using a free port");
                    OpsServer::bind(SocketAddr::new(addr.ip(), 0), health).await?
                }
                Err(e) => return Err(e.into()),
            },
        };
        let addr = server
            .local_addr()
            .map_err(|source| crate::http::BindError {
                addr: listen.addr(),
                source,
            })?;
        let tracing = match OtlpConfig::resolve(otlp_endpoint, name) {
            Some(config) => Some(crate::otel::install(&config)?),
            None => None,
        };
        Ok(Self {
            server: server.spawn(),
            addr,
            tracing,
        })
    }

    /// Where the operations server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Announces `<name> metrics on http://ADDR` (before the ready line, so
    /// that whoever started the process can find it).
    pub fn announce(&self, name: &str) {
        announce(&format!("{name} metrics on http://{}", self.addr));
    }

    /// Stops the operations server and flushes the spans not yet exported.
    pub async fn shutdown(self) {
        self.server.stop().await;
        if let Some(tracing) = self.tracing {
            tracing.shutdown().await;
        }
    }
}

/// Where the operations server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// Asked for: it binds there or the process does not start.
    Given(SocketAddr),
    /// The default: when it is taken, a free port of the same address.
    Default(SocketAddr),
}

impl MetricsListen {
    /// `given`, else 127.0.0.1:`default_port`.
    pub fn or_default(given: Option<SocketAddr>, default_port: u16) -> Self {
        match given {
            Some(addr) => Self::Given(addr),
            None => Self::Default(SocketAddr::from(([127, 0, 0, 1], default_port))),
        }
    }

    pub fn addr(self) -> SocketAddr {
        match self {
            Self::Given(a) | Self::Default(a) => a,
        }
    }
}

impl ServiceArgs {
    /// The operations address: `--metrics-listen`, else 127.0.0.1:`port`.
    pub fn metrics_listen(&self, default_port: u16) -> MetricsListen {
        MetricsListen::or_default(self.metrics_listen, default_port)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        service: ServiceArgs,
    }

    #[test]
    fn the_defaults_parse_and_flags_are_checked() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(
            cli.service.metrics_listen(ports::FANOUT),
            MetricsListen::Default("127.0.0.1:9472".parse().unwrap())
        );
        let cli = Cli::try_parse_from([
            "x",
            "--metrics-listen",
            "0.0.0.0:0",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
        ])
        .unwrap();
        assert_eq!(
            cli.service.metrics_listen(1),
            MetricsListen::Given("0.0.0.0:0".parse().unwrap())
        );
        assert_eq!(
            cli.service.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        let err = Cli::try_parse_from(["x", "--metrics-listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--metrics-listen"), "{err}");
    }
}
