#!/usr/bin/env python3
"""Medians and spreads of side-by-side runs (scripts/bench-sidebyside.sh), as a Markdown
table: for each scenario and measure, old and new as `median (min–max)` over the rounds,
and the change of the median.

    python3 scripts/sidebyside.py benchmarks/sidebyside.jsonl
"""

import json
import statistics
import sys

MEASURES = {
    "idle-19000": ["rss_per_connection_kib", "clients_ready", "ramp_clients_per_s"],
    "1000x50": ["cpu_per_delivery_us", "latency_p50_ms", "latency_p99_ms", "gateway_fanout_p99_ms", "lost"],
    "1000x200": ["cpu_per_delivery_us", "latency_p50_ms", "latency_p99_ms", "gateway_fanout_p99_ms", "lost"],
    "10000x10": ["cpu_per_delivery_us", "latency_p50_ms", "latency_p99_ms", "gateway_fanout_p99_ms", "lost"],
    "burst-500-to-100": ["lost", "duplicates", "latency_p99_ms", "cpu_per_delivery_us"],
    "treeherder": ["cpu_per_delivery_us", "latency_p99_ms", "rss_per_connection_kib", "broker_queues", "broker_bindings", "lost"],
}


def fmt(values):
    if not values:
        return "–"
    med = statistics.median(values)
    if min(values) == max(values):
        return f"{med:g}"
    return f"{med:g} ({min(values):g}–{max(values):g})"


def main(path):
    runs = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    print("| scenario | measure | old | new | change of the median |")
    print("|---|---|---|---|---|")
    for name, measures in MEASURES.items():
        for m in measures:
            old = [r[m] for r in runs if r.get("name") == name and r.get("binary") == "old" and m in r]
            new = [r[m] for r in runs if r.get("name") == name and r.get("binary") == "new" and m in r]
            if not old and not new:
                continue
            change = ""
            if old and new and statistics.median(old):
                change = f"{(statistics.median(new) / statistics.median(old) - 1) * 100:+.0f} %"
            print(f"| {name} | {m} | {fmt(old)} | {fmt(new)} | {change} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/sidebyside.jsonl")
