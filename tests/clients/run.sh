#!/usr/bin/env bash
# Runs the SSE client libraries people use against the real gateway (embedded broker):
# the npm `eventsource` package (2.0.2, 4.1.1, 5.1.5) and `@microsoft/fetch-event-source` (2.0.1)
# with Node; a listener that behaves as the Taskcluster UI's (ui-listener.mjs) on the
# WebSocket endpoints; and the README's Python client (httpx + httpx-sse), the same rules
# written with sseclient-py, and requests-sse's own EventSource (pinned in
# requirements.txt, installed into tests/clients/.venv).
#
# Needs the gateway binary (GATEWAY_BIN, default target/debug/events-gateway: build it
# first), Node.js 20 or later with npm, and Python 3 with venv and pip.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

export GATEWAY_BIN="${GATEWAY_BIN:-$root/target/debug/events-gateway}"
if [ ! -x "$GATEWAY_BIN" ]; then
  echo "gateway binary $GATEWAY_BIN not found: build it first (cargo build), or set GATEWAY_BIN" >&2
  exit 1
fi

echo "== Node: eventsource 2.0.2, 4.1.1 and 5.1.5, fetch-event-source 2.0.1"
npm ci --no-audit --no-fund --loglevel=error
timeout --kill-after=10 600 node --test --test-concurrency=1 --test-reporter=spec clients.test.mjs

echo "== Node: Taskcluster's WebSocket protocol as its UI's listener uses it"
# Node 20 has the standard WebSocket behind a flag; later versions have it by default.
ws_flag=()
node -e 'process.exit(typeof WebSocket === "undefined" ? 1 : 0)' || ws_flag=(--experimental-websocket)
timeout --kill-after=10 300 node "${ws_flag[@]}" --test --test-concurrency=1 --test-reporter=spec ui.test.mjs

echo "== Python: httpx-sse 0.4.3, sseclient-py 1.9.0, requests-sse 0.5.3 (watch*.py)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
timeout --kill-after=10 300 .venv/bin/python -m unittest -v watch_test.py
