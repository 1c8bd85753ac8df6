#!/usr/bin/env bash
# Two ringcast builds side by side on this machine, interleaved, with the same load generator:
#   scripts/bench-ab.sh OLD_BINARY NEW_BINARY [OUT_DIR]
# Echo (100 connections, 20 B) and fan-out (1,000 subscribers x 100/s and 10,000 x 10/s, 128 B) run as
# `ringcast bench ... --compare` (alternating rounds, ratio NEW/OLD); idle memory per connection (10,000
# echo connections on the pool strategy, 10,000 subscribed Centrifugo clients) alternates fresh servers.
# Loopback only; every run is bounded by --duration. Takes about 6 minutes.
# IDLE_ONLY=1 runs only the idle-memory part, IDLE_ROUNDS times (default 2; a round, one fresh server per
# build and kind, takes about a minute), for figures that need more rounds than the CPU comparisons.
# Both servers run with `--tcp-listen off`: `--dev` alone binds the TCP protocol on port 7070 (issue 11), and
# the second server of a pair would fail to start on it.
set -euo pipefail
old=$1
new=$2
out=${3:-target/bench-ab}
mkdir -p "$out"
gen=$new # one load generator for both sides
rounds=${ROUNDS:-3}
dur=${DURATION:-6}
port=9400
pids=()
# shellcheck source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

start() { # start BINARY ARGS... ; sets $p (port) and $s (pid)
    local bin=$1; shift
    port=$((port + 1))
    "$bin" serve --listen "127.0.0.1:$port" --log-level error "$@" >/dev/null 2>&1 &
    s=$!
    pids+=("$s")
    p=$port
    wait_port "$s" "$p" "$bin"
}
trap stop_all EXIT

compare() { # compare NAME PATH ARGS...  (old = A, new = B)
    local name=$1 path=$2; shift 2
    start "$old" --dev --tcp-listen off; local pa=$p sa=$s
    start "$new" --dev --tcp-listen off; local pb=$p sb=$s
    echo "== $name" | tee "$out/$name.txt"
    "$gen" bench "$@" --url "ws://127.0.0.1:$pa$path" --server-pid "$sa" \
        --compare "ws://127.0.0.1:$pb$path" --compare-pid "$sb" --rounds "$rounds" -q --json "$out/$name.json" \
        | tee -a "$out/$name.txt"
    stop_all
}

if [ -z "${IDLE_ONLY:-}" ]; then
compare echo-100 /echo echo --connections 100 --window 1 --size 20 --duration "$dur" --warmup 1
compare fanout-1000x100 /connection/websocket fanout --subscribers 1000 --publishers 1 --rate 100 --size 128 \
    --duration "$((dur + 4))" --warmup 1
compare fanout-10000x10 /connection/websocket fanout --subscribers 10000 --publishers 1 --rate 10 --size 128 \
    --duration "$((dur + 4))" --warmup 2 --processes 2
fi

# Idle memory: a fresh server per run, old and new alternating.
printf 'allow_anonymous = true\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\n' >"$out/plain.toml"
for round in $(seq 1 "${IDLE_ROUNDS:-2}"); do
    for side in old new; do
        bin=$old; [ "$side" = new ] && bin=$new
        start "$bin" --read-buffer pool --dev --tcp-listen off
        "$gen" bench idle --url "ws://127.0.0.1:$p/echo" --connections 10000 --duration 3 --server-pid "$s" -q \
            --json "$out/idle-echo-$side-$round.json" >"$out/idle-echo-$side-$round.txt" 2>&1 || true
        stop_all
        start "$bin" --config "$out/plain.toml"
        "$gen" bench idle --url "ws://127.0.0.1:$p/connection/websocket" --protocol centrifuge --connections 10000 \
            --duration 3 --server-pid "$s" -q --json "$out/idle-subscribed-$side-$round.json" \
            >"$out/idle-subscribed-$side-$round.txt" 2>&1 || true
        stop_all
    done
done
python3 - "$out" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
print("== idle memory per connection (server RSS growth / connections)")
for kind in ("echo", "subscribed"):
    for side in ("old", "new"):
        vals = []
        for f in sorted(glob.glob(os.path.join(out, f"idle-{kind}-{side}-*.json"))):
            m = json.load(open(f)).get("memory") or {}
            v = m.get("server_bytes_per_connection")
            vals.append(f"{v:.0f} B" if v else "-")
        print(f"{kind:<11} {side}: {', '.join(vals)}")
PY
