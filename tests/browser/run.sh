#!/usr/bin/env bash
# Runs the real-browser test of the live page.
#
#   tests/browser/run.sh            the page as the gateway serves it at /
#   tests/browser/run.sh --static   the page from web/ on a local static server (python3),
#                                   pointed at the gateway under test with ?gateway=
#
# Needs the gateway binary (GATEWAY_BIN, default target/debug/events-gateway: build it first),
# Node.js 20 or later with npm, and Debian's chromium (installed here with apt if missing).
# Prints `N passed, N failed` last; exits non-zero when a test fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

static=0
for arg in "$@"; do
  case "$arg" in
    --static) static=1 ;;
    *) echo "usage: $0 [--static]" >&2; exit 2 ;;
  esac
done

export GATEWAY_BIN="${GATEWAY_BIN:-$root/target/debug/events-gateway}"
if [ ! -x "$GATEWAY_BIN" ]; then
  echo "gateway binary $GATEWAY_BIN not found: build it first (cargo build), or set GATEWAY_BIN" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version 2>/dev/null || true

# Only playwright-core, from the lock file; it never downloads a browser here.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
npm ci --no-audit --no-fund --loglevel=error

server_pid=""
out="$(mktemp)"
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -f "$out"
}
trap cleanup EXIT

if [ "$static" = 1 ]; then
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  python3 -m http.server --bind 127.0.0.1 --directory "$root/web" "$port" >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    if curl -fs -o /dev/null "http://127.0.0.1:$port/index.html"; then break; fi
    sleep 0.1
  done
  export PAGE_URL="http://127.0.0.1:$port/index.html"
  echo "page served from web/ at $PAGE_URL"
fi

status=0
timeout --kill-after=10 600 node --test --test-concurrency=1 --test-reporter=spec browser.test.mjs 2>&1 | tee "$out" || status=$?

pass="$(sed -n 's/^ℹ pass \([0-9]\+\)$/\1/p' "$out" | tail -1)"
fail="$(sed -n 's/^ℹ fail \([0-9]\+\)$/\1/p' "$out" | tail -1)"
pass="${pass:-0}"
fail="${fail:-0}"
if [ "$status" != 0 ] && [ "$fail" = 0 ]; then fail=1; fi
echo "$pass passed, $fail failed"
exit "$status"
