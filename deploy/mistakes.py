#!/usr/bin/env python3
"""Proves that deploy/check.py catches mistakes: makes deliberate mistakes (fifteen) in copies of
the deployment material, one at a time, and checks that check.py fails on each, naming it.

Usage: python3 deploy/mistakes.py   (after deploy/check.sh has installed what check.py needs;
GATEWAY_BIN as for check.py). Exits 1 if a mistake goes unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent

# (file under the copy, text to find, replacement, text the failure must contain)
MISTAKES = [
    ("deploy/k8s/base/config.env", "PING_INTERVAL=20s", "PING_INTERVALL=20s",
     "env PING_INTERVALL is read by the binary"),
    ("deploy/k8s/base/config.env", "READY_TIMEOUT=30s", "READY_TIMEOUT=30 seconds or so",
     "the binary accepts READY_TIMEOUT"),
    ("deploy/k8s/base/config.env", "PREFETCH=1000", "PREFETCH=0",
     "the binary accepts PREFETCH"),
    ("deploy/k8s/base/deployment.yaml", "path: /__heartbeat__", "path: /__heartbeat",
     "readinessProbe path /__heartbeat is a route"),
    ("deploy/k8s/base/deployment.yaml", "containerPort: 12345", "containerPort: 8080",
     "container port `http` 8080"),
    ("deploy/k8s/base/deployment.yaml", "terminationGracePeriodSeconds: 45",
     "terminationGracePeriodSeconds: 20", "terminationGracePeriodSeconds 20 > SHUTDOWN_GRACE"),
    ("deploy/k8s/base/deployment.yaml", "terminationGracePeriodSeconds: 45",
     "terminationGracePeriodSeconds: 45\n      hostNetwrk: true", "invalid against Kubernetes"),
    ("deploy/grafana/events-gateway.json", "events_gateway_subscriptions{", "events_gateway_subscription{",
     "events_gateway_subscription is registered by the binary"),
    ("deploy/grafana/alerts.yaml", 'reason="malformed"}[15m]', 'reason="malformd"}[15m]',
     'label value reason="malformd"'),
    ("deploy/grafana/alerts.yaml", "increase(events_gateway_broker_reconnects_total[15m]) > 3",
     "increase(events_gateway_broker_reconnects_total[15m] > 3", "PromQL parses"),
    ("deploy/Dockerfile", "EXPOSE 12345", "EXPOSE 8080", "Dockerfile EXPOSE 8080"),
    ("deploy/k8s/components/affinity/haproxy.cfg", "balance hash url_param(bindings),url_dec",
     "balance roundrobin # url_param(bindings),url_dec", "haproxy hashes on the `bindings` parameter"),
    ("deploy/k8s/components/affinity/haproxy.cfg", "hash-type consistent", "hash-type map-based",
     "haproxy's hashing is consistent"),
    ("deploy/k8s/components/affinity/haproxy.yaml", "    - name: http\n      port: 12345",
     "    - name: http\n      port: 8080", "port `http` (the SRV record's) is the gateways' port"),
    ("deploy/k8s/components/affinity/haproxy.cfg", "weight 100 hash-key addr-port",
     "weight 100 hash-key address", "valid for HAProxy 3.2"),
]


def copy_tree(dest: Path) -> None:
    shutil.copytree(DEPLOY, dest / "deploy", ignore=shutil.ignore_patterns("__pycache__"),
                    symlinks=True)
    for name in ("Cargo.toml", ".dockerignore"):
        shutil.copy(REPO / name, dest / name)
    # check.py runs forky's HAProxy through scripts/rabbitmq-4.3.sh.
    shutil.copytree(REPO / "scripts", dest / "scripts", symlinks=True)


def main() -> int:
    env = {**os.environ,
           "GATEWAY_BIN": os.environ.get("GATEWAY_BIN", str(REPO / "target/debug/events-gateway"))}
    missed = 0
    for i, (rel, find, replace, expect) in enumerate(MISTAKES, 1):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            copy_tree(root)
            path = root / rel
            text = path.read_text()
            if find not in text:
                print(f"  FAIL  mistake {i}: {find!r} not found in {rel}: update this list")
                missed += 1
                continue
            path.write_text(text.replace(find, replace, 1))
            proc = subprocess.run([sys.executable, str(root / "deploy/check.py"), "-q"],
                                  capture_output=True, text=True, env=env)
            failures = [line for line in proc.stdout.splitlines() if "FAIL" in line]
            caught = proc.returncode == 1 and any(expect in line for line in failures)
            print(f"  {'ok  ' if caught else 'FAIL'}  mistake {i} ({rel}: {find!r} -> {replace!r})"
                  + (f": {failures[0].strip()}" if caught else
                     f": not caught (status {proc.returncode}); failures: {failures}"))
            missed += 0 if caught else 1
    print(f"{len(MISTAKES) - missed} of {len(MISTAKES)} deliberate mistakes caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
