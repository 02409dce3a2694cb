//! What every Chappe command-line program does around its work: parse the
//! command line (a usage error exits 64, sysexits' EX_USAGE; `--help` and
//! `--version` exit 0), start logging, run on a tokio runtime, and on
//! failure print the error with its causes and exit 1.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::LogFormat;

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
/// prefix, the store, and the log format. Each service's binary flattens
/// this into its own arguments.
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
    /// The embedded store's database file (services of one machine may
    /// share it).
    #[arg(long, env = "CHAPPE_STORE", default_value = "chappe-data/chappe.db")]
    pub store: PathBuf,
    /// Log format on stderr: text or json.
    #[arg(long, env = "CHAPPE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}
