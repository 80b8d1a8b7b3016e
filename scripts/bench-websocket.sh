#!/usr/bin/env bash
# SSE and WebSocket clients of one gateway binary side by side, alternating in one session
# (SSE, WebSocket, SSE, ... ROUNDS times per scenario): memory per idle connection and CPU
# per delivery at 1,000 x 200 msg/s. Appends one JSON line per run (with "name" and
# "protocol") to OUT, then prints medians and spreads.
#
#   bash scripts/bench-websocket.sh [ROUNDS] [OUT]
#
# Needs RabbitMQ at 127.0.0.1:5672; builds the release gateway and loadgen. About 8 minutes
# with 3 rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
out=${2:-benchmarks/websocket.jsonl}
cargo build --release --bin loadgen --bin events-gateway
mkdir -p "$(dirname "$out")"
scenarios=(
  "idle-5000|--scenario same --clients 5000 --rate 0"
  "1000x200|--scenario same --clients 1000 --rate 200 --duration 20s"
)
for entry in "${scenarios[@]}"; do
  name=${entry%%|*}
  args=${entry#*|}
  for round in $(seq 1 "$rounds"); do
    for protocol in sse websocket; do
      flag=""
      [ "$protocol" = websocket ] && flag="--websocket"
      echo "== $name round $round: $protocol" >&2
      # shellcheck disable=SC2086
      line=$(./target/release/loadgen --json --gateway-bin target/release/events-gateway $args $flag | tail -n 1)
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(name=sys.argv[2], protocol=sys.argv[3], round=int(sys.argv[4])); print(json.dumps(r, sort_keys=True))' \
        "$line" "$name" "$protocol" "$round" >> "$out"
      sleep 10 # TIME_WAIT sockets and the broker settle between runs
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for name, measures in [("idle-5000", ["rss_per_connection_kib", "ramp_s"]),
                       ("1000x200", ["cpu_per_delivery_us", "latency_p99_ms", "lost", "rss_loaded_mib"])]:
    for m in measures:
        cells = []
        for p in ["sse", "websocket"]:
            v = [r[m] for r in rows if r.get("name") == name and r.get("protocol") == p and m in r]
            cells.append(f"{p} {statistics.median(v):g} ({min(v):g}-{max(v):g}, n={len(v)})" if v else f"{p} -")
        print(f"{name:10} {m:30} " + " | ".join(cells))
PY
