#!/usr/bin/env bash
# Regenerate requirements.lock: every package the tests and benchmarks need, pinned, resolved
# from pyproject.toml's ranges (the `test`, `bench` and `nixl` extras; nixl-cu13 adds one wheel,
# UCX bundled, and no dependency that torch does not already bring). scripts/test.sh installs
# exactly these versions, so a newcomer months from now gets what CI tested.
#
#   bash scripts/lock.sh            re-resolve to today's newest versions within the ranges
#   bash scripts/lock.sh --check    exit 1 if requirements.lock is out of date with pyproject.toml
#
# The resolver is uv's (`uv pip compile`, scripts/uv.sh): one universal lock for every platform
# and Python >= 3.11 in seconds, where pip-tools needs one lock per platform.
set -euo pipefail
cd "$(dirname "$0")/.."

compile=(bash scripts/uv.sh pip compile pyproject.toml --extra test --extra bench --extra nixl --universal
         --python-version 3.11 --quiet --no-header --custom-compile-command "bash scripts/lock.sh")
if [ "${1:-}" = "--check" ]; then
  # the lock is current when resolving again, preferring its own pins, changes nothing
  tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT
  cp requirements.lock "$tmp"
  "${compile[@]}" -o "$tmp" >/dev/null
  diff -u requirements.lock "$tmp" && echo "requirements.lock is up to date"
  exit
fi
"${compile[@]}" --upgrade -o requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pinned packages)"
