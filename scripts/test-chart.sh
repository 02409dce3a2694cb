#!/usr/bin/env bash
# Tests of the Helm chart (charts/chappe), its dashboards and its alerts.
#
# Installs what is missing: the Python packages (helm-python-sdk: Helm 4's
# Go SDK as a C library, so no helm binary and no cluster; kubernetes-validate;
# jsonschema and cel-python, which check the ChappePlatform against the CRD
# as the apiserver would; pytest; PyYAML) and promtool (Debian's prometheus
# package, as root). Then runs pytest on charts/chappe/tests/, which also
# starts `chappe up` (target/debug/chappe, or $CHAPPE_BIN) to scrape the
# metrics the dashboards and alerts query and to run the `helm test` round
# trip against it.
#
# usage: scripts/test-chart.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

command -v python3 >/dev/null 2>&1 || {
    echo "python3 not found: the chart tests are Python (pytest)" >&2
    exit 1
}

# module name -> pip requirement
missing=()
for pair in "helm_python:helm-python-sdk>=0.2.2" "kubernetes_validate:kubernetes-validate>=1.33" \
    "pytest:pytest>=8" "yaml:pyyaml>=6" "jsonschema:jsonschema>=4.18" "celpy:cel-python>=0.5"; do
    module="${pair%%:*}"
    python3 -c "import $module" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet "${missing[@]}"
fi

# kubernetes-validate must know both Kubernetes versions the tests validate for.
python3 - <<'EOF'
import os, sys, kubernetes_validate
have = os.listdir(os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema"))
need = [v for v in ("v1.30.0-local-strict", "v1.33.0-local-strict") if v not in have]
if need:
    sys.exit(f"kubernetes-validate {kubernetes_validate.__version__} lacks {need}: python3 -m pip install -U kubernetes-validate")
EOF

if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing promtool (Debian's prometheus package)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        # The package starts a Prometheus server where systemd runs; the
        # tests need only promtool.
    fi
    command -v promtool >/dev/null 2>&1 || {
        echo "promtool not found: install Debian's prometheus package (as root: apt-get install prometheus), or put promtool on PATH" >&2
        exit 1
    }
fi

# The tests start `chappe up` and run the `chappe` client: CHAPPE_BIN, or
# the debug build (built here when missing).
if [ -n "${CHAPPE_BIN:-}" ]; then
    [ -x "$CHAPPE_BIN" ] || {
        echo "CHAPPE_BIN=$CHAPPE_BIN is not an executable file" >&2
        exit 1
    }
else
    if [ ! -x target/debug/chappe ]; then
        say "building the chappe binary (cargo build -p chappe-cli --bin chappe)"
        cargo build -p chappe-cli --bin chappe
    fi
    CHAPPE_BIN="$PWD/target/debug/chappe"
fi
export CHAPPE_BIN

say "chart tests (charts/chappe/tests)"
exec python3 -m pytest -q -p no:cacheprovider charts/chappe/tests "$@"
