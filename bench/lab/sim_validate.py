"""Is ``splitserve sim`` right? Measure real deployments and simulate the very same requests.

1. The latency model: ``--latency-model`` or, by default, ``splitserve profile`` on the first
   device with the workers' own options (same KV blocks, batch limits, dtype).
2. Real runs (``splitserve bench sweep``, the real load generator): ``colocated`` = one worker
   with chunked prefill (``up --prefill 0 --decode 1``) and ``split`` = one prefill-only and one
   decode-only worker (``up --prefill 1 --decode 1``, KV over ``--kv-backend``), at every rate.
3. Calibration (unless ``--no-calibrate``), written with the profile into
   OUT/latency-model-calibrated.json, which step 4 uses:
   - where the split's two workers share one GPU, how much their overlapping steps slow each
     other (``sharing.slowdown``): the value whose simulated TPOT (p50, p90) of the split's
     highest-rate run is nearest the measured one (that run's TPOT is in-sample);
   - the per-request overhead: the profile times engine steps only, so what a request pays
     outside them (HTTP, tokenising, routing, admission; for the split, the prefill hop, the
     KV connection and the decode worker's activation) is each request's measured TTFT minus
     its TTFT in a simulation of that run without overhead: ``overhead.request_ms`` (colocated)
     and ``overhead.split_request_ms``, quantile by quantile a straight line in the number of
     requests in flight (``*_per_inflight_ms``: the Python router and workers carry every open
     stream) through the gaps of each system's lowest- and highest-rate runs. So those two
     rates' TTFT is in-sample; the rates between them and TPOT are out of sample.
4. The simulator on each measured run's own request list (arrival times, prompt tokens as the
   server counted them, max_tokens) with the same layout, router policy and worker shape.
5. A table measured vs simulated (TTFT and TPOT p50/p90, attainment of both targets), the pass
   criteria (latencies within ``--tolerance``, 10%; attainment within ``--attainment-points``,
   5 points), ``validation.json``/``validation.md`` and ``validation.png`` in OUT.

CPU smoke run with the demo model (a few minutes; a loaded machine's timings are noisy, so read
its table as a check of the machinery, not of the model's accuracy):

    python -m splitserve.bench.lab.sim_validate --model /tmp/demo --make-demo --devices cpu,cpu \\
        --dtype float32 --kv-backend tcp --rates 0.5,1,2,3 --duration 15 --num-requests 8 \\
        --max-input 128 --max-output 16 --max-context 1024 --ttft-ms 3000 --tpot-ms 500 \\
        --num-kv-blocks 512 --out /tmp/simval

One H200, Llama-3-8B shape with random bf16 weights (both workers of the split share the GPU:
the simulator runs them on one shared GPU too, ``1P1D-on-1gpu``, whose steps time-slice it;
on two GPUs give ``--devices cuda:0,cuda:1``; ``bash bench/gpu_all.sh OUT sim`` runs this):

    python -m splitserve.bench.lab.sim_validate --model /tmp/l8 --make-8b-shape --devices cuda:0,cuda:0 \\
        --dtype bfloat16 --kv-backend cuda_ipc --num-kv-blocks 8192 --rates 2,4,8,12 \\
        --duration 20 --workload chat --out bench/out/sim_validate
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from splitserve.bench import goodput
from splitserve.bench.goodput import command_template
from splitserve.launcher.processes import python_command

log = logging.getLogger("splitserve.bench.lab.sim_validate")

SYSTEMS = {"colocated": (0, 1), "split": (1, 1)}  # label -> (prefill, decode) workers
METRICS = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("tpot_ms", "p50"), ("tpot_ms", "p90"))


def worker_args(args: argparse.Namespace) -> list[str]:
    """The options every worker and the profile get, so the profiled worker is the served one."""
    out = ["--dtype", args.dtype, "--num-kv-blocks", str(args.num_kv_blocks),
           "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), *shlex.split(args.worker_args)]
    if args.random_weights:
        out.append("--random-weights")
    return out


def system_command(label: str, args: argparse.Namespace) -> str:
    """``splitserve up`` for one system (``{model}``/``{name}`` filled in by the sweep)."""
    prefill, decode = SYSTEMS[label]
    devices = args.devices.split(",")
    worker = worker_args(args)
    if prefill:
        worker += ["--kv-backend", args.kv_backend]
    else:
        worker.append("--chunked-prefill")
    parts = [*python_command("-m"), "splitserve.cli", "up", "--model", "{model}",
             "--served-model-name", "{name}", "--prefill", str(prefill), "--decode", str(decode),
             "--devices", ",".join(devices[: prefill + decode]), "--policy", args.policy,
             f"--worker-args={shlex.join(worker)}"]
    return command_template(parts).replace("{{model}}", "{model}").replace("{{name}}", "{name}")


def profile(args: argparse.Namespace, out: Path) -> Path:
    """``splitserve profile`` on the first device with the workers' options."""
    path = out / "latency-model.json"
    cmd = [*python_command("-m"), "splitserve.cli", "profile", "--model", args.model,
           "--device", args.devices.split(",")[0], "--out", str(path), *worker_args(args)]
    log.info("profiling: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)
    return path


def measure(args: argparse.Namespace, out: Path) -> None:
    """The real sweep of both systems into OUT/real/<label>/."""
    argv = ["--model", args.model, "--out", str(out / "real"), "--workloads", args.workload,
            "--rates", args.rates, "--num-requests", str(args.num_requests),
            "--duration", str(args.duration), "--max-requests", str(args.max_requests),
            "--seed", str(args.seed), "--length-scale", str(args.length_scale)]
    for label in args.systems.split(","):
        argv += ["--system", f"{label}={system_command(label, args)}",
                 "--gpus", f"{label}={sum(SYSTEMS[label])}"]
    for flag in ("max_input", "max_output", "max_context", "ttft_ms", "tpot_ms"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    if not args.progress:
        argv.append("--no-progress")
    parser = argparse.ArgumentParser()
    goodput.add_arguments(parser)
    goodput.sweep(parser.parse_args(argv))


def layout_of(label: str, args: argparse.Namespace):  # noqa: ANN201
    """The simulated layout of a measured system: its workers on as many GPUs as ``--devices``
    gave them distinct devices (one shared device: ``1P1D-on-1gpu``)."""
    from splitserve.sim.cluster import Layout

    prefill, decode = SYSTEMS[label]
    return Layout(prefill, decode, len(set(args.devices.split(",")[: prefill + decode])))


def _shape(args: argparse.Namespace, latency_path: Path):  # noqa: ANN202
    from splitserve.sim.runner import EngineShape

    meta = json.loads(latency_path.read_text()).get("meta", {})
    return EngineShape(args.num_kv_blocks, int(meta.get("block_size", 16)), args.max_num_seqs,
                       args.max_num_batched_tokens, int(meta.get("max_model_len") or 1 << 20))


def requests_of(run) -> list:  # noqa: ANN001
    """A measured run's own request list for the simulator (arrivals, prompt tokens as the
    server counted them, max_tokens)."""
    from splitserve.sim.cluster import SimRequest

    return [SimRequest(r.index, r.scheduled_s, r.prompt_tokens, r.max_tokens) for r in run.records]


def bare(latency):  # noqa: ANN001, ANN201
    """The latency model without what calibration measures (overhead) or draws (spread)."""
    from dataclasses import replace

    return replace(latency, overhead_request_ms=(), overhead_handoff_ms=(), step_ratio=())


def idle_gaps(run, latency, spec) -> dict[int, float]:  # noqa: ANN001
    """Each completed request's measured TTFT minus its TTFT in a simulation of the same run
    without any overhead (ms), by request index: what the request paid outside the engine
    steps. The whole run is simulated, not each request alone, so the gaps hold no queueing or
    GPU sharing that the simulator models itself."""
    from splitserve.sim.sweep import simulate

    records, _ = simulate(spec, bare(latency), requests_of(run), _slo(run.slo))
    simulated = {r.index: r for r in records}
    return {r.index: (r.ttft_s - simulated[r.index].ttft_s) * 1000 for r in run.records
            if r.ok and simulated[r.index].ttft_s is not None}


def in_flight_at_arrival(run) -> dict[int, int]:  # noqa: ANN001
    """For each request of a measured run, how many requests were in flight (sent, not yet
    done) when it was sent."""
    spans = [(r.sent_s, r.sent_s + r.e2e_s) for r in run.records if r.sent_s is not None and r.e2e_s is not None]
    return {r.index: sum(1 for start, end in spans if start < r.sent_s < end)
            for r in run.records if r.sent_s is not None}


def path_overhead(low, high, latency, spec) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """One path's overhead as equally likely values and what each request in flight adds to
    each: the gaps of the lowest-rate run ``low`` and of the highest ``high``, quantile by
    quantile, as a straight line in the mean number of requests in flight (its growth at least
    0; the value at no load at least 0). Without a second run, the lowest run's gaps, no growth."""
    import statistics

    gaps_low = idle_gaps(low, latency, spec)
    q_low, load_low = quantiles(list(gaps_low.values())), statistics.mean(in_flight_at_arrival(low).values())
    growth = [0.0] * len(q_low)
    if high is not None and high is not low:
        q_high = quantiles(list(idle_gaps(high, latency, spec).values()))
        more = statistics.mean(in_flight_at_arrival(high).values()) - load_low
        if more > 0:
            growth = [max(0.0, (h - lo) / more) for lo, h in zip(q_low, q_high, strict=True)]
    base = [max(0.0, lo - g * load_low) for lo, g in zip(q_low, growth, strict=True)]
    return [round(v, 3) for v in base], [round(g, 4) for g in growth]


SLOWDOWNS = tuple(i / 20 for i in range(21))  # sharing.slowdown values tried, 0 to 1


def sharing_slowdown(run, latency, spec) -> tuple[float, float]:  # noqa: ANN001
    """The ``sharing.slowdown`` under which the simulated TPOT (p50 and p90) of ``run``, a
    system whose workers share a GPU, is nearest the measured one; and that mean relative error.
    TPOT is all decode steps, so it shows how much the prefill worker's steps slow them."""
    from dataclasses import replace

    from splitserve.bench.stats import summarize
    from splitserve.sim.sweep import simulate

    slo = _slo(run.slo)
    measured = summarize(run.records, slo)["tpot_ms"]
    best = (1.0, float("inf"))
    for slowdown in SLOWDOWNS:
        records, _ = simulate(spec, replace(bare(latency), sharing_slowdown=slowdown), requests_of(run), slo)
        simulated = summarize(records, slo)["tpot_ms"]
        err = sum(abs(simulated[q] / measured[q] - 1) for q in ("p50", "p90")) / 2
        if err < best[1]:
            best = (slowdown, err)
    return best


def quantiles(values: list[float], k: int = 19) -> list[float]:
    """``values`` at ``k`` evenly spaced probabilities from 5% to 95%, clipped at 0: equally
    likely values for the simulator to draw from."""
    import numpy as np

    return [round(max(0.0, float(q)), 3) for q in np.quantile(values, np.linspace(0.05, 0.95, k))]


def overhead_section(paths: dict[str, tuple[list[float], float]]) -> dict:
    """The latency model's ``overhead`` from each system's ``path_overhead``."""
    colocated = paths.get("colocated") or paths.get("split") or ([0.0], 0.0)
    section = {"request_ms": colocated[0], "request_per_inflight_ms": colocated[1]}
    if "split" in paths:
        section["split_request_ms"], section["split_request_per_inflight_ms"] = paths["split"]
    return section


def calibrate(args: argparse.Namespace, out: Path, latency_path: Path) -> Path:
    """The profile plus what the runs measure: the GPU sharing slowdown on the highest-rate run
    of a system whose workers share a GPU (if any), then the overhead on each system's
    lowest-rate run."""
    from dataclasses import replace

    from splitserve.bench.results import find_runs
    from splitserve.router.policy.latency import LatencyModel
    from splitserve.sim.sweep import SimSpec

    latency, shape = LatencyModel.load(latency_path), _shape(args, latency_path)
    doc = json.loads(latency_path.read_text())
    meta = doc.setdefault("meta", {})
    lowest: dict = {}
    highest: dict = {}
    for run in find_runs([out / "real"]):
        if run.label not in lowest or run.rate < lowest[run.label].rate:
            lowest[run.label] = run
        if run.label not in highest or run.rate > highest[run.label].rate:
            highest[run.label] = run
    specs = {label: SimSpec(layout_of(label, args), shape, args.policy) for label in lowest}
    shared = [label for label, spec in specs.items() if spec.layout.shared]
    if shared:
        run = highest[shared[0]]
        slowdown, err = sharing_slowdown(run, latency, specs[shared[0]])
        doc["sharing"] = {"slowdown": slowdown}
        meta["sharing_from"] = (f"{run.label} ({specs[shared[0]].layout.label}) {run.workload} at "
                                f"{run.rate:g} req/s: TPOT p50/p90 within {err * 100:.1f}% on average")
        latency = replace(latency, sharing_slowdown=slowdown)
        log.info("GPU sharing slowdown from %s", meta["sharing_from"])
    paths = {label: path_overhead(run, highest[label], latency, specs[label]) for label, run in lowest.items()}
    doc["overhead"] = overhead_section(paths)
    meta["overhead_from"] = {label: f"{run.workload}: gaps at {run.rate:g} req/s, their growth to "
                                    f"{highest[label].rate:g} req/s" for label, run in lowest.items()}
    path = out / "latency-model-calibrated.json"
    path.write_text(json.dumps(doc, indent=1))
    log.info("overhead from the lowest-rate runs: %s", doc["overhead"])
    return path


def simulate_runs(args: argparse.Namespace, out: Path, latency_path: Path) -> list[dict]:
    """Simulate every measured run on its own requests; one comparison row per run."""
    from splitserve.bench.results import find_runs, run_path, write_run
    from splitserve.bench.stats import summarize
    from splitserve.router.policy.latency import LatencyModel
    from splitserve.sim.sweep import SimSpec, records_span, simulate

    latency, shape = LatencyModel.load(latency_path), _shape(args, latency_path)
    rows = []
    for run in find_runs([out / "real"]):
        layout = layout_of(run.label, args)
        spec = SimSpec(layout, shape, args.policy, args.overhead_ms)
        slo = _slo(run.slo)
        records, cost = simulate(spec, latency, requests_of(run), slo, args.seed)
        measured, simulated = summarize(run.records, slo, run.run_seconds), summarize(records, slo)
        write_run(run_path(out / "sim", run.label, run.workload, run.rate), {
            **{k: v for k, v in run.data.items() if k not in ("schema", "created_utc", "host")},
            "label": run.label, "run_seconds": records_span(records), "summary": simulated,
            "requests": [r.to_dict() for r in records],
            "simulated": {"layout": layout.label, "latency_model": str(latency_path), **cost},
        })
        rows.append(compare(run.label, run.rate, measured, simulated, args))
        rows[-1]["shared_device"] = layout.shared
    return rows


def _slo(slo: dict):  # noqa: ANN202
    from splitserve.bench.stats import SLO

    return SLO(slo["ttft_ms"] / 1000, slo["tpot_ms"] / 1000, slo["attainment"])


def compare(label: str, rate: float, measured: dict, simulated: dict, args: argparse.Namespace) -> dict:
    """One system at one rate: each metric measured and simulated, and whether it passes."""
    row: dict = {"system": label, "rate": rate, "metrics": {}, "pass": True}
    for metric, q in METRICS:
        m, s = measured[metric][q], simulated[metric][q]
        err = abs(s - m) / m if m else float("inf")
        ok = err <= args.tolerance
        row["metrics"][f"{metric[:4]} {q}"] = {"measured": m, "simulated": s, "error": err, "pass": ok}
        row["pass"] &= ok
    m, s = measured["attainment"]["both"] * 100, simulated["attainment"]["both"] * 100
    ok = abs(s - m) <= args.attainment_points
    row["metrics"]["attain %"] = {"measured": m, "simulated": s, "error": abs(s - m), "pass": ok}
    row["pass"] &= ok
    return row


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    names = list(rows[0]["metrics"]) if rows else []
    lines = [f"Measured vs simulated (pass: latencies within {args.tolerance * 100:g}%, attainment "
             f"within {args.attainment_points:g} points); cells: measured / simulated.", "",
             "| system | rate | " + " | ".join(names) + " | pass |", "|" + "---|" * (len(names) + 3)]
    for r in rows:
        cells = [f"{c['measured']:.1f} / {c['simulated']:.1f}" + ("" if c["pass"] else " x")
                 for c in r["metrics"].values()]
        system = r["system"] + (" (shared device)" if r.get("shared_device") else "")
        lines.append(f"| {system} | {r['rate']:g} | " + " | ".join(cells)
                     + f" | {'yes' if r['pass'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """Each metric against rate, per system: measured solid, simulated dashed."""
    from splitserve.bench.plots import _pyplot

    plt = _pyplot()
    names = list(rows[0]["metrics"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6))
    for ax, name in zip(axes, names, strict=True):
        for system in sorted({r["system"] for r in rows}):
            pts = sorted((r["rate"], r["metrics"][name]) for r in rows if r["system"] == system)
            line = ax.plot([p[0] for p in pts], [p[1]["measured"] for p in pts], marker="o",
                           label=f"{system} measured")
            ax.plot([p[0] for p in pts], [p[1]["simulated"] for p in pts], marker="x",
                    linestyle="--", color=line[0].get_color(), label=f"{system} simulated")
        ax.set_title(name + (" (ms)" if "attain" not in name else ""))
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.make_demo and not (Path(args.model) / "config.json").is_file():
        subprocess.run([*python_command("-m"), "splitserve.cli", "model", "init", args.model], check=True)
    if args.make_8b_shape:
        from splitserve.bench.engine_vs_hf import make_8b_shape

        make_8b_shape(args.model)
        args.random_weights = True
    latency_path = Path(args.latency_model) if args.latency_model else profile(args, out)
    if not args.skip_measure:
        measure(args, out)
    if args.calibrate:
        latency_path = calibrate(args, out, latency_path)
    rows = simulate_runs(args, out, latency_path)
    if not rows:
        log.error("no measured runs under %s", out / "real")
        return 1
    text = markdown(rows, args)
    print(text)
    (out / "validation.md").write_text(text)
    (out / "validation.json").write_text(json.dumps({"latency_model": str(latency_path), "rows": rows},
                                                    indent=1, default=str))
    plot(rows, out / "validation.png")
    passed = all(r["pass"] for r in rows)
    print(f"{'PASS' if passed else 'FAIL'}: {sum(r['pass'] for r in rows)}/{len(rows)} runs within "
          f"the criteria; files in {out}")
    return 0 if passed else 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--make-demo", action="store_true", help="write the demo model there first if missing")
    p.add_argument("--make-8b-shape", action="store_true",
                   help="write a Llama-3-8B-shaped config there first (random weights)")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--latency-model", default=None, help="skip profiling: use this latency model")
    p.add_argument("--skip-measure", action="store_true",
                   help="reuse the measured runs already in OUT/real (re-simulate only)")
    p.add_argument("--devices", default="cpu,cpu", help="two devices: prefill's (and colocated's), decode's")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-backend", default="tcp")
    p.add_argument("--num-kv-blocks", type=int, default=512, help="per worker, profile and sim alike")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--worker-args", default="", help="extra worker options (all workers and profile)")
    p.add_argument("--policy", default="least_loaded")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workload", default="chat")
    p.add_argument("--rates", default="0.5,1,2,3")
    goodput.add_request_count_arguments(p, num_requests=8, duration=15.0)
    goodput.add_length_and_slo_arguments(p)
    p.add_argument("--overhead-ms", type=float, default=0.0,
                   help="a constant per-request overhead for the simulator, on top of the model's")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="simulate with the latency model as it is (no overhead measured on the runs)")
    p.add_argument("--tolerance", type=float, default=0.10, help="relative latency error that passes")
    p.add_argument("--attainment-points", type=float, default=5.0, help="attainment difference that passes")
    p.add_argument("--out", default="bench/out/sim_validate")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.lab.sim_validate ...``"""
    from splitserve.bench.entry import standalone_main

    return standalone_main(sys.modules[__name__], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
