#!/usr/bin/env bash
# TCP binary protocol vs WebSocket on one server build, in one run (issue 11):
#   scripts/bench-tcp.sh BINARY [OUT_DIR]
# 1. Fan-out, 1,000 subscribers x 100/s, 128 B, one publisher over its own protocol: WebSocket
#    (Centrifugo protocol) and TCP rounds alternate against the SAME server process
#    (`ringcast bench fanout --compare tcp://...`, 3 rounds each); server CPU per delivery and p99.
# 2. Idle memory at 10,000 connections: a fresh server per run, TCP (CONNECT + SUBSCRIBE) and WebSocket
#    Centrifugo (connect + subscribe, plain.toml) alternating, 2 rounds.
# Loopback only; every run is bounded by --duration. Takes about 4 minutes. Hold the cargo lock around it.
set -euo pipefail
bin=$1
out=${2:-target/bench-tcp}
mkdir -p "$out"
rounds=${ROUNDS:-3}
port=9600
pids=()
# shellcheck source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

start() { # start ARGS... ; sets $p (WebSocket port), $t (TCP port) and $s (pid)
    port=$((port + 2))
    "$bin" serve --listen "127.0.0.1:$port" --tcp-listen "127.0.0.1:$((port + 1))" --log-level error "$@" >/dev/null 2>&1 &
    s=$!
    pids+=("$s")
    p=$port
    t=$((port + 1))
    wait_port "$s" "$t" "ringcast $*"
}
trap stop_all EXIT

start --dev
echo "== fanout-1000x100: A = WebSocket (Centrifugo), B = TCP, same server pid $s" | tee "$out/fanout.txt"
"$bin" bench fanout --url "ws://127.0.0.1:$p/connection/websocket" --server-pid "$s" \
    --compare "tcp://127.0.0.1:$t" --compare-pid "$s" --rounds "$rounds" \
    --subscribers 1000 --publishers 1 --rate 100 --size 128 --duration 10 --warmup 1 -q --json "$out/fanout.json" \
    | tee -a "$out/fanout.txt"
stop_all

printf 'allow_anonymous = true\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\n' >"$out/plain.toml"
for round in 1 2; do
    start --config "$out/plain.toml"
    "$bin" bench idle --url "tcp://127.0.0.1:$t" --connections 10000 --duration 3 --server-pid "$s" -q \
        --json "$out/idle-tcp-$round.json" >"$out/idle-tcp-$round.txt" 2>&1 || true
    stop_all
    start --config "$out/plain.toml"
    "$bin" bench idle --url "ws://127.0.0.1:$p/connection/websocket" --protocol centrifuge --connections 10000 \
        --duration 3 --server-pid "$s" -q --json "$out/idle-ws-$round.json" >"$out/idle-ws-$round.txt" 2>&1 || true
    stop_all
done
python3 - "$out" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
print("== idle memory per subscribed connection at 10,000 (server RSS growth / connections)")
for kind in ("tcp", "ws"):
    vals = []
    for f in sorted(glob.glob(os.path.join(out, f"idle-{kind}-*.json"))):
        m = json.load(open(f)).get("memory") or {}
        v = m.get("server_bytes_per_connection")
        vals.append(f"{v:.0f} B" if v else "-")
    print(f"{kind}: {', '.join(vals)}")
PY
