#!/usr/bin/env python3
"""Summarizes target/bench/*.json (written by scripts/bench.sh) as the Markdown tables of BENCHMARKS.md."""
import json, pathlib, sys

d = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench")
def load(name):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

def pct(r, key, p):
    lat = (r or {}).get(key) or {}
    v = lat.get(p.replace(".", "") + "_us") if isinstance(lat, dict) else None
    return "-" if v is None else (f"{v/1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs")

print("### Echo (20-byte messages, one in flight per connection)\n")
print("| run | msgs/s | p50 | p99 | server CPU µs/msg | generator CPU µs/msg | lost |")
print("|---|---|---|---|---|---|---|")
for name in ["echo-100-pool", "echo-100-ring", "echo-100-growable", "echo-1000-pool"]:
    r = load(name)
    if not r: continue
    m, c = r["messages"], r["cpu"] or {}
    print(f"| {name} | {m['per_sec']:,.0f} | {pct(r,'latency','p50')} | {pct(r,'latency','p99')} | "
          f"{c.get('server_us_per_message', 0):.2f} | {c.get('generator_us_per_message', 0):.2f} | {m['lost']} |")

print("\n### Idle memory (server RSS growth / connections)\n")
print("| strategy | 1,000 connections | 10,000 connections |")
print("|---|---|---|")
for s in ["pool", "ring", "growable"]:
    cells = []
    for n in [1000, 10000]:
        r = load(f"idle-{n}-{s}")
        mem = (r or {}).get("memory") or {}
        b = mem.get("server_bytes_per_connection")
        cells.append("-" if b is None else f"{b:,.0f} B")
    print(f"| {s} | {cells[0]} | {cells[1]} |")

for name, what in [("idle-10000-subscribed-dev", "subscribed (Centrifugo connect + subscribe), --dev (presence on)"),
                   ("idle-10000-subscribed-plain", "subscribed, default channel options")]:
    r = load(name)
    mem = (r or {}).get("memory") or {}
    b = mem.get("server_bytes_per_connection")
    if b is not None:
        print(f"\n10,000 idle clients {what}: {b:,.0f} B per connection")

r = load("connect-10000")
if r:
    h = r.get("handshake") or {}
    print("\n### Connection storm\n")
    print(f"10,000 connections: {r['connections'].get('established', '?')} established, "
          f"{r['connections'].get('per_sec', 0):,.0f} handshakes/s, p50 {pct(r,'handshake','p50')}, p99 {pct(r,'handshake','p99')}")

print("\n### Fan-out (Centrifugo protocol, 128-byte publications)\n")
print("| run | deliveries/s | p50 | p99 | p99.9 | max | loss | server CPU µs/delivery |")
print("|---|---|---|---|---|---|---|---|")
for name in ["fanout-1000x100", "fanout-10000x10", "fanout-100x100"]:
    r = load(name)
    if not r: continue
    f, c = r.get("fanout") or {}, r["cpu"] or {}
    print(f"| {name} | {r['messages']['per_sec']:,.0f} | {pct(r,'latency','p50')} | {pct(r,'latency','p99')} | "
          f"{pct(r,'latency','p99.9')} | {pct(r,'latency','max')} | {f.get('lost', '?')} | {c.get('server_us_per_message', 0):.2f} |")
