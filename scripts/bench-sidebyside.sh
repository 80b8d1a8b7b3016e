#!/usr/bin/env bash
# Two gateway binaries side by side, alternating in one session: each scenario runs
# OLD, NEW, OLD, NEW, ... ROUNDS times, so that the machine's drift hits both alike.
# Appends one JSON line per run (with "binary": "old"|"new") to OUT, then prints medians
# and spreads (scripts/sidebyside.py).
#
#   bash scripts/bench-sidebyside.sh OLD_BIN NEW_BIN [ROUNDS] [OUT]
#
# Needs RabbitMQ at 127.0.0.1:5672 and a release build of loadgen. About 40 minutes with
# 3 rounds. Extra loadgen flags for every run: LOADGEN_ARGS. Only some scenarios:
# ONLY="10000x10 treeherder" (names as in the list below).
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?old binary}
new=${2:?new binary}
rounds=${3:-3}
out=${4:-benchmarks/sidebyside.jsonl}
cargo build --release --bin loadgen
mkdir -p "$(dirname "$out")"
scenarios=(
  "idle-19000|--scenario same --clients 19000 --rate 0"
  "1000x50|--scenario same --clients 1000 --rate 50 --duration 20s"
  "1000x200|--scenario same --clients 1000 --rate 200 --duration 20s"
  "10000x10|--scenario same --clients 10000 --rate 10 --duration 20s"
  "burst-500-to-100|--scenario same --clients 100 --burst 500"
  "treeherder|--scenario treeherder --clients 10000 --patterns 1000 --rate 20 --duration 20s"
)
for entry in "${scenarios[@]}"; do
  name=${entry%%|*}
  args=${entry#*|}
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  for round in $(seq 1 "$rounds"); do
    for which in old new; do
      bin=$old
      [ "$which" = new ] && bin=$new
      echo "== $name round $round: $which" >&2
      # shellcheck disable=SC2086
      line=$(./target/release/loadgen --json --gateway-bin "$bin" $args ${LOADGEN_ARGS:-} | tail -n 1)
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(name=sys.argv[2], binary=sys.argv[3], round=int(sys.argv[4])); print(json.dumps(r, sort_keys=True))' \
        "$line" "$name" "$which" "$round" >> "$out"
      sleep 10 # TIME_WAIT sockets and the broker settle between runs
    done
  done
done
python3 scripts/sidebyside.py "$out"
