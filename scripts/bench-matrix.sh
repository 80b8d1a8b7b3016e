#!/usr/bin/env bash
# Runs the load-generator scenarios behind BENCHMARKS.md and appends one JSON line per run
# to benchmarks/results.jsonl (then `python3 scripts/plot.py` redraws the plots).
# Needs RabbitMQ at 127.0.0.1:5672 (guest/guest) and takes about 15 minutes. Runs one
# scenario at a time: the gateway, the load generator and RabbitMQ share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin events-gateway --bin loadgen
out=benchmarks/results.jsonl
mkdir -p benchmarks
: > "$out"
run() {
  echo "== loadgen $*" >&2
  ./target/release/loadgen --json "$@" | tail -n 1 >> "$out"
  sleep 3 # let TIME_WAIT sockets and the broker settle between runs
}
# Idle clients: RSS per connection.
for n in 1000 5000 10000 19000; do run --scenario same --clients "$n" --rate 0; done
# Time to ready, one client at a time: already-bound binding, then a new binding each.
run --scenario same --clients 300 --rate 0 --connect-concurrency 1
run --scenario treeherder --clients 300 --patterns 300 --rate 0 --connect-concurrency 1
# Throughput and CPU per delivery at 1,000 clients x 200 msg/s, three coalescing windows.
for w in 0ms 10ms 20ms; do
  run --scenario same --clients 1000 --rate 200 --duration 20s --gateway-arg=--write-coalesce=$w
done
# Latency: 1,000 x 50 msg/s and 10,000 x 10 msg/s.
for w in 0ms 10ms; do
  run --scenario same --clients 1000 --rate 50 --duration 20s --gateway-arg=--write-coalesce=$w
done
run --scenario same --clients 10000 --rate 10 --duration 20s
# Fan-out width at a fixed 100,000 deliveries/s.
for n in 100 1000 5000 10000; do
  run --scenario same --clients "$n" --rate "$((100000 / n))" --duration 15s
done
# A burst of 500 messages as fast as possible to 100 clients.
run --scenario same --clients 100 --burst 500
# Treeherder-like: 10,000 clients over 1,000 patterns on the 7 task exchanges.
run --scenario treeherder --clients 10000 --patterns 1000 --rate 20 --duration 20s
echo "results in $out" >&2
