//! `chappe-loadtest`: parse, run, exit.

use std::process::ExitCode;

use chappe_loadtest::cli::{Cli, run};

fn main() -> ExitCode {
    chappe_telemetry::program::main(|_: &Cli| (chappe_telemetry::LogFormat::Text, "error"), run)
}
