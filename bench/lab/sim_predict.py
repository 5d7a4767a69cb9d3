"""What disaggregation buys, predicted by the simulator (issue 16, part 3): for each number of
GPUs, workload and SLO scale, ``splitserve sim plan``'s answer: the goodput of every xPyD and of
colocated serving on those GPUs, the best layout, and the best split against colocated.

A cell of the grid is one plan (``sim/plan.py``: every candidate layout's goodput by a rate
search over the same seeded requests); its SLO is the workload's DistServe targets
(``bench/workloads.py``: chat 250 ms / 100 ms, code 125 ms / 200 ms, summarisation, the
long-prompt one, 15 s / 150 ms; or --ttft-ms/--tpot-ms) times the scale, both targets alike, the
attainment target unchanged. Every cell's layouts share one pool of ``--jobs`` processes.

Written to ``--out``: ``predictions.json`` (every cell with all its layouts' goodput, per GPU,
the (rate, attainment) points simulated, where a rate listed in ``bounded`` ran only until it
surely missed, its attainment an upper bound below the target; saved after each cell, and cells already there are skipped, so a run cut
short continues where it stopped when started again with the same options; other options with
the same folder are refused), ``predictions.md`` (a table: per cell, the best layout and its
goodput per GPU, the best split's and colocated's, and their ratio) and ``<workload>.png``
(goodput per GPU against SLO scale: best split solid, colocated dashed, a colour per GPU count).

The grid of the issue, on a 16-core machine (the simulation needs no GPU)::

    python -m splitserve.bench.lab.sim_predict --jobs 16 --out bench/out/sim_predict

(defaults: the calibrated H200 profile of the Llama-3-8B shape, 2, 4 and 8 GPUs, chat, code
and summarisation, scales 0.5, 1, 2 and 4; each simulated rate sends arrivals for 30 s or 4x the TTFT
target, whichever is longer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitserve.bench.stats import Goodput

SCHEMA = "splitserve.bench.sim_predict/1"
DEFAULT_PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "h200-llama3-8b-shape-calibrated2.json"
GRID_ARGS = ("gpus", "workloads", "scales", "jobs", "out", "latency_model")  # not part of a cell's setup


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from splitserve.sim.cli import add_common_arguments

    p = argparse.ArgumentParser(
        prog="python -m splitserve.bench.lab.sim_predict",
        description=__doc__,
        epilog="A cell is `splitserve sim plan --gpus N --workload W --ttft-ms T*scale "
               "--tpot-ms P*scale` with the options above.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpus", default="2,4,8", help="comma-separated GPU counts (default 2,4,8)")
    p.add_argument("--workloads", default="chat,code,summarisation",
                   help="comma-separated workload names of bench/workloads.py "
                        "(default chat,code,summarisation)")
    p.add_argument("--scales", default="0.5,1,2,4",
                   help="comma-separated SLO scales, tight to loose: both targets of each workload "
                        "(or of --ttft-ms/--tpot-ms) times each (default 0.5,1,2,4)")
    p.add_argument("--refine", type=int, default=4, help="bisection steps after each crossing (default 4)")
    p.add_argument("--ttft-windows", type=float, default=4.0,
                   help="each simulated rate sends arrivals for at least this many times the cell's TTFT "
                        "target (default 4): a rate the layout cannot sustain builds a queue that only "
                        "fails a loose TTFT target (summarisation's 15 s and more) in a long enough run")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="processes simulating rates, shared by every layout of every cell "
                        "(default: one per core)")
    p.add_argument("--out", default="bench/out/sim_predict",
                   help="folder of the JSON, table and plots (default bench/out/sim_predict)")
    add_common_arguments(p, duration=30.0, max_requests=200_000, one_workload=False,
                         latency_model=str(DEFAULT_PROFILE))
    args = p.parse_args(argv)
    from splitserve.bench.workloads import get_workload

    for w in _names(args.workloads):
        get_workload(w)  # an unknown name is an error listing the known ones
    return args


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cell_key(workload: str, gpus: int, scale: float) -> str:
    return f"{workload}/{gpus}/{scale:g}"


def setup_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a cell's answer depends on besides its own coordinates (the profile by content)."""
    setup = {k: v for k, v in sorted(vars(args).items()) if k not in GRID_ARGS and not callable(v)}
    setup["latency_model_sha256"] = hashlib.sha256(Path(args.latency_model).read_bytes()).hexdigest()[:16]
    return setup


def load_doc(path: Path, setup: dict[str, Any], latency_model: str) -> dict[str, Any]:
    """The predictions so far (a new document when there are none); exits when they were made
    with another setup."""
    if not path.is_file():
        return {"schema": SCHEMA, "setup": setup, "latency_model": latency_model, "cells": {}}
    doc = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA or doc.get("setup") != setup:
        changed = sorted(k for k in {*setup, *doc.get("setup", {})}
                         if setup.get(k) != doc.get("setup", {}).get(k))
        raise SystemExit(f"{path} holds predictions made with other options ({', '.join(changed)}): "
                         "give another --out, or the same options to continue it")
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    from splitserve.bench.results import clean_json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean_json(doc), indent=1))
    tmp.replace(path)


def cell_doc(workload: str, gpus: int, scale: float, slo, rows,  # noqa: ANN001
             duration_s: float | None = None) -> dict[str, Any]:
    """One cell as the JSON stores it: every layout's row (``PlanRow.to_dict``), best first,
    and the seconds of arrivals each rate sent."""
    splits = [r for r in rows if not r.layout.colocated]
    return {"workload": workload, "gpus": gpus, "scale": scale, "duration_s": duration_s,
            "slo": {"ttft_ms": slo.ttft_s * 1000, "tpot_ms": slo.tpot_s * 1000, "attainment": slo.attainment},
            "best": rows[0].layout.label, "best_split": splits[0].layout.label if splits else None,
            "layouts": [r.to_dict() for r in rows]}


def summary(cell: dict[str, Any]) -> dict[str, Any]:
    """What a cell's table row and plot points show: the best layout's, the best split's and
    colocated's rows (None where there is none) and the split's per-GPU ratio to colocated."""
    by_label = {r["layout"]: r for r in cell["layouts"]}
    out = {role: by_label.get(label) for role, label in (
        ("best", cell["best"]), ("split", cell["best_split"]), ("colocated", f"colocated{cell['gpus']}"))}
    split, colo = out["split"], out["colocated"]
    out["ratio"] = split["per_gpu"] / colo["per_gpu"] if split and colo and colo["per_gpu"] > 0 else None
    return out


def per_gpu_text(row: dict[str, Any] | None, target: float) -> str:
    from splitserve.bench.report import goodput_text

    return goodput_text(Goodput(row["goodput"], row["status"], target), row["num_gpus"]) if row else "-"


def _sorted_cells(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(doc["cells"].values(), key=lambda c: (c["workload"], c["scale"], c["gpus"]))


def markdown(doc: dict[str, Any]) -> str:
    """The table of every cell in ``doc``."""
    lines = ["| workload | SLO scale | TTFT / TPOT | GPUs | best | best per GPU | best split | "
             "split per GPU | colocated per GPU | split / colocated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in _sorted_cells(doc):
        s, target = summary(cell), cell["slo"]["attainment"]
        ratio, split = s["ratio"], s["split"]
        ratio_text = (f"{ratio:.2f}x" if ratio is not None
                      else "split only" if split and split["goodput"] > 0 else "-")
        best = s["best"]["layout"] if s["best"]["goodput"] > 0 else "none meets it"
        lines.append(f"| {cell['workload']} | {cell['scale']:g} | {cell['slo']['ttft_ms']:g} ms / "
                     f"{cell['slo']['tpot_ms']:g} ms | {cell['gpus']} | {best} | "
                     f"{per_gpu_text(s['best'], target)} | {split['layout'] if split else '-'} | "
                     f"{per_gpu_text(split, target)} | {per_gpu_text(s['colocated'], target)} | "
                     f"{ratio_text} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], out: Path) -> list[Path]:
    """``<workload>.png`` for each workload in ``doc``."""
    from splitserve.bench.plots import plot_goodput_vs_scale

    lines: dict[str, dict[int, dict[str, list[tuple[float, float]]]]] = {}
    for cell in _sorted_cells(doc):
        s = summary(cell)
        systems = lines.setdefault(cell["workload"], {}).setdefault(cell["gpus"], {"best split": [], "colocated": []})
        for role, name in (("split", "best split"), ("colocated", "colocated")):
            if s[role]:
                systems[name].append((cell["scale"], s[role]["per_gpu"]))
    return [plot_goodput_vs_scale(by_gpus, out / f"{w}.png",
                                  f"{w}: predicted goodput per GPU against SLO scale")
            for w, by_gpus in lines.items()]


def run(args: argparse.Namespace) -> int:
    from splitserve.bench.goodput import workload_slo
    from splitserve.sim.cli import latency_from_args, load_from_args, spec_from_args
    from splitserve.sim.cluster import Layout
    from splitserve.sim.plan import PlanJob, plan_many
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.json"
    doc = load_doc(path, setup_of(args), args.latency_model)
    latency, meta = latency_from_args(args)
    grid = [(w, int(g), float(s)) for w in _names(args.workloads) for s in _names(args.scales)
            for g in _names(args.gpus)]
    todo = [c for c in grid if cell_key(*c) not in doc["cells"]]
    jobs = []
    for w, g, s in todo:
        slo = workload_slo(w, args).scaled(s)
        duration = max(args.duration, args.ttft_windows * slo.ttft_s)
        load = load_from_args(argparse.Namespace(**{**vars(args), "workload": w, "duration": duration}))
        jobs.append(PlanJob(spec_from_args(args, meta, Layout(0, g)), latency, load, slo, g, args.refine))
    print(f"{len(grid) - len(todo)} of {len(grid)} cells already in {path}; {len(todo)} to simulate",
          file=sys.stderr)
    with tqdm(total=sum(j.num_gpus for j in jobs), unit="layout", desc="layouts searched") as bar:

        def progress(i: int, row) -> None:  # noqa: ANN001
            w, g, s = todo[i]
            bar.set_postfix_str(f"{w} {g} GPUs x{s:g}: {row.layout.label} {row.goodput.rate:.1f} req/s")
            bar.update()

        for i, rows in plan_many(jobs, args.jobs, progress):
            w, g, s = todo[i]
            doc["cells"][cell_key(w, g, s)] = cell_doc(w, g, s, jobs[i].slo, rows, jobs[i].load.duration_s)
            write_json(path, doc)
            (out / "predictions.md").write_text(markdown(doc))
    table = markdown(doc)
    (out / "predictions.md").write_text(table)
    pngs = plot(doc, out)
    print(table)
    print(f"wrote {path}, {out / 'predictions.md'}, {', '.join(str(p) for p in pngs)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
