#!/usr/bin/env bash
# Download the wheels splitserve needs on a machine without network (the GPU box: python3.12 with
# torch, without the web stack): the router, the workers' HTTP side, the stub workers and
# bench/lab/router.py, and with --bench also what `python3 -m splitserve.bench.engine_vs_hf` adds (the
# HF baseline server: transformers). Binary wheels only, for manylinux x86_64, resolved for the
# target Python (not this one), with their dependencies except torch, numpy, triton and nvidia-*
# (the target has them; never carried).
#
#   bash scripts/wheelhouse.sh [OUTDIR] [--bench] [--python-version 3.12]  (default .wheelhouse)
#
# OUTDIR gets the wheels and requirements.txt. On the target, in the repo root:
#   python3 -m pip install --no-index --find-links OUTDIR -r OUTDIR/requirements.txt
#   (or in a venv made with --system-site-packages, which keeps the machine's torch visible)
# pip installs only what is missing or too old there. Budget: 40 MiB (60 MiB with --bench).
# EXTRA="numpy matplotlib" adds packages (and lets the skipped ones through by name).
set -euo pipefail

out=".wheelhouse"
pyver="3.12"
bench=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    --bench) bench=1; shift ;;
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
# splitserve router, workers' HTTP side, stub workers, bench/lab/router.py (scripts/wheelhouse.sh)
fastapi>=0.110          # the router's cold endpoints, workers, stub workers, HF server
pydantic>=2.6           # request validation
uvicorn>=0.29           # the ASGI server
uvloop>=0.19            # event loop (uvicorn picks it when installed)
httptools>=0.6          # the router's worker client; uvicorn's HTTP parser
aiohttp>=3.9            # health/load polls; bench clients
orjson>=3.9             # JSON on the router's hot path
prometheus-client>=0.20 # /metrics
tokenizers>=0.20        # the router tokenizes and detokenizes
jinja2>=3.1             # chat templates
httpx>=0.27             # launcher helpers (wait for /health), the load generator
redis>=5.0              # --redis-url registry
setuptools>=68          # build backend for `pip install --no-deps -e .`
wheel
EOF
if [ "$bench" = 1 ]; then
  cat >> "$req" <<'EOF'
# --bench: splitserve bench engine-vs-hf
transformers>=4.46      # the HF baseline: AutoModelForCausalLM.generate, streamers
safetensors>=0.4        # checkpoint loading (engine and transformers)
huggingface-hub>=0.26   # transformers imports it even for local folders
rich>=13                # progress bars and tables
EOF
fi
budget=$((bench ? 60 : 40))

extra=()
if [ -n "${EXTRA:-}" ]; then
  read -r -a extra <<<"$EXTRA"
fi

platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 --platform any)
target=(--quiet --disable-pip-version-check --only-binary=:all: --python-version "$pyver"
        --implementation cp "${platforms[@]}")
resolve=("${target[@]}" --target "$out/.resolve")  # pip wants --target with --platform; dry run: stays empty
common=("${target[@]}" -d "$out")

# Resolve dependencies, but never download torch, numpy or nvidia-* (pip download cannot exclude
# a dependency, so resolve first with --report and download the rest without dependencies).
report="$out/.resolve.json"
python3 -m pip install "${resolve[@]}" --dry-run --ignore-installed --report "$report" \
  -r "$req" "${extra[@]}" >/dev/null
mapfile -t wanted < <(python3 - "$report" "${extra[@]}" <<'PY'
import json
import sys

report, extra = sys.argv[1], {e.split("=")[0].split(">")[0].split("<")[0].lower() for e in sys.argv[2:]}
skip = {"torch", "numpy", "triton"}
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    name = meta["name"].lower().replace("_", "-")
    if name in extra or not (name in skip or name.startswith("nvidia-")):
        print(f"{meta['name']}=={meta['version']}")
PY
)
rm -rf "$report" "$out/.resolve"
python3 -m pip download "${common[@]}" --no-deps "${wanted[@]}"

size=$(du -sm "$out" | cut -f1)
count=$(ls "$out"/*.whl | wc -l)
echo "wheelhouse: $count wheels, ${size} MiB in $out (python $pyver)"
if [ "$size" -ge "$budget" ]; then
  echo "wheelhouse is ${size} MiB, over the ${budget} MiB budget" >&2
  exit 1
fi
