"""Disaggregated against colocated on the same two devices: the comparison splitserve exists for.

Two systems, started one after the other by ``splitserve bench sweep`` (bench/goodput.py), each
serving the same seeded requests of every workload over the same rates:

- ``split``: ``splitserve up --prefill 1 --decode 1`` (one prefill worker on the first device,
  one decode worker on the second, KV over ``--kv-backend``, cuda_ipc by default);
- ``colocated``: ``splitserve up --prefill 0 --decode 2`` (two workers that each prefill and
  decode, with chunked prefill as in vLLM and DeepSpeed-FastGen, one per device);

both behind the same router with the same policy, random weights of the model's shape (the
timings need no trained weights). Goodput is judged at each workload's SLO and again with the
SLOs loosened by ``--loose`` (the claim to check: the split wins where TPOT targets are tight
and is about even where they are loose), written to ``OUT/report/<workload>/`` and
``OUT/report_loose/<workload>/`` with the plots.

On two GPUs, a Llama-3-8B-shaped model (demo vocabulary, random bf16 weights):

    python -m splitserve.bench.split_vs_colocated --model /tmp/l8 --make-8b-shape \\
        --devices cuda:0,cuda:1 --out bench/out/split

On the CPU with the demo model, as a smoke test of the whole path:

    python -m splitserve.bench.split_vs_colocated --model /tmp/demo --devices cpu,cpu \\
        --dtype float32 --kv-backend tcp --workloads chat --rates 0.5 --num-requests 4 --duration 8 \\
        --max-input 64 --max-output 8 --ttft-ms 5000 --tpot-ms 2000 --out /tmp/split
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from splitserve.bench import goodput
from splitserve.bench.goodput import command_template
from splitserve.launcher.processes import python_command

SYSTEMS = ("split", "colocated")


def system_command(kind: str, args: argparse.Namespace) -> str:
    """The ``splitserve up`` template of one system (``{model}``/``{name}`` filled by the sweep)."""
    worker = ["--dtype", args.dtype, *shlex.split(args.worker_args)]
    if not args.trained_weights:
        worker.append("--random-weights")
    if kind == "split":
        layout = ["--prefill", "1", "--decode", "1"]
        worker += ["--kv-backend", args.kv_backend]
    elif kind == "colocated":
        layout = ["--prefill", "0", "--decode", "2"]
        worker.append("--chunked-prefill")
    else:
        raise ValueError(f"unknown system {kind!r}; expected one of {SYSTEMS}")
    parts = [*python_command("-m"), "splitserve.cli", "up", "--model", "{model}",
             "--served-model-name", "{name}", *layout, "--devices", args.devices,
             "--policy", args.policy, f"--worker-args={shlex.join(worker)}"]
    # the sweep fills {model} and {name}: keep their braces, escape every other
    return command_template(parts).replace("{{model}}", "{model}").replace("{{name}}", "{name}")


def sweep_argv(args: argparse.Namespace) -> list[str]:
    """``splitserve bench sweep`` arguments for both systems and the shared load options."""
    argv = ["--model", args.model, "--out", args.out, "--workloads", args.workloads,
            "--rates", args.rates, "--num-requests", str(args.num_requests),
            "--duration", str(args.duration), "--max-requests", str(args.max_requests),
            "--seed", str(args.seed), "--length-scale", str(args.length_scale)]
    for kind in args.systems.split(","):
        argv += ["--system", f"{kind}={system_command(kind, args)}", "--gpus", f"{kind}=2"]
    for flag in ("max_input", "max_output", "max_context", "ttft_ms", "tpot_ms"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    if not args.progress:
        argv.append("--no-progress")
    return argv


def loose_reports(args: argparse.Namespace) -> None:
    """Re-judge the same runs with every SLO multiplied by ``--loose``."""
    from splitserve.bench.report import build_report, print_table

    sweep_args = _sweep_parser().parse_args(sweep_argv(args))
    for workload in args.workloads.split(","):
        files = sorted(Path(args.out).glob(f"*/{workload}_rate*.json"))
        if not files:
            continue
        slo = goodput.workload_slo(workload, sweep_args)
        results, slo, _ = build_report(
            files, Path(args.out) / "report_loose" / workload,
            slo.ttft_s * 1000 * args.loose, slo.tpot_s * 1000 * args.loose, slo.attainment,
        )
        print(f"{workload}, SLOs x{args.loose:g}:")
        print_table(results, slo)


def _sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve bench sweep")
    goodput.add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.make_8b_shape:
        from splitserve.bench.engine_vs_hf import make_8b_shape

        make_8b_shape(args.model)
    status = goodput.sweep(_sweep_parser().parse_args(sweep_argv(args)))
    if args.loose and args.loose != 1:
        loose_reports(args)
    return status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (its config's shape is served)")
    p.add_argument("--make-8b-shape", action="store_true",
                   help="first write a Llama-3-8B-shaped config with the demo tokenizer there")
    p.add_argument("--trained-weights", action="store_true",
                   help="load the folder's weights instead of random ones of its shape")
    p.add_argument("--devices", default="cuda:0,cuda:1", help="the two devices (default cuda:0,cuda:1)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-backend", default="cuda_ipc", help="the split system's KV transfer (default cuda_ipc)")
    p.add_argument("--policy", default="least_loaded", help="router policy of both systems")
    p.add_argument("--worker-args", default="", help="extra worker options for both systems")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which to run (default both)")
    p.add_argument("--workloads", default="chat,summarisation")
    p.add_argument("--rates", default="1,2,4,6,8,12,16", help="req/s, comma-separated")
    # 30 s per rate (at least 40 requests): the default sweep, both systems and both workloads,
    # is about 15 minutes of arrivals by arithmetic (4 runs x (40 + 6 x 30) s), inside the time
    # a lent 2-GPU machine is held; not yet timed on one.
    goodput.add_request_count_arguments(p, num_requests=40, duration=30.0)
    goodput.add_length_and_slo_arguments(p)
    p.add_argument("--loose", type=float, default=4.0,
                   help="also judge every SLO multiplied by this (default 4; 1 = skip)")
    p.add_argument("--out", default="bench/out/split_vs_colocated")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.split_vs_colocated ...``"""
    from splitserve.bench.entry import standalone_main

    return standalone_main(sys.modules[__name__], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
