#!/usr/bin/env bash
# Every GPU number in bench/RESULTS.md, in one run, each step bounded in time so one slow step
# cannot eat the others' (a lent GPU machine gives about 30 minutes; the whole run needs ~20).
#
#   bash bench/gpu_all.sh OUTDIR [STEP ...]
#
# Steps (default: all, in this order): check (GPU tests of the kernels and the cuda_ipc KV
# backend, the engine's greedy equality with transformers, no hidden sync, no compile after warm-up,
# `splitserve up --devices cuda:0,cuda:0` serving transformers' greedy output), engine, kernels, kvtransfer,
# prefill_transfer, router, engine_vs_hf, sim, split (only with two GPUs). Each writes OUTDIR/<step>.log and its JSON. Run from
# a folder where the repository is importable as `splitserve` (the script makes one in /tmp if
# not). Without the router's libraries (fastapi, uvicorn, orjson, ...), carry a wheelhouse:
# `bash scripts/wheelhouse.sh .wheelhouse --bench` here, and this installs from it.
#
# A lent machine runs one command for at most 10 minutes, but keeps the processes a command
# started in a new session: for the longer steps (split takes ~20 minutes), start this with
# `setsid nohup bash bench/gpu_all.sh /tmp/out split > /tmp/out/main.log 2>&1 < /dev/null &`
# and collect /tmp/out in the following calls (made within the machine's idle release).
set -uo pipefail

out="${1:?usage: bash bench/gpu_all.sh OUTDIR [STEP ...]}"
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(check engine kernels kvtransfer prefill_transfer router engine_vs_hf sim split)
mkdir -p "$out"
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

if ! python3 -c "import splitserve" 2>/dev/null; then
  mkdir -p /tmp/splitserve-path && ln -sfn "$repo" /tmp/splitserve-path/splitserve
  export PYTHONPATH="/tmp/splitserve-path${PYTHONPATH:+:$PYTHONPATH}"
fi
# safe-path mode: the repository root (this folder) never goes on sys.path, where our kernels/,
# router/, ... would shadow installed packages of the same name
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
if [ -d .wheelhouse ] && ! python3 -c "import fastapi, uvicorn, orjson, httptools" 2>/dev/null; then
  python3 -m pip install -q --break-system-packages --no-index -f .wheelhouse \
    -r .wheelhouse/requirements.txt 2>&1 | tail -2
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader | tee "$out/hardware.txt"

run() {  # run STEP SECONDS COMMAND...: bounded, logged, the tail shown
  local name="$1" limit="$2"
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v -i warn "$out/$name.log" | tail -20
  [ $rc -eq 0 ] || echo "== $name exited with $rc"
}

for step in "${steps[@]}"; do
  case "$step" in
    check)
      run check_kernels 360 env SPLITSERVE_TEST_DEVICE=cuda python3 -m pytest -q --noconftest \
        tests/test_kernels_triton.py tests/test_kernels_gemv.py
      run check_overlap 240 python3 -m pytest -q --noconftest tests/test_engine_gpu_overlap.py \
        tests/test_warmup_gpu.py
      run check_engine 240 python3 -m splitserve.bench.lab.engine_exactness
      run check_cuda_ipc 240 python3 -m pytest -q --noconftest tests/test_kvtransfer_cuda_ipc.py \
        tests/test_kvtransfer_contract.py -k cuda_ipc
      run check_one_gpu_split 300 python3 -m pytest -q --noconftest tests/test_up_one_gpu.py
      run check_nixl 240 python3 -m pytest -q --noconftest -rs tests/test_kvtransfer_nixl.py \
        tests/test_kvtransfer_contract.py -k nixl ;;  # skips with the reason without NIXL
    engine) run engine 420 python3 -m splitserve.bench.engine --batches 1,32,64 --out "$out/engine.json" ;;
    kernels) run kernels 300 python3 -m splitserve.bench.lab.kernels --json "$out/kernels.json" ;;
    kvtransfer) run kvtransfer 180 python3 -m splitserve.bench.lab.kvtransfer_gpu --repeats 10 --json "$out/kvtransfer.json"
      run kvtransfer_nixl 180 python3 -m splitserve.bench.lab.kvtransfer_nixl --device cuda \
        --devices 0,1 --tokens 4096 --repeats 10 --json "$out/kvtransfer_nixl.json" ;;
    prefill_transfer) run prefill_transfer 240 python3 -m splitserve.bench.lab.prefill_transfer \
        --backend cuda_ipc,tcp --lengths 1024,4096 --out "$out/prefill_transfer.json" ;;
    router) run router 240 python3 -m splitserve.bench.lab.router --router-cpus first:2 \
        --concurrency 1,1000 --duration 15 --out "$out/router.json"
      run router_paced 120 python3 -m splitserve.bench.lab.router --router-cpus first:2 \
        --concurrency 1000 --rate 2000 --duration 15 --decisions 0 --out "$out/router_paced.json" ;;
    engine_vs_hf) run engine_vs_hf 600 python3 -m splitserve.bench.engine_vs_hf --model /tmp/l8 \
        --make-8b-shape --device cuda:0 --out "$out/engine_vs_hf" --no-progress ;;
    sim)  # simulator vs measured (a split on one GPU shares it, and is simulated sharing it), then sim speed
      devs=cuda:0,cuda:0
      [ "$gpus" -ge 2 ] && devs=cuda:0,cuda:1
      run sim_validate 600 python3 -m splitserve.bench.lab.sim_validate --model /tmp/l8 --make-8b-shape \
        --devices "$devs" --dtype bfloat16 --kv-backend cuda_ipc --num-kv-blocks 8192 \
        --rates 2,4,8,12 --duration 30 --workload chat --out "$out/sim_validate" --no-progress
      run sim_speed 300 taskset -c 2 python3 -m splitserve.bench.lab.sim_speed --rates 40,150 \
        --out "$out/sim_speed.json" ;;
    split)
      if [ "$gpus" -ge 2 ]; then
        run split 1500 python3 -m splitserve.bench.split_vs_colocated --model /tmp/l8s --make-8b-shape \
          --devices cuda:0,cuda:1 --out "$out/split" --no-progress
      else
        echo "== split: needs two GPUs, this machine has $gpus"
      fi ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
