//! `chappe`: parse, start logging, run the command.

use std::process::ExitCode;

use chappe_cli::cli::{Cli, Command, run};
use clap::Parser as _;

/// sysexits' EX_USAGE: the command line or its environment is wrong.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // The platform logs its lifecycle; client verbs keep stderr for problems.
    let default_filter = match cli.command {
        Command::Up(_) => "warn,chappe=info",
        _ => "warn",
    };
    chappe_telemetry::init(cli.log_format, default_filter);
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
