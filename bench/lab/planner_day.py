"""A day of traffic in the simulator with the planner in the loop: GPU-hours and SLO attainment
of a fixed fleet sized for the peak, the reactive planner and the planner v2 (issue 18).

The day (``sim/day.py``): a diurnal rate with seeded bursts, compressed ``--compress`` times
(the default 24 plays 24 hours in one simulated hour, ~2 minutes per system on one core);
request lengths from ``--workload``. The workers: the H200 profile with its compute costs x4
and transfer costs x2 (``--compute-scale``, ``--transfer-scale``: a 32B-class model, assumed).
The planner's clocks are the operator's defaults divided by the same factor: tick 15 s, metrics
window 60 s, up-cooldown 60 s, down-cooldown and stabilisation 300 s, and the pods' start time
``--start-delay`` (default 240 s: llm-d #1071 reports 2-8 minutes; 4 minutes is a pod that pulls
a cached image and loads a 32B model's weights from local disk). The three systems
(``sim/autoscale.py``):

- fixed: the replicas the planner's own arithmetic gives at the day's highest rate (bursts
  included), never changed;
- reactive: the planner before v2: the last window's load only, scale up at once, no queue
  inputs, no forecast, no margin feedback, no hysteresis;
- v2: ``operator/planner.py`` as the operator runs it.

GPU-hours count each pod from its creation (starting pods hold their GPU) to the end of its
drain, scaled back to the real day. A request "in a ramp" arrived while the offered rate was at
least 10% above its value half an hour (real) before: the morning rise and each burst's onset.

    python -m splitserve.bench.lab.planner_day --jobs 3 --out bench/out/planner_day
    python -m splitserve.bench.lab.planner_day --jobs 3 --bursts 12 --burst-max 3 --out bench/out/bursty
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from splitserve.bench.stats import SLO, attainment, meets
from splitserve.bench.workloads import get_workload
from splitserve.operator.capacity import decode_seqs, prefill_tokens_per_s
from splitserve.operator.planner import Capacity
from splitserve.router.policy.latency import LatencyModel
from splitserve.sim.autoscale import (
    CRD_AUTOSCALING,
    Autoscaler,
    LoopConfig,
    gpu_seconds,
    planner_v2,
    reactive,
    replicas_for_rate,
)
from splitserve.sim.cluster import Layout, SimRequest, Simulation
from splitserve.sim.day import DAY_S, DayShape, day_requests
from splitserve.sim.runner import EngineShape
from splitserve.sim.sweep import SimSpec

MODES = ("fixed", "reactive", "v2")
DEFAULT_PROFILE = Path(__file__).resolve().parent / "profiles" / "h200-llama3-8b-shape.json"
RAMP_RISE, RAMP_LOOKBACK_H = 1.1, 0.5


@dataclass(frozen=True)
class Day:
    """Everything one mode's run needs (picklable: modes run in parallel processes)."""

    latency: LatencyModel
    shape: EngineShape
    slo: SLO
    day: DayShape
    workload: str
    compress: float
    seed: int
    start_delay_s: float  # real seconds
    tick_s: float  # real seconds
    max_replicas: int
    headroom: float = 0.8


def capacity(d: Day, requests: list[SimRequest]) -> Capacity:
    """Per-replica capacity from the latency model (as ``operator/capacity.py`` computes it), a
    decode replica's also bounded by its engine's batch (``max_num_seqs``)."""
    ctx = float(np.mean([r.prompt_tokens + r.max_tokens / 2 for r in requests]))
    seqs = min(decode_seqs(d.latency, d.slo.tpot_s * 1000, ctx), float(d.shape.max_num_seqs))
    return Capacity(prefill_tokens_per_s(d.latency, d.slo.ttft_s * 1000), seqs)


def life_s(d: Day, requests: list[SimRequest], cap: Capacity) -> float:
    """A request's mean life at full decode batches: prefill, transfer, then its tokens."""
    prompt = float(np.mean([r.prompt_tokens for r in requests]))
    out = float(np.mean([r.max_tokens for r in requests]))
    b = cap.decode_seqs_at_tpot
    step = d.latency.decode_step_ms(b, b * (prompt + out / 2))
    return (d.latency.prefill_ms(prompt) + d.latency.transfer_ms(prompt) + out * step) / 1000


def loop_config(d: Day, mode: str, cap: Capacity) -> LoopConfig:
    if mode == "fixed":
        cfg = None
    else:
        cfg = planner_v2((1, d.max_replicas), (1, d.max_replicas), cap, d.slo, d.start_delay_s,
                         d.headroom)
        cfg = reactive(cfg) if mode == "reactive" else cfg
    loop = LoopConfig(cfg, d.tick_s, d.start_delay_s, float(CRD_AUTOSCALING["windowSeconds"]),
                      sees_queues=mode == "v2")
    return loop.compressed(d.compress)


def in_ramp(day: DayShape, hour: float) -> bool:
    return day.rate(hour) >= RAMP_RISE * day.rate(hour - RAMP_LOOKBACK_H)


def run_mode(d: Day, mode: str, progress: bool = False) -> dict[str, Any]:
    """One system over the day: its summary and its timeline."""
    t0 = time.perf_counter()
    requests = day_requests(d.day, d.workload, d.compress, d.seed)
    cap = capacity(d, requests)
    mean_prompt = float(np.mean([r.prompt_tokens for r in requests]))
    life = life_s(d, requests, cap)
    rate_at = d.day.max_rate() if mode == "fixed" else d.day.rate(0.0)
    start = replicas_for_rate(rate_at, mean_prompt, life, cap, d.headroom)
    end_s = DAY_S / d.compress
    spec = SimSpec(Layout(*start), d.shape)
    sim = Simulation(spec.config(d.slo), d.latency, requests, d.seed)
    loop = loop_config(d, mode, cap)
    scaler = Autoscaler(sim, requests, loop, d.slo, end_s)
    scaler.start()
    bar = _progress(scaler, end_s, mode) if progress else None
    records = sim.run()
    if bar is not None:
        bar.close()
    hours = [r.arrival_s * d.compress / 3600 for r in requests]
    ramp = [rec for rec, h in zip(records, hours, strict=True) if in_ramp(d.day, h)]
    both = [all(meets(rec, d.slo)) for rec in records]
    return {
        "mode": mode,
        "start_replicas": list(start),
        "capacity": {"prefill_tokens_per_s": round(cap.prefill_tokens_per_s_at_ttft, 1),
                     "decode_seqs": cap.decode_seqs_at_tpot},
        "gpu_hours": round(gpu_seconds(sim, end_s, d.compress) / 3600, 2),
        "requests": len(records),
        "attainment": round(attainment(records, d.slo).both, 4),
        "ttft_attainment": round(attainment(records, d.slo).ttft, 4),
        "tpot_attainment": round(attainment(records, d.slo).tpot, 4),
        "failed": sum(not r.ok for r in records),
        "ramp_requests": len(ramp),
        "ramp_misses": sum(not all(meets(r, d.slo)) for r in ramp),
        "ramp_attainment": round(attainment(ramp, d.slo).both, 4) if ramp else None,
        "misses": both.count(False),
        "misses_by_hour": [sum(not ok for ok, h in zip(both, hours, strict=True) if int(h) == i)
                           for i in range(24)],
        "scale_events": len(scaler.reasons),
        "scale_causes": causes(scaler.reasons),
        "decisions": [[round(t * d.compress / 3600, 3), why] for t, why in scaler.reasons],
        "max_gpus": max(row["gpus"] for row in scaler.timeline),
        "wall_s": round(time.perf_counter() - t0, 1),
        "timeline": scaler.timeline,
    }


def causes(reasons: list[tuple[float, str]]) -> dict[str, int]:
    """Scale events by pool and cause (the planner's reason: behind, forecast, load, down)."""
    out: dict[str, int] = {}
    for _, why in reasons:
        pool, _, rest = why.partition(": ")
        counts = rest.split(" ", 1)[0].split("->")
        cause = rest.split("(", 1)[1].split(":", 1)[0] if int(counts[1]) > int(counts[0]) else "down"
        key = f"{pool} {cause}"
        out[key] = out.get(key, 0) + 1
    return out


def _progress(scaler: Autoscaler, end_s: float, mode: str) -> Any:
    """A tqdm bar over the simulated day's hours, advanced by the planner's ticks."""
    from tqdm import tqdm

    bar = tqdm(total=24, desc=mode, unit="h", bar_format="{desc}: {bar} {n:.1f}/{total} h [{elapsed}]")
    tick = scaler.tick

    def ticked(t_ms: float) -> None:
        tick(t_ms)
        bar.n = min(24.0, t_ms / 1000 / end_s * 24)
        bar.refresh()

    scaler.tick = ticked  # type: ignore[method-assign]
    return bar


def plot(results: list[dict[str, Any]], d: Day, path: Path) -> Path:
    """Replicas per pool and window attainment over the day, one column per system."""
    from splitserve.bench.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(3, len(results), figsize=(5 * len(results), 8), sharex=True,
                             sharey="row", squeeze=False)
    hours = np.linspace(0, 24, 24 * 12 + 1)
    for col, res in enumerate(results):
        tl = res["timeline"]
        h = [row["t"] * d.compress / 3600 for row in tl]
        ax = axes[0][col]
        ax.plot(hours, [d.day.rate(x) for x in hours], color="grey")
        ax.set_title(f"{res['mode']}: {res['gpu_hours']} GPU-h, {res['attainment'] * 100:.1f}% met")
        axes[0][0].set_ylabel("offered rate, req/s")
        ax = axes[1][col]
        for role in ("prefill", "decode"):
            ax.step(h, [row[role] for row in tl], where="post", label=f"{role} (asked)")
            ax.step(h, [row[f"{role}_ready"] for row in tl], where="post", linestyle=":",
                    label=f"{role} ready")
        ax.step(h, [row["gpus"] for row in tl], where="post", color="black", label="GPUs held")
        axes[1][0].set_ylabel("replicas")
        ax.legend(fontsize=7)
        ax = axes[2][col]
        ax.plot(h, [math.nan if row["attainment"] is None else row["attainment"] * 100 for row in tl],
                linewidth=0.6)
        ax.axhline(d.slo.attainment * 100, linestyle="--", color="red")
        ax.set_ylim(0, 101)
        ax.set_xlabel("hour of the day")
        axes[2][0].set_ylabel("attainment over the window, %")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def table(results: list[dict[str, Any]]) -> str:
    fixed = next((r for r in results if r["mode"] == "fixed"), None)
    lines = ["| system | GPU-hours | vs fixed | attainment (both) | TTFT / TPOT met | misses in ramps "
             "(of requests) | ramp attainment | scale events | max GPUs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vs = f"{(r['gpu_hours'] / fixed['gpu_hours'] - 1) * 100:+.1f}%" if fixed else "-"
        ramp = "-" if r["ramp_attainment"] is None else f"{r['ramp_attainment'] * 100:.1f}%"
        lines.append(f"| {r['mode']} | {r['gpu_hours']} | {vs} | {r['attainment'] * 100:.1f}% | "
                     f"{r['ttft_attainment'] * 100:.1f}% / {r['tpot_attainment'] * 100:.1f}% | "
                     f"{r['ramp_misses']} ({r['ramp_requests']}) | {ramp} | {r['scale_events']} | "
                     f"{r['max_gpus']} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency-model", default=str(DEFAULT_PROFILE), help="`splitserve profile` JSON")
    p.add_argument("--compute-scale", type=float, default=4.0,
                   help="prefill/decode costs x this (4: a 32B-class dense model on the 8B's GPU)")
    p.add_argument("--transfer-scale", type=float, default=2.0,
                   help="KV transfer costs x this (2: the 32B-class model's KV per token)")
    p.add_argument("--workload", default="conversation", help="bench workload for request lengths")
    p.add_argument("--peak-rate", type=float, default=20.0, help="the diurnal peak, requests/s")
    p.add_argument("--trough", type=float, default=0.25, help="the night's rate over the peak")
    p.add_argument("--bursts", type=int, default=6, help="seeded bursts over the day")
    p.add_argument("--burst-max", type=float, default=2.0, help="a burst multiplies the rate by 1.4 to this")
    p.add_argument("--compress", type=float, default=24.0, help="the day plays in 86400/this s")
    p.add_argument("--start-delay", type=float, default=240.0, help="pod start time, real seconds")
    p.add_argument("--tick", type=float, default=15.0, help="planner interval, real seconds")
    p.add_argument("--ttft-ms", type=float, default=1000.0, help="TTFT target (none: the workload's)")
    p.add_argument("--tpot-ms", type=float, default=100.0, help="TPOT target (none: the workload's)")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=16, help="each worker's batch cap")
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--max-replicas", type=int, default=16, help="per pool, for the planners")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="modes run in parallel processes")
    p.add_argument("--out", default="bench/out/planner_day", help="day.json and day.png go here")


def scaled_latency(lat: LatencyModel, compute: float, transfer: float) -> LatencyModel:
    """``lat`` for a model ``compute`` times heavier per token (prefill and decode costs) whose
    KV per token is ``transfer`` times larger (the transfer's costs); the per-request overheads
    and the step-time spread (ratios) are the model's, not the GPU's, and stay."""
    out = {}
    for f in fields(lat):
        if f.name.startswith(("prefill_", "decode_", "transfer_")):
            k = transfer if f.name.startswith("transfer_") else compute
            out[f.name] = getattr(lat, f.name) * k
    return replace(lat, **out)


def day_from_args(args: argparse.Namespace) -> Day:
    w = get_workload(args.workload)
    ttft = args.ttft_ms if args.ttft_ms is not None else w.slo_ms[0]
    tpot = args.tpot_ms if args.tpot_ms is not None else w.slo_ms[1]
    lat = scaled_latency(LatencyModel.load(args.latency_model), args.compute_scale,
                         args.transfer_scale)
    return Day(lat,
               EngineShape(args.num_kv_blocks, max_num_seqs=args.max_num_seqs),
               SLO(ttft / 1000, tpot / 1000, args.attainment),
               DayShape.seeded(args.peak_rate, args.seed, args.bursts, args.trough, args.burst_max),
               args.workload, args.compress, args.seed, args.start_delay, args.tick,
               args.max_replicas)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("splitserve.engine").setLevel(logging.WARNING)  # one line per new worker
    d = day_from_args(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - set(MODES)
    if bad:
        raise SystemExit(f"unknown mode(s) {sorted(bad)}; known: {MODES}")
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(run_mode, [d] * len(modes), modes))
    else:
        results = [run_mode(d, m, progress=sys.stderr.isatty()) for m in modes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "bursts": [b.__dict__ for b in d.day.bursts],
               "results": results}
    (out / "day.json").write_text(json.dumps(summary, indent=1))
    png = plot(results, d, out / "day.png")
    print(table(results))
    print(f"wrote {out / 'day.json'} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.lab.planner_day ...``"""
    from splitserve.bench.entry import standalone_main

    return standalone_main(sys.modules[__name__], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
