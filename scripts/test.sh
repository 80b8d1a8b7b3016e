#!/usr/bin/env bash
# Runs every test of the project on this machine:
#   1. starts RabbitMQ if it is not running (installs it from Debian's packages if absent),
#      and installs HAProxy from Debian's packages if absent (the replicas test runs it);
#   2. `cargo test`: unit tests and the integration tests against the real RabbitMQ, then
#      the integration tests again against RabbitMQ 4.3 and 4.0 with upstream 4.3's
#      defaults (scripts/rabbitmq-debian.sh builds each from Debian's packages the first
#      time: forky's and trixie's);
#   3. deploy/check.sh: the Kubernetes manifests, dashboard and alerts render and validate
#      (and deploy/mistakes.py: the check catches deliberate mistakes);
#   4. tests/browser/run.sh: the live page in headless Chromium against the real binary;
#   5. tests/clients/run.sh: the SSE client libraries people use (Node, Python) against it.
# Exits non-zero as soon as one part fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== RabbitMQ"
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  rabbitmq-server -detached
fi
for _ in $(seq 1 60); do
  if rabbitmqctl -q await_startup >/dev/null 2>&1; then break; fi
  sleep 1
done
rabbitmqctl -q await_startup

echo "== HAProxy (the affinity tier's checks and the replicas test)"
if ! command -v haproxy >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy
fi

echo "== deploy/check.sh"
bash deploy/check.sh -q
echo "== deploy/mistakes.py (check.sh must catch each deliberate mistake)"
python3 deploy/mistakes.py

echo "== module layering (no import cycles)"
python3 scripts/module-cycles.py

echo "== file sizes (no file under src/ over 400 lines, src/bin/ aside)"
long=$(find src -name '*.rs' -not -path 'src/bin/*' -exec awk 'END { if (NR > 400) print FILENAME ": " NR " lines" }' {} \;)
if [ -n "$long" ]; then
  echo "$long: cut it by concept (STYLE: one concept per file)" >&2
  exit 1
fi

echo "== cargo test (RabbitMQ $(rabbitmqctl -q version 2>/dev/null || echo '?'))"
cargo test

# The integration tests again on each Debian release's broker (4.3: forky's, 4.0: trixie's,
# Debian stable's), both with upstream 4.3's defaults; one node at a time.
for version in 4.3 4.0; do
  echo "== RabbitMQ $version with upstream 4.3's defaults"
  "./scripts/rabbitmq-$version.sh" start
  echo "== integration tests against RabbitMQ $("./scripts/rabbitmqctl-$version" -q version)"
  TEST_AMQP_URL=$("./scripts/rabbitmq-$version.sh" url) \
    TEST_RABBITMQCTL="$PWD/scripts/rabbitmqctl-$version" \
    cargo test --test gateway --test broker_restart
  "./scripts/rabbitmq-$version.sh" stop
done

echo "== browser test"
cargo build --bin events-gateway
bash tests/browser/run.sh

echo "== SSE client libraries (Node and Python)"
bash tests/clients/run.sh
