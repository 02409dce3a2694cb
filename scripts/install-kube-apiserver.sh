#!/usr/bin/env bash
# Builds a real kube-apiserver and the etcd it stores into, from source served
# by the Go module proxy, for integration tests that apply CRDs and custom
# resources to a real API server (no Docker, no kind, no prebuilt downloads:
# only the Go module proxy is reached).
#
# usage: scripts/install-kube-apiserver.sh [DIR]
#
# DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/chappe/kube-apiserver-<version>.
# Installs DIR/bin/kube-apiserver and DIR/bin/etcd. Nothing is built when DIR
# already holds a complete install (DIR/.complete). The last line on standard
# output is DIR/bin; progress goes to standard error. Exits non-zero with a
# message when the build is impossible.
#
# Cost on 2 cores (measured): about 10 minutes with empty Go caches
# (kube-apiserver ~9.5 min, etcd ~25 s, downloads ~20 s), peak RSS ~1.8 GB
# per compiler process, ~620 MB of modules into GOMODCACHE and ~2.2 GB of Go
# build cache (GOCACHE); DIR itself is ~125 MB. With a warm Go build cache a
# rebuild takes ~16 s; with an install present the script returns at once.
#
# How: `go install k8s.io/kubernetes/cmd/kube-apiserver@v...` is refused
# because k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) by
# local directories. So a throwaway module requires k8s.io/kubernetes and
# replaces every staging module by its published release v0.<minor>.<patch>,
# then builds kube-apiserver and etcd's server (go.etcd.io/etcd/server/v3,
# the version k8s.io/kubernetes itself depends on) from that module.
# etcd is built rather than taken from Debian: Debian 12's etcd-server is
# 3.4.23, which lacks the RequestWatchProgress feature, so kube-apiserver
# v1.34 refuses streaming lists (watch with sendInitialEvents=true) on it.
#
# Needs go >= 1.24 on PATH.
set -euo pipefail

# k8s.io/kubernetes versions served by the Go module proxy: v1.34.0,
# v1.34.2..4, v1.35.4, v1.36.1, v1.36.3, v1.37.2. v1.34.4 builds with Go 1.26.
KUBE_VERSION=v1.34.4
# The etcd version k8s.io/kubernetes v1.34.4 requires (go.etcd.io/etcd/*/v3);
# only used to check the result, the module graph picks it.
ETCD_VERSION=3.6.4

die() {
    echo "install-kube-apiserver: $*" >&2
    exit 1
}
log() {
    echo "install-kube-apiserver: $*" >&2
}

dir="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/chappe/kube-apiserver-$KUBE_VERSION}"
bin="$dir/bin"
stamp="$dir/.complete"
expected_stamp="kubernetes $KUBE_VERSION etcd $ETCD_VERSION"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$expected_stamp" ] \
    && [ -x "$bin/kube-apiserver" ] && [ -x "$bin/etcd" ]; then
    echo "$bin"
    exit 0
fi

command -v go >/dev/null 2>&1 || {
    [ -x /usr/local/go/bin/go ] && PATH="/usr/local/go/bin:$PATH"
}
command -v go >/dev/null 2>&1 || die "go not found on PATH (Go >= 1.24 is needed to build kube-apiserver)"
go_version="$(go env GOVERSION 2>/dev/null || true)"
case "$go_version" in
    go1.2[4-9]* | go1.[3-9][0-9]* | go[2-9]*) ;;
    *) die "kube-apiserver $KUBE_VERSION needs Go >= 1.24; found '${go_version:-unknown}' ($(command -v go))" ;;
esac

# The build must not switch toolchains (no toolchain other than the local one
# can be fetched here), and must be allowed to write go.mod/go.sum.
export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

mkdir -p "$dir" || die "cannot create $dir"
rm -f "$stamp"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# Staging modules are released as v0.<minor>.<patch> next to v1.<minor>.<patch>.
minor_patch="${KUBE_VERSION#v1.}"
staging_version="v0.$minor_patch"

log "fetching k8s.io/kubernetes $KUBE_VERSION from the Go module proxy"
if ! go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" >"$work/download.json" 2>"$work/download.log"; then
    cat "$work/download.log" "$work/download.json" >&2
    die "the Go module proxy did not serve k8s.io/kubernetes@$KUBE_VERSION (output above)"
fi
kube_gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' "$work/download.json")"
[ -f "$kube_gomod" ] || die "cannot find the go.mod of k8s.io/kubernetes@$KUBE_VERSION (go mod download said: $(tr -d '\n' <"$work/download.json"))"

# Every "k8s.io/x => ./staging/src/k8s.io/x" becomes "k8s.io/x => k8s.io/x v0.M.P".
staging="$(sed -n 's|^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*$|\1|p' "$kube_gomod")"
[ -n "$staging" ] || die "no staging replace directives found in $kube_gomod: the workaround does not fit this version"
log "replacing $(echo "$staging" | wc -l) staging modules by their $staging_version releases"

{
    echo "// Written by scripts/install-kube-apiserver.sh; thrown away."
    echo "module chappe.local/kube-apiserver-build"
    echo
    echo "go 1.24.0"
    echo
    echo "godebug default=go1.24"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in $staging; do
        printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"
    done
    echo ")"
} >"$work/go.mod"
cat >"$work/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
EOF

log "resolving and downloading dependencies (go mod tidy, ~600 MB into $(go env GOMODCACHE))"
if ! go mod tidy >"$work/tidy.log" 2>&1; then
    tail -n 30 "$work/tidy.log" >&2
    die "go mod tidy failed for k8s.io/kubernetes $KUBE_VERSION (log above)"
fi

got_etcd="$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3 2>/dev/null || true)"
[ "$got_etcd" = "v$ETCD_VERSION" ] \
    || die "k8s.io/kubernetes $KUBE_VERSION resolves go.etcd.io/etcd/server/v3 to '$got_etcd', expected v$ETCD_VERSION: update ETCD_VERSION"

partial="$dir/bin.partial.$$"
rm -rf "$partial"
mkdir -p "$partial"

vp=k8s.io/component-base/version
kube_minor="${minor_patch%%.*}"
kube_ldflags="-s -w -X $vp.gitVersion=$KUBE_VERSION -X $vp.gitMajor=1 -X $vp.gitMinor=$kube_minor -X $vp.gitTreeState=clean -X $vp.buildDate=1970-01-01T00:00:00Z"

log "building kube-apiserver $KUBE_VERSION (about 10 minutes on 2 cores with a cold Go build cache)"
start=$(date +%s)
if ! go build -trimpath -ldflags="$kube_ldflags" -o "$partial/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >"$work/build-kas.log" 2>&1; then
    tail -n 40 "$work/build-kas.log" >&2
    rm -rf "$partial"
    die "building kube-apiserver $KUBE_VERSION failed (log above)"
fi
log "kube-apiserver built in $(($(date +%s) - start)) s"

log "building etcd $ETCD_VERSION"
start=$(date +%s)
if ! go build -trimpath -ldflags="-s -w" -o "$partial/etcd" go.etcd.io/etcd/server/v3 >"$work/build-etcd.log" 2>&1; then
    tail -n 40 "$work/build-etcd.log" >&2
    rm -rf "$partial"
    die "building etcd $ETCD_VERSION failed (log above)"
fi
log "etcd built in $(($(date +%s) - start)) s"

kas_version="$("$partial/kube-apiserver" --version 2>&1 || true)"
[ "$kas_version" = "Kubernetes $KUBE_VERSION" ] || { rm -rf "$partial"; die "built kube-apiserver reports '$kas_version', expected 'Kubernetes $KUBE_VERSION'"; }
etcd_version="$("$partial/etcd" --version 2>&1 | head -n 1 || true)"
[ "$etcd_version" = "etcd Version: $ETCD_VERSION" ] || { rm -rf "$partial"; die "built etcd reports '$etcd_version', expected 'etcd Version: $ETCD_VERSION'"; }

rm -rf "$bin"
mv "$partial" "$bin"
echo "$expected_stamp" >"$stamp"
log "installed $kas_version and etcd $ETCD_VERSION into $bin"
echo "$bin"
