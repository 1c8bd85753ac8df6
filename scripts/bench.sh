#!/usr/bin/env bash
# Reproduces every figure in BENCHMARKS.md on this machine (release build, loopback, server and load
# generator on the same 2 cores). Each run gets a fresh server; results land in target/bench/*.json and
# a summary table is printed (scripts/bench_table.py). Takes about 5 minutes.
#   scripts/bench.sh [quick]     # quick: shorter runs
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench
mkdir -p "$out"
dur=${DURATION:-5}
[ "${1:-}" = quick ] && dur=2
cargo build --release -p ringcast >/dev/null
bin=./target/release/ringcast
port=8300
# shellcheck source=bench-lib.sh
. scripts/bench-lib.sh

serve() { # serve STRATEGY [extra flags...]
    local strategy=$1; shift
    port=$((port + 1))
    "$bin" serve --dev --listen "127.0.0.1:$port" --read-buffer "$strategy" --log-level error "$@" >/dev/null 2>&1 &
    server=$!
    wait_port "$server" "$port" "ringcast --read-buffer $strategy"
}
bench() { # bench NAME ARGS...
    local name=$1; shift
    echo "== $name: ringcast bench $*" >&2
    "$bin" bench "$@" --server-pid "$server" -q --json "$out/$name.json" >"$out/$name.txt" 2>&1 || true
}

for s in pool ring growable; do
    serve "$s"
    bench "echo-100-$s" echo --url "ws://127.0.0.1:$port/echo" --connections 100 --window 1 --size 20 --duration "$dur" --warmup 1
    stop "$server"
done
serve pool
bench echo-1000-pool echo --url "ws://127.0.0.1:$port/echo" --connections 1000 --window 1 --size 20 --duration "$dur" --warmup 1
stop "$server"

for s in pool ring growable; do
    for n in 1000 10000; do
        serve "$s"
        bench "idle-$n-$s" idle --url "ws://127.0.0.1:$port/echo" --connections "$n" --duration 3
        stop "$server"
    done
done

# Subscribed idle clients: connect + subscribe, then idle. --dev keeps presence; plain.toml is the
# default channel options with anonymous subscribe allowed.
printf 'allow_anonymous = true\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\n' >"$out/plain.toml"
serve pool
bench idle-10000-subscribed-dev idle --url "ws://127.0.0.1:$port/connection/websocket" --protocol centrifuge --connections 10000 --duration 3
stop "$server"
port=$((port + 1))
"$bin" serve --config "$out/plain.toml" --listen "127.0.0.1:$port" --log-level error >/dev/null 2>&1 &
server=$!
wait_port "$server" "$port" "ringcast --config $out/plain.toml"
bench idle-10000-subscribed-plain idle --url "ws://127.0.0.1:$port/connection/websocket" --protocol centrifuge --connections 10000 --duration 3
stop "$server"

serve pool
bench connect-10000 connect --url "ws://127.0.0.1:$port/echo" --connections 10000 --duration 20
stop "$server"

serve pool
bench fanout-1000x100 fanout --url "ws://127.0.0.1:$port/connection/websocket" --protocol centrifuge \
    --subscribers 1000 --publishers 1 --rate 100 --size 128 --duration "$((dur * 2))" --warmup 1
stop "$server"
serve pool
bench fanout-10000x10 fanout --url "ws://127.0.0.1:$port/connection/websocket" --protocol centrifuge \
    --subscribers 10000 --publishers 1 --rate 10 --size 128 --duration "$((dur * 2))" --warmup 2
stop "$server"
serve pool
bench fanout-100x100 fanout --url "ws://127.0.0.1:$port/connection/websocket" --protocol centrifuge \
    --subscribers 100 --publishers 100 --rate 10000 --size 128 --duration "$dur" --warmup 1
stop "$server"

python3 scripts/bench_table.py "$out"
