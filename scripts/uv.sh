#!/usr/bin/env bash
# Run uv (Astral's Python package installer and resolver, from PyPI), installing it first into a
# tool environment under the user's cache, never into the project's.
#
# Why uv and not pip for the project's installs: pip's download cache stays empty here (the
# index's responses forbid HTTP caching), so every fresh virtual environment downloaded torch and
# its CUDA libraries again (~4 GB, minutes); uv keeps its own wheel cache and installs the whole
# lock into a fresh environment in seconds, and resolves one universal lock (scripts/lock.sh).
set -euo pipefail
TOOLS="${XDG_CACHE_HOME:-${HOME}/.cache}/splitserve/tools"
if [ ! -x "${TOOLS}/bin/uv" ]; then
  python3 -m venv "${TOOLS}"
  "${TOOLS}/bin/python" -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1"
fi
exec "${TOOLS}/bin/uv" "$@"
