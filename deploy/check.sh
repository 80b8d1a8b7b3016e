#!/usr/bin/env bash
# Offline validation of deploy/: renders every kustomization with kubectl, validates the
# objects against the Kubernetes schemas, and cross-checks manifests, dashboard and alert
# rules against what the binary says it reads and serves (`--print-manifest`), and the
# affinity tier's HAProxy configuration with `haproxy -c`. Needs kubectl (with kustomize),
# Python 3.11, Node.js, cargo and haproxy on PATH, and root for forky's HAProxy (in the
# root scripts/rabbitmq-4.3.sh builds).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  'kubernetes-validate==1.37.0' 'pyyaml>=6,<7'
# Prometheus's own PromQL grammar, pinned by deploy/promql/package-lock.json.
npm ci --prefix deploy/promql --silent --no-audit --no-fund >/dev/null
if [ -z "${GATEWAY_BIN:-}" ]; then
  cargo build -q --bin events-gateway
fi
exec python3 deploy/check.py "$@"
