"""``splitserve sim``: simulate a deployment under a bench workload; ``splitserve sim plan``: the
best split of N GPUs.

    splitserve sim --latency-model lat.json --workload chat --rates 2,4,8 --prefill 1 --decode 3 \\
        --duration 60 --out sim-out
    splitserve sim --latency-model lat.json --workload chat --rates 2,4,8 --colocated 4 --out sim-out
    splitserve sim plan --latency-model lat.json --gpus 8 --workload chat --ttft-ms 250 --tpot-ms 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("splitserve.sim")


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser(
        "sim",
        help="simulate prefill/decode/colocated deployments under a bench workload (no GPU needed)",
        description=(
            "Discrete-event simulation of the router, prefill, decode and colocated workers, "
            "with step costs from `splitserve profile`'s latency model and the engine's own "
            "scheduler and block manager. Same workloads, seeds and request lists as "
            "`splitserve bench`, same run files, table and plots as `splitserve bench report`. "
            "`splitserve sim plan` searches every xPyD and colocated layout of N GPUs."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_arguments(sim)
    rate = sim.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, help="offered rate, requests/s")
    rate.add_argument("--rates", help="comma-separated rates, e.g. 2,4,8")
    sim.add_argument("--prefill", type=int, default=None, help="prefill workers (with --decode)")
    sim.add_argument("--decode", type=int, default=None, help="decode workers (with --prefill)")
    sim.add_argument("--colocated", type=int, default=None,
                     help="colocated workers (chunked prefill), instead of --prefill/--decode")
    sim.add_argument("--layout", default=None,
                     help="the layout as one label instead: 1P3D, colocated4, or 1P1D-on-1gpu "
                          "(workers sharing fewer GPUs, as `splitserve up --devices cuda:0,cuda:0`: "
                          "their steps time-slice the GPU)")
    sim.add_argument("--label", default=None, help="system name in tables (default: the layout, e.g. 1P3D)")
    sim.add_argument("--no-plots", dest="plots", action="store_false")
    sim.add_argument("--out", default="sim-out", help="results folder (run files and report)")
    sim.set_defaults(func=_run)
    ssub = sim.add_subparsers(dest="sim_command", metavar="ACTION")
    plan = ssub.add_parser(
        "plan", help="the best split of N GPUs (every xPyD and colocated N) and its goodput",
        description=(
            "Simulate every xPyD with x + y = N and colocated N under the workload; for each, "
            "search the rate (double until the attainment crosses the target, then bisect) and "
            "report its goodput; the best layout first. --duration seconds of arrivals per rate. "
            "A rate's run stops as soon as too many of its requests have missed for it to meet "
            "the target (the goodput is the one full runs give)."
        ),
    )
    add_common_arguments(plan, duration=60.0, max_requests=200_000)
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--refine", type=int, default=4, help="bisection steps after the crossing (default 4)")
    plan.add_argument("--jobs", type=int, default=None,
                      help="processes simulating rates (default: one per core); beyond one per "
                           "layout, a spare process simulates a rate that a search may ask for next")
    plan.add_argument("--out", default=None, help="write plan.json here")
    plan.set_defaults(func=_plan)


def add_common_arguments(p: argparse.ArgumentParser, duration: float | None = None,
                         max_requests: int = 1000, one_workload: bool = True,
                         latency_model: str | None = None) -> None:
    """Options of both the run and the plan: latency model, workers, load, SLO (``one_workload``
    False leaves out --workload, for a caller that takes several)."""
    from splitserve.bench.goodput import add_length_and_slo_arguments, add_request_count_arguments
    from splitserve.bench.workloads import WORKLOADS

    p.add_argument("--latency-model", default=latency_model,
                   help="`splitserve profile` JSON" + (f" (default {latency_model})" if latency_model else " (required)"))
    if one_workload:
        p.add_argument("--workload", default="chat", choices=sorted(WORKLOADS))
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--cv", type=float, default=2.0, help="gamma arrivals' coefficient of variation")
    add_request_count_arguments(p, num_requests=200 if duration is None else 40, duration=duration,
                                max_requests=max_requests)
    add_length_and_slo_arguments(p)
    p.add_argument("--attainment", type=float, default=0.9)
    eng = p.add_argument_group("workers (as `splitserve up --worker-args`; defaults: the workers')")
    eng.add_argument("--num-kv-blocks", type=int, default=None,
                     help="KV blocks per worker (default: the latency model's meta.num_kv_blocks, "
                          "which `profile` records)")
    eng.add_argument("--block-size", type=int, default=None, help="default: meta.block_size, else 16")
    eng.add_argument("--max-model-len", type=int, default=None, help="default: meta.max_model_len")
    eng.add_argument("--max-num-seqs", type=int, default=64)
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--policy", default="least_loaded",
                   help="router policy (round_robin, least_loaded, prefix_aware, goodput)")
    p.add_argument("--overhead-ms", type=float, default=0.0,
                   help="a constant added to every request before routing, on top of the latency "
                        "model's measured overhead.request_ms")


def latency_from_args(args: argparse.Namespace):  # noqa: ANN201 (LatencyModel, its meta)
    from splitserve.router.policy.latency import LatencyModel

    if not args.latency_model:
        raise SystemExit("--latency-model is required (write one with `splitserve profile`)")
    meta = json.loads(Path(args.latency_model).read_text()).get("meta", {})
    return LatencyModel.load(args.latency_model), meta


def spec_from_args(args: argparse.Namespace, meta: dict, layout):  # noqa: ANN001
    """The simulated deployment: workers shaped by the options, else the profiled meta."""
    from splitserve.sim.runner import EngineShape
    from splitserve.sim.sweep import SimSpec

    blocks = args.num_kv_blocks or meta.get("num_kv_blocks")
    if not blocks:
        raise SystemExit("give --num-kv-blocks (the latency model's meta has no num_kv_blocks)")
    shape = EngineShape(int(blocks), int(args.block_size or meta.get("block_size", 16)),
                        args.max_num_seqs, args.max_num_batched_tokens,
                        int(args.max_model_len or meta.get("max_model_len") or 1 << 20))
    return SimSpec(layout, shape, args.policy, args.overhead_ms)


def load_from_args(args: argparse.Namespace):
    from splitserve.bench.workloads import LengthCaps
    from splitserve.sim.sweep import Load

    return Load(args.workload, args.seed, 1.0 if args.arrival == "poisson" else args.cv,
                LengthCaps(args.length_scale, args.max_input, args.max_output, args.max_context),
                args.num_requests, args.duration, max(args.max_requests, args.num_requests))


def _layout(args: argparse.Namespace):
    from splitserve.sim.cluster import Layout

    if args.layout is not None:
        if args.colocated is not None or args.prefill is not None or args.decode is not None:
            raise SystemExit("give --layout, or --colocated N, or --prefill X --decode Y: one of them")
        try:
            return Layout.parse(args.layout)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    if args.colocated is not None:
        if args.prefill is not None or args.decode is not None:
            raise SystemExit("give --colocated N, or --prefill X --decode Y, not both")
        return Layout(0, args.colocated)
    if args.prefill is None or args.decode is None or args.prefill < 1:
        raise SystemExit("give --prefill X --decode Y (X >= 1), or --colocated N")
    return Layout(args.prefill, args.decode)


def _run(args: argparse.Namespace) -> int:
    import time

    from splitserve.bench.cli import parse_rates
    from splitserve.bench.goodput import workload_slo
    from splitserve.bench.report import build_report, print_table
    from splitserve.sim.sweep import run_rate

    if args.rate is None and args.rates is None:
        raise SystemExit("give --rate or --rates")
    latency, meta = latency_from_args(args)
    spec = spec_from_args(args, meta, _layout(args))
    load, slo = load_from_args(args), workload_slo(args.workload, args)
    files = []
    for rate in parse_rates(args):
        t0 = time.perf_counter()
        files.append(run_rate(spec, latency, load, rate, slo, args.out, args.label, args.latency_model))
        log.info("rate %g: simulated in %.2f s, wrote %s", rate, time.perf_counter() - t0, files[-1])
    label_dir = files[0].parent
    results, slo, _ = build_report(files, label_dir / f"report_{args.workload}", slo.ttft_s * 1000,
                                   slo.tpot_s * 1000, slo.attainment, plots=args.plots)
    print_table(results, slo)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from splitserve.bench.goodput import workload_slo
    from splitserve.bench.report import goodput_text
    from splitserve.sim.cluster import Layout
    from splitserve.sim.plan import plan

    latency, meta = latency_from_args(args)
    spec = spec_from_args(args, meta, Layout(0, args.gpus))
    load, slo = load_from_args(args), workload_slo(args.workload, args)
    console = Console()

    def progress(row) -> None:  # noqa: ANN001
        console.log(f"{row.layout.label}: goodput {goodput_text(row.goodput)} req/s "
                    f"({len(row.points)} simulations, {row.wall_s:.1f} s simulating)")

    jobs = args.jobs or os.cpu_count() or 1
    rows = plan(spec, latency, load, slo, args.gpus, args.refine, jobs, progress)
    table = Table(title=f"{args.workload} on {args.gpus} GPUs, SLO TTFT {slo.ttft_s * 1000:g} ms / "
                        f"TPOT {slo.tpot_s * 1000:g} ms @ {slo.attainment * 100:g}%, "
                        f"{args.duration:g} s of arrivals per rate")
    for col in ("layout", "goodput req/s", "per GPU", "rates simulated", "simulation s"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for r in rows:
        table.add_row(r.layout.label, goodput_text(r.goodput), goodput_text(r.goodput, r.layout.num_gpus),
                      str(len(r.points)), f"{r.wall_s:.1f}")
    console.print(table)
    best = rows[0]
    print(f"best: {best.layout.label}, predicted goodput {goodput_text(best.goodput)} req/s, "
          f"{goodput_text(best.goodput, best.layout.num_gpus)} per GPU")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from splitserve.bench.results import clean_json

        doc = {"schema": "splitserve.sim.plan/1", "workload": args.workload, "gpus": args.gpus,
               "slo": {"ttft_ms": slo.ttft_s * 1000, "tpot_ms": slo.tpot_s * 1000,
                       "attainment": slo.attainment},
               "latency_model": args.latency_model, "duration_s": args.duration,
               "best": best.layout.label,
               "layouts": [r.to_dict() for r in rows]}
        (out / "plan.json").write_text(json.dumps(clean_json(doc), indent=1))
    return 0
