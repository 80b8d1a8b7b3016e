#!/usr/bin/env bash
# Profiles a gateway binary under one load-generator scenario: counts its socket writes and
# CPU time (perf stat) and records call graphs (perf record), then prints the inclusive
# shares behind BENCHMARKS.md's "Where the CPU goes".
#
#   bash scripts/profile.sh NAME GATEWAY_BIN LOADGEN_ARGS...
#   bash scripts/profile.sh 10000x10 target/release/events-gateway \
#       --scenario same --clients 10000 --rate 10 --duration 30s
#
# Needs perf, RabbitMQ at 127.0.0.1:5672 and a release build of loadgen. Writes
# /tmp/profile-NAME.{json,stat,data,children}. The recording starts 9 s in (after the
# clients are ready) and lasts 5 s (counts) then 8 s (call graphs).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?name}
bin=$(realpath "${2:?gateway binary}")
shift 2
out=/tmp/profile-$name
./target/release/loadgen --json --gateway-bin "$bin" "$@" > "$out.json" &
loadgen=$!
sleep 9
pid=$(pgrep -f "^$bin" | head -n 1)
perf stat -e syscalls:sys_enter_sendmsg,task-clock -p "$pid" -o "$out.stat" -- sleep 5
perf record -F 499 -g -p "$pid" -o "$out.data" -- sleep 8 2>/dev/null
wait "$loadgen"
perf report -i "$out.data" --children --sort sym --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -n 80 > "$out.children"
cat "$out.stat"
grep -E 'sendmsg|net_rx_action|sock_def_readable|tcp_sendmsg$|Conn::|poll_readiness' "$out.children" || true
tail -n 1 "$out.json"
