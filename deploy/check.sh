#!/usr/bin/env bash
# Offline validation of deploy/: renders every kustomization with kubectl, validates the
# objects against the Kubernetes schemas, and cross-checks manifests, dashboard and alert
# rules against the source. Needs kubectl (with kustomize) and Python 3.11 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  'kubernetes-validate==1.37.0' 'pyyaml>=6,<7'
exec python3 deploy/check.py "$@"
