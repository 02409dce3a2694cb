#!/usr/bin/env bash
# The full test suite, as CI runs it (.ci/run calls this script).
#
# Installs what it needs that is missing, then checks formatting and lints
# and runs every test of the workspace: unit tests, the store conformance
# suite, and the end-to-end tests that start a whole platform on loopback
# and drive real `chappe` processes.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    # rustup installs under ~/.cargo/bin; a fresh login shell may not have it yet.
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "cargo not found: install Rust 1.89 or newer with rustup (https://rustup.rs)" >&2
    exit 1
}
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        say "installing the $component component"
        rustup component add "$component"
    fi
done

say "format"
cargo fmt --all -- --check

say "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "tests"
cargo test --workspace --locked --no-fail-fast
