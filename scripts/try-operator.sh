#!/usr/bin/env bash
# Try the operator on this machine: a local Kubernetes control plane (scripts/k8s-build.sh's
# binaries, built on first use), the operator, and the pods of namespace `demo` run as real
# processes on loopback addresses; then `kubectl apply` an InferenceService and curl its router.
# See the README ("Try the operator on this machine") and tests/try_operator.py.
#
#   bash scripts/try-operator.sh            # start, print what to run, wait for Ctrl-C
#   bash scripts/try-operator.sh --apply    # also apply the chart's example InferenceService
#   bash scripts/try-operator.sh --check    # apply, send one completion, stop (a smoke test)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# safe-path mode: the repository root never goes on sys.path (DESIGN.md); tests/ does, for the
# test environment's modules (k8s_env, pod_processes) that this reuses
export PYTHONSAFEPATH=1 PYTHONPATH="$repo/tests${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -P -m try_operator "$@"
