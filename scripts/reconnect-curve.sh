#!/usr/bin/env bash
# The reconnect curve of a restart (BENCHMARKS.md, "Upgrade: the reconnect curve").
#
#   scripts/reconnect-curve.sh upgrade|restart OUTDIR [CLIENTS]
#
# upgrade: SIGUSR2 to the running server (drain_window 30s): the old process lets its clients go with
#          3001 spread over the window, they reconnect to the new one and recover.
# restart: "everyone at once": kill -9, then a fresh `ringcast serve` on the same port at once.
#
# Both hold CLIENTS (default 10000) `ringcast bench reconnect` clients on channel "bench" (history,
# recovery on) with a publisher at 2/s over the HTTP API, and trigger the switch 5 s after every client
# subscribed. The generator writes OUTDIR/MODE.txt (summary and timeline, 100 ms buckets), MODE.json,
# MODE.svg; OUTDIR/MODE-1s.txt is the same timeline summed per second. Run it under the shared lock on a
# release build (cargo build --release -p ringcast). Every wait is bounded.
set -euo pipefail
MODE=${1:?upgrade or restart}
OUT=${2:?output directory}
CLIENTS=${3:-10000}
BIN=${BIN:-./target/release/ringcast}
PORT=${PORT:-8610}
DURATION=${DURATION:-60s}   # the generator's run (the switch comes ~5 s after the clients subscribed)
DRAIN=${DRAIN:-30s}         # drain_window
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cat > "$OUT/$MODE.toml" <<CONF
listen = "127.0.0.1:$PORT"
api_key = "curve"
allow_anonymous = true
drain_window = "$DRAIN"
shutdown_timeout = "1s"
pid_file = "$OUT/$MODE.pid"
log_level = "warn"
[channels]
allow_subscribe_for_client = true
allow_subscribe_for_anonymous = true
allow_recovery = true
history_size = 1000
history_ttl = "600s"
CONF
rm -f "$OUT/$MODE.pid"
serve() { "$BIN" serve --config "$OUT/$MODE.toml" >> "$OUT/$MODE-server.log" 2>&1 & }
wait_for() { # wait_for SECONDS COMMAND...: until the command succeeds
  local until=$((SECONDS + $1)); shift
  until "$@"; do
    if ((SECONDS > until)); then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.05
  done
}
serve
wait_for 20 test -s "$OUT/$MODE.pid"
OLD=$(cat "$OUT/$MODE.pid")
"$BIN" bench reconnect --url "ws://127.0.0.1:$PORT/connection/websocket" --clients "$CLIENTS" --window 256 \
  --duration "$DURATION" --settle 15s --bucket 100ms --api-key curve --rate 2 \
  --json "$OUT/$MODE.json" --plot "$OUT/$MODE.svg" --title "ringcast: $CLIENTS clients, $MODE" \
  > "$OUT/$MODE.txt" 2> "$OUT/$MODE-bench.err" &
GEN=$!
wait_for 50 grep -q "clients subscribed" "$OUT/$MODE-bench.err"
sleep 5
echo "$MODE at $(date -u +%T.%N): $(grep 'clients subscribed' "$OUT/$MODE-bench.err")"
case "$MODE" in
  upgrade)
    kill -USR2 "$OLD"
    wait_for 30 sh -c "test \"\$(cat '$OUT/$MODE.pid')\" != '$OLD'"
    ;;
  restart)
    kill -9 "$OLD"
    wait_for 10 sh -c "! kill -0 $OLD 2>/dev/null"
    rm -f "$OUT/$MODE.pid"
    serve
    wait_for 20 test -s "$OUT/$MODE.pid"
    ;;
esac
NEW=$(cat "$OUT/$MODE.pid")
echo "new server pid $NEW (old $OLD)"
wait_for 100 sh -c "! kill -0 $GEN 2>/dev/null"
wait "$GEN" || echo "generator exit status $?"
kill -TERM "$NEW" 2>/dev/null || true
wait_for 30 sh -c "! kill -0 $NEW 2>/dev/null"
python3 - "$OUT/$MODE.json" > "$OUT/$MODE-1s.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
per = round(1 / r["bucket_s"])
t = r["timeline"]
print(f"{'t(s)':>5} {'handshakes/s':>13} {'resubscribes':>13} {'disconnects':>12} {'failed':>7}")
for i in range(0, len(t), per):
    g = t[i:i + per]
    row = [sum(b[k] for b in g) for k in ("handshakes", "resubscribes", "disconnects", "failed")]
    if any(row):
        print(f"{i // per:>5} {row[0]:>13} {row[1]:>13} {row[2]:>12} {row[3]:>7}")
PY
cat "$OUT/$MODE.txt" | head -8
