"""How fast is ``splitserve sim``? One simulated minute of a workload on each layout, timed.

Times only the simulation (``Simulation.run``), not building the request list or writing the
run file, on the machine it runs on (one process, one core; wall and CPU seconds, the latter
less inflated by other processes on a shared machine)::

    python -m splitserve.bench.lab.sim_speed --latency-model bench/profiles/h200-llama3-8b-shape.json \\
        --layouts 4P4D,colocated8 --rates 40,120 --duration 60

``--profile FILE`` writes a cProfile of the last simulation there (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from splitserve.bench.stats import SLO, summarize
    from splitserve.router.policy.latency import LatencyModel
    from splitserve.sim.cluster import Layout, Simulation
    from splitserve.sim.runner import EngineShape
    from splitserve.sim.sweep import Load, SimSpec, sim_requests

    latency = LatencyModel.load(args.latency_model)
    meta = json.loads(Path(args.latency_model).read_text()).get("meta", {})
    shape = EngineShape(int(args.num_kv_blocks or meta.get("num_kv_blocks", 8192)),
                        int(meta.get("block_size", 16)), max_model_len=int(meta.get("max_model_len") or 1 << 20))
    load = Load(args.workload, args.seed, duration_s=args.duration, max_requests=1 << 30)
    slo = SLO(args.ttft_ms / 1000, args.tpot_ms / 1000)
    rows = []
    for layout_text in args.layouts.split(","):
        layout = Layout.parse(layout_text)
        for rate in (float(r) for r in args.rates.split(",")):
            reqs = sim_requests(load.request_set(rate))
            sim = Simulation(SimSpec(layout, shape, args.policy).config(slo), latency, reqs, args.seed)
            profiler = None
            if args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            t0, c0 = time.perf_counter(), time.process_time()
            records = sim.run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            summary = summarize(records, slo)
            tokens = sum(r.output_tokens for r in records)
            rows.append({"layout": layout.label, "rate": rate, "requests": len(reqs), "tokens": tokens,
                         "steps": sim.steps, "wall_s": wall, "cpu_s": cpu, "ttft_p90_ms": summary["ttft_ms"]["p90"],
                         "tpot_p90_ms": summary["tpot_ms"]["p90"]})
            r = rows[-1]
            print(f"{r['layout']:>11} rate {rate:g}: {r['requests']} requests, {tokens} tokens, "
                  f"{r['steps']} steps in {wall:.2f} s ({cpu:.2f} s CPU; TTFT p90 {r['ttft_p90_ms']:.1f} ms, "
                  f"TPOT p90 {r['tpot_p90_ms']:.1f} ms)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency-model", default="bench/profiles/h200-llama3-8b-shape.json")
    p.add_argument("--layouts", default="4P4D,colocated8")
    p.add_argument("--rates", default="40")
    p.add_argument("--workload", default="chat")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="default: the profile's")
    p.add_argument("--policy", default="least_loaded")
    p.add_argument("--ttft-ms", type=float, default=250.0)
    p.add_argument("--tpot-ms", type=float, default=100.0)
    p.add_argument("--profile", default=None, help="write a cProfile of the last simulation here")
    p.add_argument("--out", default=None, help="write the timings (JSON) here")


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.lab.sim_speed ...``"""
    from splitserve.bench.entry import standalone_main

    return standalone_main(sys.modules[__name__], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
