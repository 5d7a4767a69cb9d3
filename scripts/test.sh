#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole test suite.
#   - Python packages (editable install with the test and bench extras; pip reuses its cache)
#   - redis-server (Debian package) for the registry tests
#   - a real Kubernetes control plane built from Go modules into ~/.cache/splitserve/k8s (once)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k engine`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ -f scripts/k8s-build.sh ]; then
  bash scripts/k8s-build.sh
fi

exec python3 -m pytest -q -p no:cacheprovider "$@"
