#!/usr/bin/env bash
# The whole ringcast test suite, runnable on a fresh machine of this project's kind:
#   1. starts Redis (127.0.0.1:6379) and NATS (127.0.0.1:4222) if they are not running, installing
#      them with apt-get only when missing;
#   2. a release build, then the Autobahn|Testsuite compression groups 12, 13 (--compression) on every
#      read-buffer strategy, started in the background at the lowest CPU priority: they are most of the
#      run's CPU and have no timing in them, so they use what the steps below leave idle;
#   3. cargo test for every crate (unit, property and real-socket integration tests);
#   4. the official Centrifugo JavaScript SDK (npm centrifuge + ws, with and without compression), the
#      admin dashboard in headless Chromium (Debian's chromium, installed when missing; npm
#      playwright-core) under a bounded `ringcast bench fanout`, and the Python SDKs (centrifuge-python,
#      cent) against the release build, also over wss:// and https://;
#   5. a short libFuzzer smoke run of the frame decoder, the handshake parser and the TCP decoder;
#   6. Autobahn groups 1-7, 9, 10 on every strategy at normal priority (they time the server), then the
#      wait for 12, 13; every run's report judged by check.py, failing on anything that is not OK.
# Ends with one line: "total: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log_dir="$root/target/test-logs"
mkdir -p "$log_dir"
passed=0
failed=0

step() { printf '\n== %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    for _ in $(seq 1 50); do port_open "$1" && return 0; sleep 0.1; done
    return 1
}

apt_install() {
    if [ -z "${RINGCAST_APT_UPDATED:-}" ]; then apt-get update -qq; export RINGCAST_APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_services() {
    if ! port_open 6379; then
        command -v redis-server >/dev/null || apt_install redis-server
        redis-server --daemonize yes --port 6379 --bind 127.0.0.1 --save "" --appendonly no >/dev/null
        wait_port 6379 || { echo "redis did not start" >&2; exit 1; }
    fi
    if ! port_open 4222; then
        command -v nats-server >/dev/null || apt_install nats-server
        (nats-server -a 127.0.0.1 -p 4222 -js >"$log_dir/nats.log" 2>&1 &)
        wait_port 4222 || { echo "nats did not start" >&2; exit 1; }
    fi
}

count_cargo() {
    # Sum the "test result: ok. N passed; M failed" lines of a cargo test log.
    local sums
    sums=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
                END { printf "%d %d", p, f }' "$1")
    passed=$((passed + ${sums% *}))
    failed=$((failed + ${sums#* }))
}

step "services: redis and nats on loopback"
ensure_services

# The Autobahn part (scripts/autobahn/suite.sh), in two invocations. The compression groups 12 and 13
# on every read-buffer strategy are most of this script's CPU (1,000 echoed messages of up to 128 KiB per
# case, compressed both ways), and have no timing in them (a case may take 480 s), so they start right
# after the release build, at the lowest CPU priority, and use the CPU the cargo tests, the SDK steps and
# the fuzz run leave idle. Groups 1-7, 9, 10 hold cases that time the server (a close expected within a
# second), so they run at normal priority once the other steps are done. Each run's merged report is
# judged here by check.py. Most of a 12/13 run's server time is zlib compressing the echoed messages at
# the level in force, and that sending code is the same whatever the strategy (they differ in how the
# server reads), so the pool server runs at the default level and ring and growable at level 1
# (AUTOBAHN_COMPRESSION_LEVELS; empty: all at the default). Group 13 is group 12's messages under other
# negotiated parameters (window bits, no context takeover): what it adds is the negotiation and the
# inflate/deflate settings, which do not depend on the read-buffer strategy, so it runs on pool only
# and ring and growable take group 12 (AUTOBAHN_COMPRESSION_STRATEGY_CASES; empty: 12 and 13 on all).
# BENCHMARKS.md, "Autobahn in the test command", has the measured times of this part and of the run.
step "release build; autobahn|testsuite groups 12, 13 with --compression started in the background"
cargo build --release -p ringcast
strategies=${AUTOBAHN_STRATEGIES-pool ring growable}
deflate_strategies=${AUTOBAHN_COMPRESSION_STRATEGIES-pool ring growable}
deflate_levels=${AUTOBAHN_COMPRESSION_LEVELS-ring=1 growable=1}
deflate_cases=${AUTOBAHN_COMPRESSION_STRATEGY_CASES-'ring=["12.*"] growable=["12.*"]'}
autobahn_start=$(date +%s)
AUTOBAHN_STRATEGIES="" AUTOBAHN_COMPRESSION_STRATEGIES="$deflate_strategies" \
    AUTOBAHN_COMPRESSION_LEVELS="$deflate_levels" AUTOBAHN_COMPRESSION_STRATEGY_CASES="$deflate_cases" \
    AUTOBAHN_LOG_DIR="$log_dir" \
    AUTOBAHN_WORK="$root/target/autobahn/.suite-deflate" \
    setsid nice -n 19 scripts/autobahn/suite.sh ./target/release/ringcast >"$log_dir/autobahn-deflate.log" 2>&1 &
deflate_pid=$!
# Whatever ends this script early also ends the background run: setsid made it a process group of its
# own (the suite, its wstest processes and its servers).
trap 'kill -- "-$deflate_pid" 2>/dev/null || true' EXIT

# Every target but the examples (peer servers for the benchmarks, which clippy --all-targets checks), then
# the doc tests.
step "cargo test --workspace"
{ cargo test --workspace --lib --bins --tests && cargo test --workspace --doc; } 2>&1 | tee "$log_dir/cargo-test.log"
count_cargo "$log_dir/cargo-test.log"

step "official JavaScript SDK (npm centrifuge) against the release build"
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
# The SDKs' TLS tests make their test certificates with the openssl CLI.
command -v openssl >/dev/null || apt_install openssl
(cd tests/sdk-js && npm ci --no-audit --no-fund --loglevel=error >"$log_dir/npm.log" 2>&1)
set +e
(cd tests/sdk-js && RINGCAST_BIN="$root/target/release/ringcast" timeout 300 node --test sdk.test.mjs) >"$log_dir/sdk-js.log" 2>&1
sdk_rc=$?
set -e
grep -E '^# (pass|fail) ' "$log_dir/sdk-js.log" || true
p=$(sed -nE 's/^# pass ([0-9]+)$/\1/p' "$log_dir/sdk-js.log")
f=$(sed -nE 's/^# fail ([0-9]+)$/\1/p' "$log_dir/sdk-js.log")
passed=$((passed + ${p:-0}))
if [ $sdk_rc -ne 0 ] || [ -z "$p" ]; then
    tail -n 40 "$log_dir/sdk-js.log"
    f=${f:-0}
    failed=$((failed + (f > 0 ? f : 1)))
fi

step "admin dashboard in headless Chromium (Debian chromium, npm playwright-core) under ringcast bench"
admin_start=$(date +%s)
[ -x /usr/bin/chromium ] || apt_install chromium
(cd tests/admin-ui && npm ci --no-audit --no-fund --loglevel=error >"$log_dir/npm-admin-ui.log" 2>&1)
set +e
(cd tests/admin-ui && RINGCAST_BIN="$root/target/release/ringcast" ADMIN_SCREENSHOT="$log_dir/admin-dashboard.png" \
    timeout 180 node --test admin.test.mjs) >"$log_dir/admin-ui.log" 2>&1
admin_rc=$?
set -e
grep -E '^# (admin:|pass|fail)' "$log_dir/admin-ui.log" || true
p=$(sed -nE 's/^# pass ([0-9]+)$/\1/p' "$log_dir/admin-ui.log")
f=$(sed -nE 's/^# fail ([0-9]+)$/\1/p' "$log_dir/admin-ui.log")
passed=$((passed + ${p:-0}))
if [ $admin_rc -ne 0 ] || [ -z "$p" ]; then
    tail -n 40 "$log_dir/admin-ui.log"
    f=${f:-0}
    failed=$((failed + (f > 0 ? f : 1)))
fi
echo "admin dashboard step: $(($(date +%s) - admin_start)) s (screenshot: $log_dir/admin-dashboard.png)"

step "official Python SDKs (PyPI centrifuge-python, cent) against the release build"
command -v python3 >/dev/null || apt_install python3 python3-venv
venv="$root/target/sdk-python-venv"
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/sdk-python/requirements.txt "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv" >"$log_dir/pip.log" 2>&1 || { apt_install python3-venv; python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q -r tests/sdk-python/requirements.txt >>"$log_dir/pip.log" 2>&1
    cp tests/sdk-python/requirements.txt "$venv/requirements.txt"
fi
set +e
(cd tests/sdk-python && RINGCAST_BIN="$root/target/release/ringcast" timeout 300 "$venv/bin/python" -m unittest -v test_sdk) >"$log_dir/sdk-python.log" 2>&1
py_rc=$?
set -e
ran=$(sed -nE 's/^Ran ([0-9]+) tests? in .*/\1/p' "$log_dir/sdk-python.log")
bad=$(grep -cE '\.\.\. (FAIL|ERROR)$' "$log_dir/sdk-python.log" || true)
echo "python SDK tests: ${ran:-0} run, ${bad:-0} failed"
passed=$((passed + ${ran:-0} - ${bad:-0}))
if [ $py_rc -ne 0 ] || [ -z "$ran" ]; then
    tail -n 40 "$log_dir/sdk-python.log"
    failed=$((failed + (bad > 0 ? bad : 1)))
fi

step "fuzz smoke run: frame decoder (differential over the three strategies), handshake parser, TCP decoder"
if FUZZ_SECONDS="${FUZZ_SECONDS:-15}" scripts/fuzz-smoke.sh >"$log_dir/fuzz.log" 2>&1; then
    tail -n 5 "$log_dir/fuzz.log"
    passed=$((passed + 3))
else
    tail -n 30 "$log_dir/fuzz.log"
    failed=$((failed + 1))
fi

step "autobahn|testsuite: groups 1-7, 9, 10 on every read-buffer strategy; then 12, 13 (started above)"
set +e
AUTOBAHN_STRATEGIES="$strategies" AUTOBAHN_COMPRESSION_STRATEGIES="" AUTOBAHN_LOG_DIR="$log_dir" \
    AUTOBAHN_WORK="$root/target/autobahn/.suite-plain" \
    scripts/autobahn/suite.sh ./target/release/ringcast >"$log_dir/autobahn-plain.log" 2>&1
plain_rc=$?
wait "$deflate_pid"
deflate_rc=$?
set -e
trap - EXIT
tail -n 1 "$log_dir/autobahn-plain.log"
tail -n 1 "$log_dir/autobahn-deflate.log"
echo "autobahn part: $(($(date +%s) - autobahn_start)) s from the start of the compression run"
for name in $strategies $(for s in $deflate_strategies; do echo "deflate-$s"; done); do
    case $name in deflate-*) suite_rc=$deflate_rc; suite_log=autobahn-deflate.log ;; *) suite_rc=$plain_rc; suite_log=autobahn-plain.log ;; esac
    set +e
    result=$(python3 scripts/autobahn/check.py "target/autobahn/$name")
    check_rc=$?
    set -e
    echo "$name: $(echo "$result" | tail -n 1)"
    echo "$result" | grep -E '^(FAIL|ERROR)' | head -n 5 || true
    line=$(echo "$result" | tail -n 1)
    p=$(echo "$line" | sed -nE 's/^([0-9]+) passed, ([0-9]+) failed$/\1/p')
    f=$(echo "$line" | sed -nE 's/^([0-9]+) passed, ([0-9]+) failed$/\2/p')
    if [ $suite_rc -ne 0 ] || [ $check_rc -ne 0 ] || [ -z "$p" ]; then
        echo "autobahn ($name) failed: suite exit $suite_rc, check exit $check_rc; see $log_dir/$suite_log" >&2
        f=${f:-0}
        failed=$((failed + (f > 0 ? f : 1)))
    fi
    passed=$((passed + ${p:-0}))
done

printf '\n'
echo "total: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
