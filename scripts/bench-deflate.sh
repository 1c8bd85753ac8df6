#!/usr/bin/env bash
# permessage-deflate side by side, one ringcast build, interleaved:
#   scripts/bench-deflate.sh RINGCAST_BINARY [OUT_DIR]
# 1. Fan-out, 1,000 subscribers x 100/s of a ~1.5 KB JSON publication (`--payload json`), as
#    `ringcast bench fanout --compare` in alternating rounds: A is a server without --compression, B the
#    same binary with it; the load generator offers permessage-deflate on both (A declines), so the
#    two sides differ only in the server's setting. Server CPU per delivery, wire bytes per delivery,
#    p99, loss.
# 2. Idle memory per connection, 10,000 connections, compression negotiated or not: echo connections
#    (pool strategy) and subscribed Centrifugo clients, a fresh server per run, alternating.
# Loopback only; every run is bounded by --duration. Takes about 5 minutes.
# PARTS="fanout idle" (default) picks the parts; ROUNDS, DURATION the fan-out's rounds and seconds.
set -euo pipefail
bin=$1
out=${2:-target/bench-deflate}
mkdir -p "$out"
rounds=${ROUNDS:-3}
dur=${DURATION:-10}
port=9600
pids=()
# shellcheck source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

start() { # start ARGS... ; sets $p (port) and $s (pid)
    port=$((port + 1))
    "$bin" serve --listen "127.0.0.1:$port" --tcp-listen off --log-level error "$@" >/dev/null 2>&1 &
    s=$!
    pids+=("$s")
    p=$port
    wait_port "$s" "$p" "ringcast $*"
}
trap stop_all EXIT

parts=${PARTS:-fanout idle}
if [[ " $parts " == *" fanout "* ]]; then
    start --dev; pa=$p sa=$s
    start --dev --compression; pb=$p sb=$s
    echo "== fanout-1000x100-json1500: A without --compression, B with" | tee "$out/fanout.txt"
    "$bin" bench fanout --url "ws://127.0.0.1:$pa/connection/websocket" --server-pid "$sa" \
        --compare "ws://127.0.0.1:$pb/connection/websocket" --compare-pid "$sb" --rounds "$rounds" \
        --subscribers 1000 --publishers 1 --rate 100 --size 1500 --payload json --compression \
        --duration "$dur" --warmup 1 -q --json "$out/fanout.json" | tee -a "$out/fanout.txt"
    stop_all
fi
[[ " $parts " == *" idle "* ]] || exit 0

printf 'allow_anonymous = true\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\n' >"$out/plain.toml"
for round in 1 2; do
    for side in plain deflate; do
        offer=()
        [ "$side" = deflate ] && offer=(--compression)
        start --read-buffer pool --dev --compression
        "$bin" bench idle --url "ws://127.0.0.1:$p/echo" --connections 10000 --duration 3 --server-pid "$s" \
            "${offer[@]}" -q --json "$out/idle-echo-$side-$round.json" >"$out/idle-echo-$side-$round.txt" 2>&1 || true
        stop_all
        start --config "$out/plain.toml" --compression
        "$bin" bench idle --url "ws://127.0.0.1:$p/connection/websocket" --protocol centrifuge --connections 10000 \
            --duration 3 --server-pid "$s" "${offer[@]}" -q --json "$out/idle-subscribed-$side-$round.json" \
            >"$out/idle-subscribed-$side-$round.txt" 2>&1 || true
        stop_all
    done
done
python3 - "$out" <<'PY' | tee "$out/idle.txt"
import json, sys, glob, os
out = sys.argv[1]
print("== idle memory per connection (server RSS growth / connections), server with --compression")
for kind in ("echo", "subscribed"):
    for side in ("plain", "deflate"):
        vals = []
        for f in sorted(glob.glob(os.path.join(out, f"idle-{kind}-{side}-*.json"))):
            r = json.load(open(f))
            v = (r.get("memory") or {}).get("server_bytes_per_connection")
            vals.append(f"{v:.0f} B" if v else "-")
        label = "negotiated" if side == "deflate" else "not offered"
        print(f"{kind:<11} {label}: {', '.join(vals)}")
PY
