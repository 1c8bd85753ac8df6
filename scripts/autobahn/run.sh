#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzing client against a WebSocket echo server.
#
#   scripts/autobahn/run.sh HOST:PORT [label] [outdir]
#
#   HOST:PORT  server to test; wstest connects to ws://HOST:PORT/ (echo on "/")
#   label      agent name used in the report (default: ringcast)
#   outdir     report directory (default: <repo>/target/autobahn/<label>);
#              any previous report there is removed first
#
# Environment:
#   AUTOBAHN_CASES    JSON list of case patterns
#                     (default: ["1.*","2.*","3.*","4.*","5.*","6.*","7.*","9.*","10.*"])
#   AUTOBAHN_EXCLUDE  JSON list of excluded case patterns (default: [])
#   AUTOBAHN_TIMEOUT  wall-clock limit in seconds for wstest (default: 900)
#   AUTOBAHN_WSTEST   wstest executable to use (default: whatever install.sh prints)
#   AUTOBAHN_VENV     see install.sh
#
# The report ends up in OUTDIR/index.json (+ per-case json/html, index.html).
# OUTDIR/spec.json is the spec used, OUTDIR/expected-cases.json the case ids the
# spec resolves to (check.py uses it to detect cases missing from the report).
# Exit status: wstest's (124 on timeout), 3 if wstest could not connect.
# Judge the result with check.py.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

hostport="$1"
label="${2:-ringcast}"
outdir="${3:-$repo/target/autobahn/$label}"
cases="${AUTOBAHN_CASES:-[\"1.*\",\"2.*\",\"3.*\",\"4.*\",\"5.*\",\"6.*\",\"7.*\",\"9.*\",\"10.*\"]}"
exclude="${AUTOBAHN_EXCLUDE:-[]}"
limit="${AUTOBAHN_TIMEOUT:-900}"

case "$hostport" in
*:*) ;;
*)
    echo "autobahn/run: expected HOST:PORT, got '$hostport'" >&2
    exit 2
    ;;
esac

wstest="${AUTOBAHN_WSTEST:-$("$here/install.sh")}"
venvpy="$(dirname "$wstest")/python"

rm -rf "$outdir"
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
spec="$outdir/spec.json"

# Build the spec with the venv's python so JSON quoting is always right.
"$venvpy" - "$spec" "$hostport" "$label" "$outdir" "$cases" "$exclude" <<'EOF'
import json, sys
spec_path, hostport, label, outdir, cases, exclude = sys.argv[1:7]
spec = {
    "outdir": outdir,
    "servers": [{"agent": label, "url": "ws://%s/" % hostport}],
    "cases": json.loads(cases),
    "exclude-cases": json.loads(exclude),
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2, sort_keys=True)
    f.write("\n")
EOF

# Resolve the case patterns exactly the way wstest will, so check.py can tell
# when cases are missing from the report (e.g. wstest could not connect).
PYTHONWARNINGS="ignore" "$venvpy" - "$spec" "$outdir/expected-cases.json" <<'EOF'
import json, sys
from autobahntestsuite.caseset import CaseSet
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
spec = json.load(open(sys.argv[1]))
ids = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories).parseSpecCases(spec)
json.dump({"agent": spec["servers"][0]["agent"], "cases": ids}, open(sys.argv[2], "w"), indent=1)
sys.stderr.write("autobahn/run: %d cases selected by %s\n" % (len(ids), json.dumps(spec["cases"])))
EOF

echo "autobahn/run: wstest fuzzingclient -> ws://$hostport/ (agent '$label', report $outdir, limit ${limit}s)" >&2
start=$(date +%s)
rc=0
# wstest writes its report relative to nothing (outdir is absolute), but run it
# from the report dir anyway so any stray files land there.
(
    cd "$outdir"
    PYTHONWARNINGS="ignore::DeprecationWarning,ignore:Python 2 is no longer supported" \
        PYTHONUNBUFFERED=1 \
        timeout --kill-after=10 "$limit" "$wstest" -m fuzzingclient -s "$spec"
) >"$outdir/wstest.log" 2>&1 || rc=$?
elapsed=$(($(date +%s) - start))

if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "autobahn/run: wstest TIMED OUT after ${elapsed}s (no report is written on timeout); see $outdir/wstest.log" >&2
elif [ "$rc" != 0 ]; then
    echo "autobahn/run: wstest exited $rc after ${elapsed}s; see $outdir/wstest.log" >&2
    tail -n 20 "$outdir/wstest.log" >&2
else
    echo "autobahn/run: wstest finished in ${elapsed}s; report: $outdir/index.json (check with: python3 $here/check.py $outdir)" >&2
fi
# wstest exits 0 even when it cannot connect (it then writes an empty or
# partial report); surface that as an error.
if grep -q "^Connection to .* failed" "$outdir/wstest.log"; then
    grep "^Connection to .* failed" "$outdir/wstest.log" | head -n 3 >&2
    [ "$rc" != 0 ] || rc=3
fi
exit "$rc"
