#!/usr/bin/env bash
# Download the wheels that `python3 -m splitserve.bench.engine_vs_hf` needs on a machine without
# network (the GPU box: python3.12 with torch; its image may lack the web stack): the HF baseline
# server (bench/hf_server.py: transformers + the router's HTTP code), the engine behind
# `splitserve up` (router + worker), the load generator, the report and its plots. Binary wheels
# only, for manylinux x86_64, resolved for the target Python (not this one), with their
# dependencies, except torch (the target has it; never carried) and what torch's image has.
#
#   bash scripts/wheelhouse-bench.sh [OUTDIR] [--python-version 3.12]  (OUTDIR default: wheels-bench)
#
# OUTDIR gets the wheels and requirements.txt. On the target, in the repo root:
#   python3 -m venv --system-site-packages /tmp/bv && . /tmp/bv/bin/activate
#   pip install --no-index --find-links OUTDIR -r OUTDIR/requirements.txt
# --system-site-packages keeps the machine's torch (and numpy, matplotlib, transformers if it has
# them) visible; pip then installs only what is missing or too old there (no --upgrade: a
# transformers already in the image is kept). Budget: 60 MiB.
set -euo pipefail

out="wheels-bench"
pyver="3.12"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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
# splitserve bench engine-vs-hf (written by scripts/wheelhouse-bench.sh)
transformers>=4.46      # the HF baseline: AutoModelForCausalLM.generate, streamers
tokenizers>=0.20        # router and HF tokenizer (tokenizer.json)
safetensors>=0.4        # checkpoint loading (engine and transformers)
huggingface-hub>=0.26   # transformers imports it even for local folders
fastapi>=0.110          # router, workers, HF server
pydantic>=2.6           # request validation (fastapi's)
uvicorn>=0.29           # ASGI server
httptools>=0.6          # HTTP parsing (uvicorn picks it when installed)
httpx>=0.27             # load generator, readiness checks
aiohttp>=3.9            # router -> worker calls
orjson>=3.9             # JSON on the router's hot path
prometheus-client>=0.20 # /metrics
jinja2>=3.1             # chat templates
rich>=13                # progress bars and tables
redis>=5.0              # the router's optional registry client (imported by the CLI)
# Not here: torch (the target's own), numpy (17 MiB, a transformers dependency that torch's image
# has) and matplotlib (the PNGs; in torch's image too). Add them with EXTRA="numpy matplotlib".
EOF

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
if [ "$size" -ge 60 ]; then
  echo "wheelhouse is ${size} MiB, over the 60 MiB budget" >&2
  exit 1
fi
