//! `render --file platform.yaml [--service-monitors]`: prints, offline,
//! every manifest the operator would apply for a ChappePlatform, as one
//! multi-document YAML.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Render the manifests of a ChappePlatform without a cluster.
#[derive(Debug, Parser)]
#[command(name = "render", about)]
struct Args {
    /// The ChappePlatform YAML file.
    #[arg(long)]
    file: PathBuf,
    /// Include ServiceMonitors (monitoring.coreos.com/v1).
    #[arg(long)]
    service_monitors: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let yaml = match std::fs::read_to_string(&args.file) {
        Ok(y) => y,
        Err(e) => {
            eprintln!("error: reading {}: {e}", args.file.display());
            return ExitCode::from(66);
        }
    };
    let rendered = chappe_operator::render::read_platform(&yaml)
        .and_then(|p| chappe_operator::render::render(&p, args.service_monitors));
    match rendered {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", args.file.display());
            ExitCode::from(65)
        }
    }
}
