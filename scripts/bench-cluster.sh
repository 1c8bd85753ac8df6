#!/usr/bin/env bash
# Scale-out benchmark (issue 10): the same fan-out load on one ringcast node and on two nodes sharing one
# Redis, interleaved (1 node, 2 nodes, cross-node, 1 node, ...), so that a slower moment of this shared
# machine falls on every configuration alike. Loopback only; every run is bounded.
#
#   flock /tmp/ringcast-heavy.lock scripts/bench-cluster.sh
#
# Configurations (each round starts fresh nodes on a fresh redis_prefix):
#   one      1 node; publishers and subscribers on it
#   two      2 nodes; publishers on node A, subscribers split evenly over A and B (`--urls A,B`)
#   cross    2 nodes; publishers on node A, every subscriber on node B (`--urls B`): cross-node
#            publish-to-delivery latency (the publication goes A -> Redis -> B -> subscriber)
# The Redis is this script's own redis-server on 127.0.0.1:$REDIS_PORT (default 21250), started and stopped
# here, so its CPU time is only this benchmark's. With SHARDS=2 (or more) there are that many, on
# $REDIS_PORT, $REDIS_PORT+1, ..., and every node lists them all in `redis_url` (sharded by channel): the
# benchmark's one channel, `bench`, lives on one of them (the engine's hash, computed here too and checked
# against the keys the run leaves); the others carry only the nodes' control messages (registry), and
# their CPU over the whole run, ÷ the run's publications, is the last column (others_us/pub).
# The channel's Redis is the generator's `--server-pid`: its utime + stime
# over the measured window (from /proc/PID/stat), divided by the publications of that window (messages
# received in the window / subscribers; every subscriber gets every publication). Connect, subscribe and
# presence writes of the 1,000 subscribers fall outside the window. Node CPU (both nodes together) is read
# from /proc around the whole run, connects included, and divided by all deliveries. Before the rounds,
# Redis's own idle cost is measured the same way over IDLE seconds with two nodes connected and no
# clients: the floor under the per-publication figure (Redis's timers run whether or not anyone publishes).
#
# Knobs: SUBSCRIBERS (1000), PUBLISHERS (10), RATE (publications/s in all, 100), SIZE (128), DURATION
# (measured seconds, 8), WARMUP (2), ROUNDS (3), IDLE (seconds, 10), REDIS_PORT (21250), SHARDS (Redis
# instances, 1), NO_BUILD=1 (use target/release as is).
# Results: target/bench/cluster-CONFIG-ROUND.json (the generator's reports), cluster-CONFIG-ROUND.redis.txt
# (Redis's INFO commandstats over the whole run: calls and µs per command) and the table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench
mkdir -p "$out"
subs=${SUBSCRIBERS:-1000}
pubs=${PUBLISHERS:-10}
rate=${RATE:-100}
size=${SIZE:-128}
dur=${DURATION:-8}
warmup=${WARMUP:-2}
rounds=${ROUNDS:-3}
redis_port=${REDIS_PORT:-21250}
shards=${SHARDS:-1}
release=${CARGO_TARGET_DIR:-target}/release
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release -p ringcast --bins >/dev/null
fi
bin=$release/ringcast
port=8600

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# shellcheck source=bench-lib.sh
. scripts/bench-lib.sh
# CPU time of a process, in clock ticks (utime + stime; fields 14 and 15 after the command name).
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

redis_pids=()
redis_urls=()
for s in $(seq 0 $((shards - 1))); do
    redis-server --port $((redis_port + s)) --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
        >"$out/cluster-redis-$s.log" 2>&1 &
    redis_pids+=($!)
    pids+=($!)
    wait_port $! $((redis_port + s)) "redis-server $s"
    redis_urls+=("redis://127.0.0.1:$((redis_port + s))")
done
redis_url=$(IFS=,; echo "${redis_urls[*]}")
# The shard of channel `bench`: 64-bit FNV-1a of the name, then jump consistent hash (engine/shards.rs).
bench_shard=$(python3 - "$shards" <<'EOF'
import sys
n, m, h = int(sys.argv[1]), (1 << 64) - 1, 0xcbf29ce484222325
for byte in b"bench":
    h = ((h ^ byte) * 0x100000001b3) & m
b, j = -1, 0
while j < n:
    b = j
    h = (h * 2862933555777941757 + 1) & m
    j = int((b + 1) * (float(1 << 31) / float((h >> 33) + 1)))
print(max(b, 0))
EOF
)
redis_pid=${redis_pids[$bench_shard]}
bench_port=$((redis_port + bench_shard))
# CPU ticks of every Redis but the channel's.
other_ticks() {
    local t=0 s
    for s in $(seq 0 $((shards - 1))); do
        [ "$s" = "$bench_shard" ] || t=$((t + $(ticks "${redis_pids[$s]}")))
    done
    echo "$t"
}
[ "$shards" = 1 ] || echo "$shards Redis shards; channel bench on shard $bench_shard (127.0.0.1:$bench_port)"

# node: a fresh `ringcast serve` on the next port and the round's prefix; sets $node_port, $node_pid.
node() {
    port=$((port + 1))
    "$bin" serve --dev --tcp-listen off --listen "127.0.0.1:$port" --log-level error \
        --broker redis --redis-url "$redis_url" --redis-prefix "$prefix" \
        >"$out/cluster-node-$port.log" 2>&1 &
    node_pid=$!
    node_port=$port
    pids+=("$node_pid")
    wait_port "$node_pid" "$node_port" "ringcast on $node_port"
}
ws() { echo "ws://127.0.0.1:$1/connection/websocket"; }

prefix="rc-bench-$$-idle"
node
idle_a=$node_pid
node
idle_b=$node_pid
i0=0; for p in "${redis_pids[@]}"; do i0=$((i0 + $(ticks "$p"))); done
sleep "${IDLE:-10}"
i1=0; for p in "${redis_pids[@]}"; do i1=$((i1 + $(ticks "$p"))); done
stop "$idle_a"
stop "$idle_b"
awk -v t=$((i1 - i0)) -v hz="$hz" -v s="${IDLE:-10}" \
    'BEGIN { printf "redis idle (all shards), two nodes connected: %.2f%% of a core (%d ticks of 1/%d s in %d s)\n", t * 100 / hz / s, t, hz, s }'

printf '%-6s %-5s %12s %9s %9s %9s %6s %13s %11s %15s %14s\n' config round deliveries/s p50_ms p99_ms p999_ms lost \
    redis_us/pub redis_core% nodes_us/deliv others_us/pub
for r in $(seq 1 "$rounds"); do
    for config in one two cross; do
        prefix="rc-bench-$$-$config-$r"
        node
        a_port=$node_port a_pid=$node_pid
        node_pids=("$a_pid")
        urls=()
        if [ "$config" != one ]; then
            node
            b_port=$node_port b_pid=$node_pid
            node_pids+=("$b_pid")
            if [ "$config" = two ]; then urls=(--urls "$(ws "$a_port"),$(ws "$b_port")"); else urls=(--urls "$(ws "$b_port")"); fi
        fi
        json="$out/cluster-$config-$r.json"
        for s in $(seq 0 $((shards - 1))); do redis-cli -p $((redis_port + s)) CONFIG RESETSTAT >/dev/null; done
        n0=0; for p in "${node_pids[@]}"; do n0=$((n0 + $(ticks "$p"))); done
        o0=$(other_ticks)
        timeout $((dur + warmup + 120)) "$bin" bench fanout --url "$(ws "$a_port")" "${urls[@]}" \
            --server-pid "$redis_pid" --protocol centrifuge --subscribers "$subs" --publishers "$pubs" --rate "$rate" --size "$size" \
            --duration "$dur" --warmup "$warmup" --quiet --json "$json" >"$out/cluster-$config-$r.txt" 2>&1 \
            || echo "!! $config round $r: the generator failed (see $out/cluster-$config-$r.txt)" >&2
        n1=0; for p in "${node_pids[@]}"; do n1=$((n1 + $(ticks "$p"))); done
        o1=$(other_ticks)
        # Where Redis's time went (whole run): calls and µs per command, on the channel's shard.
        redis-cli -p "$bench_port" INFO commandstats >"$out/cluster-$config-$r.redis.txt"
        [ "$(redis-cli -p "$bench_port" EXISTS "$prefix:m:bench")" = 1 ] \
            || echo "!! $config round $r: channel bench is not on shard $bench_shard" >&2
        for p in "${node_pids[@]}"; do stop "$p"; done
        for s in $(seq 0 $((shards - 1))); do
            redis-cli -p $((redis_port + s)) --scan --pattern "$prefix:*" \
                | xargs -r redis-cli -p $((redis_port + s)) DEL >/dev/null
        done
        python3 - "$json" "$config" "$r" $((n1 - n0)) "$hz" $((o1 - o0)) <<'EOF'
import json, sys
path, config, rnd, nticks, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
oticks = int(sys.argv[6])
try:
    rep = json.load(open(path))
except (OSError, ValueError):
    print(f"{config:<6} {rnd:<5} (no report)")
    sys.exit(0)
f, lat, msg, cpu = rep.get("fanout") or {}, rep.get("latency") or {}, rep.get("messages") or {}, rep.get("cpu") or {}
subs = max(f.get("subscribers", 1), 1)
pubs_in_window = msg.get("received_in_window", 0) / subs
redis_us, window = cpu.get("server_us") or 0, cpu.get("window_secs") or 0
node_us = nticks * 1e6 / hz
print(f"{config:<6} {rnd:<5} {msg.get('per_sec', 0):12.0f} {lat.get('p50_us', 0) / 1e3:9.2f} {lat.get('p99_us', 0) / 1e3:9.2f} "
      f"{lat.get('p999_us', 0) / 1e3:9.2f} {f.get('lost', 0):6d} {redis_us / max(pubs_in_window, 1):13.1f} "
      f"{redis_us / 1e4 / max(window, 1e-9):11.2f} {node_us / max(f.get('delivered', 0), 1):15.2f} "
      f"{oticks * 1e6 / hz / max(f.get('delivered', 0) / subs, 1):14.1f}")
EOF
    done
done
