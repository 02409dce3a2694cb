//! `chappe`: parse, start logging, run the command.

use std::process::ExitCode;

use chappe_cli::cli::{Cli, Command, run};

fn main() -> ExitCode {
    chappe_telemetry::program::main(
        |cli: &Cli| {
            // The platform logs its lifecycle; client verbs keep stderr for
            // problems.
            let filter = match cli.command {
                Command::Up(_) => "warn,chappe=info",
                _ => "warn",
            };
            (cli.log_format, filter)
        },
        run,
    )
}
