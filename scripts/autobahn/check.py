#!/usr/bin/env python3
"""Strict checker for an Autobahn|Testsuite fuzzingclient report.

    python3 scripts/autobahn/check.py REPORT_DIR [--agent NAME]

Reads REPORT_DIR/index.json ({agent: {case_id: {"behavior", "behaviorClose",
"duration", "remoteCloseCode", "reportfile"}}}) and exits 0 only if every
case has behavior == "OK" and behaviorClose == "OK". "INFORMATIONAL" is
accepted only for the cases that can never yield anything else (7.1.6,
7.13.1, 7.13.2). Anything else -- NON-STRICT, FAILED, UNIMPLEMENTED,
WRONG CODE, UNCLEAN, FAILED BY CLIENT, NO_CLOSE, ... -- is a failure.

If REPORT_DIR/expected-cases.json exists (written by run.sh), every case
listed there must be present in the report, otherwise it is a failure too
(wstest silently skips the rest of the run when it cannot connect).

Every offending case is printed with its detail (from the per-case JSON
report if available). The last line is always "N passed, N failed".
"""

import argparse
import json
import os
import sys

OK = "OK"
INFORMATIONAL = "INFORMATIONAL"
# Cases whose implementation (autobahntestsuite/case/case7_1_6.py,
# case7_13_1.py, case7_13_2.py) hard-codes INFORMATIONAL as the outcome.
INFORMATIONAL_CASES = {"7.1.6", "7.13.1", "7.13.2"}


def case_key(case_id):
    out = []
    for part in str(case_id).split("."):
        out.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return out


def detail(report_dir, entry):
    """Short explanation from the per-case JSON report, if present."""
    name = entry.get("reportfile")
    if not name:
        return ""
    path = os.path.join(report_dir, name)
    try:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
    except (OSError, ValueError):
        return ""
    bits = []
    for key in ("result", "resultClose"):
        if rep.get(key):
            bits.append(str(rep[key]))
    if rep.get("description"):
        bits.append("[%s]" % " ".join(str(rep["description"]).split())[:160])
    return "; ".join(bits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir")
    ap.add_argument("--agent", help="only check this agent (default: all agents in index.json)")
    args = ap.parse_args()

    index_path = os.path.join(args.report_dir, "index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        print("ERROR: %s not found (wstest did not finish? it only writes the report at the end)" % index_path)
        print("0 passed, 1 failed")
        return 1
    except ValueError as e:
        print("ERROR: %s is not valid JSON: %s" % (index_path, e))
        print("0 passed, 1 failed")
        return 1

    expected = None
    exp_path = os.path.join(args.report_dir, "expected-cases.json")
    if os.path.exists(exp_path):
        with open(exp_path, encoding="utf-8") as f:
            exp = json.load(f)
        expected = list(exp["cases"])
        if not args.agent:
            args.agent = exp.get("agent")

    if not isinstance(index, dict) or not index:
        print("ERROR: %s contains no agents" % index_path)
        print("0 passed, 1 failed")
        return 1

    agents = sorted(index)
    if args.agent:
        if args.agent not in index:
            print("ERROR: agent %r not in report (agents: %s)" % (args.agent, ", ".join(agents)))
            print("0 passed, 1 failed")
            return 1
        agents = [args.agent]

    passed = failed = 0
    for agent in agents:
        cases = index[agent]
        if not cases:
            print("FAIL %s: no cases in report" % agent)
            failed += 1
            continue
        for case_id in sorted(cases, key=case_key):
            entry = cases[case_id]
            behavior = entry.get("behavior")
            behavior_close = entry.get("behaviorClose")
            allowed = {OK, INFORMATIONAL} if case_id in INFORMATIONAL_CASES else {OK}
            if behavior in allowed and behavior_close in allowed:
                passed += 1
                continue
            failed += 1
            print(
                "FAIL %s %s: behavior=%s behaviorClose=%s remoteCloseCode=%s duration=%sms %s"
                % (
                    agent,
                    case_id,
                    behavior,
                    behavior_close,
                    entry.get("remoteCloseCode"),
                    entry.get("duration"),
                    detail(args.report_dir, entry),
                )
            )
        if expected is not None:
            missing = [c for c in expected if c not in cases]
            for c in missing:
                print("FAIL %s %s: missing from report (not run)" % (agent, c))
            failed += len(missing)

    # Slowest cases are useful when tuning timeouts (e.g. the 9.* group).
    durations = sorted(
        ((e.get("duration") or 0, a, c) for a in agents for c, e in index[a].items()),
        reverse=True,
    )[:3]
    if durations and durations[0][0] > 0:
        print(
            "slowest: "
            + ", ".join("%s %dms" % (c, d) for d, _a, c in durations)
            + "; total %.1fs"
            % (sum(e.get("duration") or 0 for a in agents for e in index[a].values()) / 1000.0)
        )

    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
