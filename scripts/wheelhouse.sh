#!/usr/bin/env bash
# Download the wheels that `splitserve router`, the stub workers and `python -m
# splitserve.bench.router` need, for a machine without network (the GPU box: python3.12, maybe
# torch, none of the router's libraries). Binary wheels only, for manylinux x86_64, resolved for
# the target Python, not this one, so it works from any machine with network.
#
#   bash scripts/wheelhouse.sh OUTDIR [--python-version 3.12]      (OUTDIR default: .wheelhouse)
#
# OUTDIR gets the wheels and requirements.txt (what to install). On the target, in the repo root:
#   python3 -m venv /tmp/rv && . /tmp/rv/bin/activate
#   pip install --no-index --find-links OUTDIR -r OUTDIR/requirements.txt
#   pip install --no-index --find-links OUTDIR --no-deps -e .      (setuptools + wheel are there)
# Why these packages: see requirements.txt below; torch is not among them (the router path does not
# import it; the bench makes its demo model with torch only when no --model is given).
set -euo pipefail

out=".wheelhouse"
pyver="3.12"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
if ! [[ "$pyver" =~ ^3\.[0-9]+$ ]]; then
  echo "--python-version must look like 3.12, got $pyver" >&2
  exit 2
fi

mkdir -p "$out"
req="$out/requirements.txt"
cat > "$req" <<'EOF'
# splitserve router + stub workers + bench/router.py (written by scripts/wheelhouse.sh)
fastapi>=0.110          # the router's cold endpoints, the stub workers
uvicorn>=0.29           # the ASGI server
uvloop>=0.19            # event loop (uvicorn picks it when installed)
httptools>=0.6          # HTTP parsing (uvicorn picks it when installed)
aiohttp>=3.9            # router -> worker calls; bench clients
orjson>=3.9             # JSON on the router's hot path
prometheus-client>=0.20 # /metrics
tokenizers>=0.15        # the router tokenizes and detokenizes
jinja2>=3.1             # chat templates
httpx>=0.27             # launcher helpers the bench uses (wait for /health)
redis>=5.0              # --redis-url registry
# Not here, to stay under 40 MiB: numpy (17 MiB; only for fitting a profiled latency model's
# points, and for other components' CLI modules that `splitserve --help` imports). A machine
# with torch has it: make the venv with --system-site-packages. `python -m splitserve.router`
# (what bench/router.py starts) does not need it.
EOF

# Build backend for `pip install --no-deps -e .` (pyproject: setuptools>=68, wheel).
build=("setuptools>=68" "wheel")

platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 --platform any)
python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --python-version "$pyver" --implementation cp "${platforms[@]}" \
  -d "$out" -r "$req" "${build[@]}"

size=$(du -sm "$out" | cut -f1)
count=$(ls "$out"/*.whl | wc -l)
echo "wheelhouse: $count wheels, ${size} MiB in $out (python $pyver)"
if [ "$size" -ge 40 ]; then
  echo "wheelhouse is ${size} MiB, over the 40 MiB budget" >&2
  exit 1
fi
