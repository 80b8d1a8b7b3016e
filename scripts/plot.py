#!/usr/bin/env python3
"""Draws the plots of BENCHMARKS.md from benchmarks/results.jsonl (written by
scripts/bench-matrix.sh): RSS vs clients, latency percentiles vs clients, and CPU per
delivery vs fan-out width. The matrix of the earlier stream path (hyper carrying every
stream, benchmarks/results-hyper.jsonl) is drawn dashed next to it, for comparison.
Needs matplotlib (pip install matplotlib).

    python3 scripts/plot.py
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.jsonl"
BEFORE = ROOT / "benchmarks" / "results-hyper.jsonl"
OUT = ROOT / "benchmarks"


def load(path=RESULTS):
    runs = []
    if not path.exists():
        return runs
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            runs.append(json.loads(line))
    return runs


def idle_runs(runs):
    """Idle runs ramped the default way (not one client at a time)."""
    return sorted(
        (r for r in runs if r.get("rate_per_s") == 0 and r["scenario"] == "same"
         and r.get("ramp_clients_per_s", 0) > 1000),
        key=lambda r: r["clients"],
    )


def fanout_runs(runs):
    """The fan-out width series: about 100,000 deliveries per second in total."""
    series = [r for r in runs if r["scenario"] == "same" and "cpu_per_delivery_us" in r
              and abs(r["clients"] * r.get("rate_per_s", 0) - 100_000) < 2_000]
    return sorted(series, key=lambda r: r["clients"])


def plot_rss(runs, before):
    idle = idle_runs(runs)
    if not idle:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["clients"] for r in idle]
    ax.plot(xs, [r["rss_idle_mib"] for r in idle], "o-", label="gateway RSS (MiB)")
    old = idle_runs(before)
    if old:
        ax.plot([r["clients"] for r in old], [r["rss_idle_mib"] for r in old], "o:",
                color="tab:gray", label="RSS, hyper stream path (MiB)")
    ax.set_xlabel("idle SSE clients")
    ax.set_ylabel("RSS (MiB)")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["rss_per_connection_kib"] for r in idle], "s--", color="tab:orange",
             label="per connection (KiB)")
    ax2.axhline(8, color="tab:red", linewidth=0.8, linestyle=":", label="target 8 KiB")
    ax2.set_ylabel("KiB per connection")
    ax2.set_ylim(0, max(16, max(r["rss_per_connection_kib"] for r in idle) * 1.2))
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    ax.set_title("Gateway memory vs idle clients")
    fig.tight_layout()
    fig.savefig(OUT / "rss_vs_clients.svg")


def plot_latency(runs, before):
    series = fanout_runs(runs)
    if not series:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["clients"] for r in series]
    for key, label in [("latency_p50_ms", "p50"), ("latency_p99_ms", "p99"),
                       ("latency_p999_ms", "p99.9")]:
        ax.plot(xs, [r.get(key, 0) for r in series], "o-", label=label)
    old = fanout_runs(before)
    if old:
        ax.plot([r["clients"] for r in old], [r.get("latency_p99_ms", 0) for r in old], "o:",
                color="tab:gray", label="p99, hyper stream path")
    ax.set_xscale("log")
    ax.set_xlabel("clients (total 100,000 deliveries/s)")
    ax.set_ylabel("publish → receipt latency (ms)")
    ax.set_title("Latency percentiles vs clients")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "latency_vs_clients.svg")


def plot_cpu(runs, before):
    series = fanout_runs(runs)
    if not series:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["clients"] for r in series]
    ax.plot(xs, [r["cpu_per_delivery_us"] for r in series], "o-", label="writer shards")
    old = fanout_runs(before)
    if old:
        ax.plot([r["clients"] for r in old], [r["cpu_per_delivery_us"] for r in old], "o:",
                color="tab:gray", label="hyper stream path")
    ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("fan-out width: clients per message (total 100,000 deliveries/s)")
    ax.set_ylabel("gateway CPU per delivery (µs)")
    ax.set_title("CPU per delivery vs fan-out width")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(OUT / "cpu_vs_fanout.svg")


def main():
    runs = load()
    before = load(BEFORE)
    plot_rss(runs, before)
    plot_latency(runs, before)
    plot_cpu(runs, before)
    print(f"plots from {len(runs)} runs written to {OUT}")


if __name__ == "__main__":
    main()
