#!/usr/bin/env bash
# The whole Autobahn|Testsuite part of the test command, run concurrently:
#
#   scripts/autobahn/suite.sh RINGCAST_BINARY
#
# For every read-buffer strategy it starts two release servers on the echo endpoint (limits at 16 MiB,
# as group 9 needs): one plain, for groups 1-7, 9, 10, and one with --compression, for the
# permessage-deflate groups 12 and 13. Those two groups are the slow part (216 cases of up to 1,000
# messages of up to 128 KiB, compressed both ways: ~11 minutes in one wstest process, CPU-bound, three
# quarters of it in wstest's own zlib), so their cases are split into chunks, balanced by each case's
# measured cost, and all chunks of all strategies run from one pool of AUTOBAHN_JOBS concurrent
# wstest processes, longest first; the plain groups (~15 s each) join the same pool.
#
# The chunks of a run are merged into one report per run, target/autobahn/NAME (NAME: pool, ring,
# growable for the plain groups, deflate-pool, ... for 12/13), with index.json and expected-cases.json,
# which check.py judges exactly as it judges a report of run.sh. Prints one line per run
# ("NAME: check.py's last line") and exits 0 whatever the results; the caller runs check.py.
#
# Environment:
#   AUTOBAHN_STRATEGIES              strategies for groups 1-7, 9, 10 (default: pool ring growable)
#   AUTOBAHN_COMPRESSION_STRATEGIES  strategies for groups 12, 13 (default: pool ring growable)
#   AUTOBAHN_JOBS                    concurrent wstest processes (default: CPUs + 1)
#   AUTOBAHN_CHUNKS                  chunks per strategy for 12/13 (default: 2 x AUTOBAHN_JOBS)
#   AUTOBAHN_CASES                   patterns for the plain runs (default: groups 1-7, 9, 10)
#   AUTOBAHN_COMPRESSION_CASES       patterns for the compression runs (default: ["12.*","13.*"])
#   AUTOBAHN_COMPRESSION_STRATEGY_CASES  "strategy=patterns ..." (patterns: JSON without spaces) for the
#                                    strategies whose compression run takes other cases than the above
#   AUTOBAHN_COMPRESSION_LEVELS      "strategy=level ..." for the compression servers (default: empty,
#                                    every server at the default compression_level). The strategies
#                                    differ only in how the server reads; what it sends is compressed by
#                                    the same code whatever the strategy, and most of a 12/13 run's
#                                    server time is zlib compressing the echo at the level in force.
#   AUTOBAHN_TIMEOUT                 wall-clock limit per wstest process, seconds (default: 1800)
#   AUTOBAHN_LOG_DIR                 server logs (default: <repo>/target/test-logs)
#   AUTOBAHN_WORK                    this invocation's scratch directory (default: target/autobahn/.suite);
#                                    two invocations running at once need two
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin=${1:?usage: suite.sh RINGCAST_BINARY}
strategies=${AUTOBAHN_STRATEGIES-pool ring growable}
deflate_strategies=${AUTOBAHN_COMPRESSION_STRATEGIES-pool ring growable}
cpus=$(nproc 2>/dev/null || echo 2)
jobs=${AUTOBAHN_JOBS:-$((cpus + 1))}
chunks=${AUTOBAHN_CHUNKS:-$((2 * jobs))}
export AUTOBAHN_TIMEOUT=${AUTOBAHN_TIMEOUT:-1800}
log_dir=${AUTOBAHN_LOG_DIR:-$repo/target/test-logs}
root="$repo/target/autobahn"
work=${AUTOBAHN_WORK:-$root/.suite}
mkdir -p "$log_dir" "$root"
rm -rf "$work"
mkdir -p "$work/jobs"

# Installed once here, so concurrent run.sh calls never race to create the venv.
AUTOBAHN_WSTEST=${AUTOBAHN_WSTEST:-$("$here/install.sh")}
export AUTOBAHN_WSTEST
venvpy="$(dirname "$AUTOBAHN_WSTEST")/python"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

servers=()
stop_servers() {
    for pid in "${servers[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
    servers=()
}
trap stop_servers EXIT

# start NAME STRATEGY [flags...]: a server on a free port, which it leaves in $port.
start() {
    local name=$1 strategy=$2
    shift 2
    for _ in $(seq 1 20); do
        port=$((20000 + RANDOM % 800))
        port_open "$port" || break
    done
    "$bin" serve --dev --tcp-listen off --echo-path / --listen "127.0.0.1:$port" --read-buffer "$strategy" \
        --max-message-size 16777216 --max-frame-size 16777216 --log-level warn "$@" \
        >"$log_dir/autobahn-$name-server.log" 2>&1 &
    servers+=("$!")
    for _ in $(seq 1 50); do port_open "$port" && break; sleep 0.1; done
    port_open "$port" || { echo "autobahn/suite: server $name did not start" >&2; exit 1; }
}

# Case ids a pattern list selects, resolved the way wstest resolves them.
resolve() {
    PYTHONWARNINGS="ignore" "$venvpy" - "$1" <<'EOF'
import json, sys
from autobahntestsuite.caseset import CaseSet
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
print(json.dumps(cs.parseSpecCases({"cases": json.loads(sys.argv[1]), "exclude-cases": []})))
EOF
}

# job NAME PORT CASES_JSON WEIGHT: one wstest process, queued.
n=0
job() {
    n=$((n + 1))
    local f
    f=$(printf '%s/jobs/%010d-%04d.sh' "$work" "$4" "$n")
    printf 'AUTOBAHN_CASES=%q %q %q %q %q >%q 2>&1\n' "$3" "$here/run.sh" "127.0.0.1:$2" "$1" \
        "$work/parts/$1/$n" "$work/parts/$1/$n.log" >"$f"
    mkdir -p "$work/parts/$1"
}

plain_cases=${AUTOBAHN_CASES:-'["1.*","2.*","3.*","4.*","5.*","6.*","7.*","9.*","10.*"]'}
names=()
for s in $strategies; do
    start "$s" "$s"
    job "$s" "$port" "$plain_cases" 15000
    names+=("$s")
done
if [ -n "$deflate_strategies" ]; then
    for s in $deflate_strategies; do
        patterns=${AUTOBAHN_COMPRESSION_CASES:-'["12.*","13.*"]'}
        for pair in ${AUTOBAHN_COMPRESSION_STRATEGY_CASES:-}; do
            [ "${pair%%=*}" = "$s" ] && patterns=${pair#*=}
        done
        deflate_ids=$(resolve "$patterns")
        level_flags=()
        for pair in ${AUTOBAHN_COMPRESSION_LEVELS:-}; do
            [ "${pair%%=*}" = "$s" ] && level_flags=(--compression-level "${pair#*=}")
        done
        start "deflate-$s" "$s" --compression "${level_flags[@]}"
        # Greedy split into $chunks chunks of about equal cost. Cost: the mean duration (ms) of case
        # X.Y.N by N, measured over 12.*/13.* (the message size and count grow with N).
        python3 - "$deflate_ids" "$chunks" <<'EOF' >"$work/chunks-$s"
import json, sys
cost = {1: 478, 2: 453, 3: 557, 4: 586, 5: 674, 6: 854, 7: 1232, 8: 1916, 9: 3476, 10: 6934, 11: 1010,
        12: 1345, 13: 2405, 14: 4071, 15: 8059, 16: 7402, 17: 7463, 18: 7037}
ids, k = json.loads(sys.argv[1]), max(1, int(sys.argv[2]))
w = lambda c: cost.get(int(c.split(".")[-1]), 1000)
bins = [[0, []] for _ in range(k)]
for c in sorted(ids, key=w, reverse=True):
    b = min(bins, key=lambda b: b[0])
    b[0] += w(c)
    b[1].append(c)
for total, cases in bins:
    if cases:
        print("%d %s" % (total, json.dumps(cases)))
EOF
        while read -r weight cases; do
            job "deflate-$s" "$port" "$cases" "$weight"
        done <"$work/chunks-$s"
        names+=("deflate-$s")
    done
fi

start_time=$(date +%s)
# Longest first (file names sort by weight), AUTOBAHN_JOBS at a time.
find "$work/jobs" -name '*.sh' | sort -r | xargs -P "$jobs" -n 1 bash || true
elapsed=$(($(date +%s) - start_time))
stop_servers

# Merge each run's chunks into one report, then judge it.
for name in "${names[@]}"; do
    python3 - "$root/$name" "$name" "$work/parts/$name" <<'EOF'
import json, os, shutil, sys
out, agent, parts = sys.argv[1:4]
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
index, expected, logs = {}, [], []
for part in sorted(os.listdir(parts)):
    d = os.path.join(parts, part)
    if not os.path.isdir(d):
        continue
    try:
        expected += json.load(open(os.path.join(d, "expected-cases.json")))["cases"]
    except (OSError, ValueError, KeyError):
        pass
    try:
        got = json.load(open(os.path.join(d, "index.json"))).get(agent, {})
    except (OSError, ValueError):
        got = {}
    index.update(got)
    for e in got.values():
        f = e.get("reportfile")
        if f and os.path.exists(os.path.join(d, f)):
            shutil.copy(os.path.join(d, f), os.path.join(out, f))
json.dump({agent: index}, open(os.path.join(out, "index.json"), "w"), indent=1, sort_keys=True)
json.dump({"agent": agent, "cases": expected}, open(os.path.join(out, "expected-cases.json"), "w"), indent=1)
EOF
    for log in "$work/parts/$name"/*.log; do
        grep -E "TIMED OUT|exited|failed" "$log" >&2 || true
    done
    echo "$name: $(python3 "$here/check.py" "$root/$name" | tail -n 1)"
done
echo "autobahn/suite: ${#names[@]} runs, $n wstest processes, $jobs at a time, ${elapsed}s"
