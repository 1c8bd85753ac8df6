#!/usr/bin/env bash
# ringcast side by side with peer servers (issue 9), in one run, interleaved: every pair is one
# `ringcast bench echo|fanout --compare URL2 --compare-pid PID2 --rounds N`, both servers up for the
# whole pair, rounds alternating ringcast, peer, ringcast, peer, … (crates/ringcast-bench/src/compare.rs).
# Server CPU of each side is read from /proc/PID/stat. Loopback only; every run is bounded.
#
#   scripts/bench-peers.sh [echo|fanout|load_test|all]     # default: all
#
# Pairs (the issue's figures):
#   echo-fastwebsockets, echo-uws   echo, 100 connections × 1 in flight, 20 B: ringcast /echo vs peer
#   fanout-1000x100-{tungstenite,uws}   fan-out, 1,000 subscribers × 100/s, 128 B: ringcast
#                                       /connection/websocket (Centrifugo protocol) vs a raw broadcast peer
#   fanout-10000x10-{tungstenite,uws}   10,000 subscribers × 10/s, 128 B, generator in 2 processes
#   load_test-{ringcast,fastwebsockets,uws}   uWebSockets' own C echo client (benchmarks/load_test.c),
#                                       100 connections, 20 B, against each echo server in turn; server
#                                       CPU per message over whole load_test reporting intervals
#
# Peers are given as binaries; a pair whose peer is not given is skipped with a message:
#   UWS_ECHO=PATH          uWebSockets echo server, started as `PATH PORT`, listening on 127.0.0.1:PORT
#                          (upstream examples/EchoServer.cpp listens on port 9001 of every interface, fixed
#                          in its source: build a copy that takes the port and binds 127.0.0.1)
#   UWS_BROADCAST=PATH     uWebSockets raw broadcast server (topic "broadcast", every message to every
#                          other connection), started as `PATH PORT`
#   UWS_LOAD_TEST=PATH     uWebSockets' load_test binary (`load_test CONNS HOST PORT SSL DEFLATE SIZE`)
# The fastwebsockets and tokio-tungstenite peers are this repository's ringcast-bench examples, built
# here (override with FWS_ECHO=PATH, TUNGSTENITE_BROADCAST=PATH; both take `127.0.0.1:PORT`).
# uWebSockets is never built by or kept in this repository: build it from its public source elsewhere.
#
# Knobs: DURATION (measured seconds per round, default 8), WARMUP (default 1), ROUNDS (per server,
# default 3), LOAD_TEST_INTERVALS (4-s load_test reports measured, default 3), RINGCAST=PATH, NO_BUILD=1
# (use the binaries already built; on a machine shared with other builds, build under their lock first).
# Results: target/bench/peers-*.json (both sides' every round) and peers-*.txt (the printed tables).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
case $what in echo | fanout | load_test | all) ;; *) echo "usage: $0 [echo|fanout|load_test|all]" >&2; exit 2 ;; esac
out=target/bench
mkdir -p "$out"
dur=${DURATION:-8}
warmup=${WARMUP:-1}
rounds=${ROUNDS:-3}
release=${CARGO_TARGET_DIR:-target}/release
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release -p ringcast -p ringcast-bench --bins --examples >/dev/null
fi
bin=${RINGCAST:-$release/ringcast}
fws=${FWS_ECHO:-$release/examples/fastwebsockets_echo}
tung=${TUNGSTENITE_BROADCAST:-$release/examples/tungstenite_broadcast}
port=8400

# Every server this script starts, so that an early exit leaves none behind (killed by pid only).
pids=()
# shellcheck source=bench-lib.sh
. scripts/bench-lib.sh
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# start NAME PORT CMD...: runs CMD in the background (its output in $out/peers-server-NAME.log), waits up
# to 5 s for PORT to accept, and sets $pid. Fails when the server died or never listened.
start() {
    local name=$1 p=$2; shift 2
    "$@" >"$out/peers-server-$name.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_port "$pid" "$p" "$name" || { tail -3 "$out/peers-server-$name.log" >&2; return 1; }
}
next_port() { port=$((port + 1)); }
# ringcast PATH-ARGS...: a fresh `ringcast serve --dev` on the next port; sets $rc_port, $rc_pid.
ringcast_server() {
    next_port
    rc_port=$port
    start "ringcast-$rc_port" "$rc_port" "$bin" serve --dev --tcp-listen off --listen "127.0.0.1:$rc_port" --log-level error "$@"
    rc_pid=$pid
}
# peer_server NAME BINARY: a peer taking `127.0.0.1:PORT` (the Rust examples); sets $peer_port, $peer_pid.
peer_server() {
    next_port
    peer_port=$port
    start "$1" "$peer_port" "$2" "127.0.0.1:$peer_port"
    peer_pid=$pid
}
# uws_server NAME BINARY: a uWebSockets server taking `PORT`; sets $peer_port, $peer_pid.
uws_server() {
    next_port
    peer_port=$port
    start "$1" "$peer_port" "$2" "$peer_port"
    peer_pid=$pid
}
have() { # have VAR DESCRIPTION: is the peer binary in $VAR given and executable?
    local path=${!1:-}
    if [ -z "$path" ]; then
        echo "-- skipped: $2 ($1 not set)" >&2
        return 1
    elif [ ! -x "$path" ]; then
        echo "-- skipped: $2 ($1=$path is not an executable)" >&2
        return 1
    fi
}
# compare NAME SCENARIO ARGS...: ringcast (A, $rc_*) against the peer (B, $peer_*), table printed and kept.
compare() {
    local name=$1 scenario=$2; shift 2
    local a="ws://127.0.0.1:$rc_port$rc_path" b="ws://127.0.0.1:$peer_port/"
    echo "== $name: ringcast bench $scenario --url $a --compare $b $*" >&2
    "$bin" bench "$scenario" --url "$a" --server-pid "$rc_pid" --compare "$b" --compare-pid "$peer_pid" \
        --rounds "$rounds" --duration "$dur" --warmup "$warmup" "$@" -q --json "$out/peers-$name.json" \
        >"$out/peers-$name.txt" 2>&1 || echo "!! $name: the bench exited non-zero (see below)" >&2
    cat "$out/peers-$name.txt"
    echo
}

echo_args=(--connections 100 --window 1 --size 20)
if [ "$what" = echo ] || [ "$what" = all ]; then
    rc_path=/echo
    ringcast_server
    if [ -x "$fws" ]; then
        peer_server fastwebsockets "$fws"
        compare echo-fastwebsockets echo "${echo_args[@]}"
        stop "$peer_pid"
    else
        echo "-- skipped: fastwebsockets ($fws not built)" >&2
    fi
    if have UWS_ECHO "uWebSockets echo"; then
        uws_server uws-echo "$UWS_ECHO"
        compare echo-uws echo "${echo_args[@]}"
        stop "$peer_pid"
    fi
    stop "$rc_pid"
fi

# fanout_pair SUBSCRIBERS RATE [EXTRA ARGS...]: ringcast against each broadcast peer, a fresh ringcast
# per pair (the first pair's subscribers are gone before the second starts, but its memory is not).
fanout_pair() {
    local subs=$1 rate=$2; shift 2
    local args=(--subscribers "$subs" --publishers 1 --rate "$rate" --size 128 "$@")
    rc_path=/connection/websocket
    if [ -x "$tung" ]; then
        ringcast_server
        peer_server tungstenite "$tung"
        compare "fanout-${subs}x${rate}-tungstenite" fanout "${args[@]}"
        stop "$peer_pid"
        stop "$rc_pid"
    else
        echo "-- skipped: tokio-tungstenite broadcast ($tung not built)" >&2
    fi
    if have UWS_BROADCAST "uWebSockets broadcast"; then
        ringcast_server
        uws_server uws-broadcast "$UWS_BROADCAST"
        compare "fanout-${subs}x${rate}-uws" fanout "${args[@]}"
        stop "$peer_pid"
        stop "$rc_pid"
    fi
}
if [ "$what" = fanout ] || [ "$what" = all ]; then
    fanout_pair 1000 100
    fanout_pair 10000 10 --processes 2
fi

# uWebSockets' own client against each echo server. load_test connects 100 connections, then keeps one
# 20-byte binary message in flight on each forever and prints "Msg/sec: R" every 4 s (its timer
# granularity), R = responses in that interval ÷ 4. We take the server's CPU ticks at the first such
# line and again after $LOAD_TEST_INTERVALS more (default 3: 12 s), and divide by the responses those
# lines count; then load_test is ended (it is also under `timeout`, so never runs unbounded).
load_test_one() { # load_test_one NAME PORT PID
    local name=$1 p=$2 spid=$3 n=${LOAD_TEST_INTERVALS:-3} tck seen=0 msgs=0 t0=0 t1 line fifo
    tck=$(getconf CLK_TCK)
    cpu_ticks() { awk '{print $14 + $15}' "/proc/$spid/stat"; }
    fifo=$(mktemp -u "$out/peers-load_test.XXXX")
    mkfifo "$fifo"
    timeout $((4 * n + 30)) stdbuf -oL "$UWS_LOAD_TEST" 100 127.0.0.1 "$p" 0 0 20 >"$fifo" 2>&1 &
    local lt=$!
    echo "== load_test-$name: $UWS_LOAD_TEST 100 127.0.0.1 $p 0 0 20" >&2
    : >"$out/peers-load_test-$name.txt"
    while IFS= read -r line; do
        case $line in
        Msg/sec:*)
            if [ "$seen" -eq 0 ]; then
                t0=$(cpu_ticks)
            else
                msgs=$(awk -v m="$msgs" -v r="${line#Msg/sec: }" 'BEGIN { printf "%.0f", m + r * 4 }')
            fi
            seen=$((seen + 1))
            echo "$line" >>"$out/peers-load_test-$name.txt"
            [ "$seen" -gt "$n" ] && break
            ;;
        # Its own status lines are kept; the upgrade responses it prints (one per connection) are not.
        Using* | Running* | Closed* | ERROR*) echo "$line" >>"$out/peers-load_test-$name.txt" ;;
        esac
    done <"$fifo"
    t1=$(cpu_ticks)
    kill "$lt" 2>/dev/null || true
    wait "$lt" 2>/dev/null || true
    rm -f "$fifo"
    if [ "$seen" -le "$n" ] || [ "$msgs" -eq 0 ]; then
        echo "!! load_test-$name: only $seen reports (see $out/peers-load_test-$name.txt)" >&2
        return 0
    fi
    awk -v name="$name" -v m="$msgs" -v c=$((t1 - t0)) -v tck="$tck" -v n="$n" 'BEGIN {
        printf "load_test-%s: %d responses over %d s, %.0f msg/s, server CPU %.2f s, %.2f µs/msg\n",
            name, m, 4 * n, m / (4 * n), c / tck, c / tck * 1e6 / m }' | tee -a "$out/peers-load_test-$name.txt"
}
if [ "$what" = load_test ] || [ "$what" = all ]; then
    if have UWS_LOAD_TEST "uWebSockets load_test"; then
        # load_test upgrades on "GET /": ringcast's echo endpoint moved to /.
        ringcast_server --echo-path /
        load_test_one ringcast "$rc_port" "$rc_pid"
        stop "$rc_pid"
        if [ -x "$fws" ]; then
            peer_server fastwebsockets "$fws"
            load_test_one fastwebsockets "$peer_port" "$peer_pid"
            stop "$peer_pid"
        fi
        if [ -n "${UWS_ECHO:-}" ] && [ -x "$UWS_ECHO" ]; then
            uws_server uws-echo "$UWS_ECHO"
            load_test_one uws "$peer_port" "$peer_pid"
            stop "$peer_pid"
        fi
    fi
fi
