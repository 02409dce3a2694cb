//! Where a benchmark's report goes: `--out -` prints it as JSON on stdout
//! (and nothing else there), `--out FILE` writes the JSON to FILE, and
//! unless the JSON went to stdout the human-readable text is printed.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

/// Writes `report` as `out` says, and prints `text()` unless the JSON
/// went to stdout.
pub fn emit<R: Serialize>(
    report: &R,
    out: Option<&Path>,
    text: impl FnOnce() -> String,
) -> Result<()> {
    match out {
        Some(p) if p == Path::new("-") => {
            println!("{}", serde_json::to_string_pretty(report)?);
            return Ok(());
        }
        Some(p) => {
            std::fs::write(p, serde_json::to_string_pretty(report)?)
                .with_context(|| format!("writing {}", p.display()))?;
            eprintln!("report: {}", p.display());
        }
        None => {}
    }
    print!("{}", text());
    Ok(())
}
