"""Compare systems from their run files: a table, report.json, report.md and the plots.

Everything is recomputed from the raw request records with one SLO for all systems (the one
given, else the one the runs were made with, which must then agree), so systems measured on
different days are still judged by the same rule.

report.json schema (``"schema": "splitserve.bench.report/1"``)::

    {
      "schema": "splitserve.bench.report/1",
      "slo": {"ttft_ms": float, "tpot_ms": float, "attainment": float},
      "systems": [{
        "label": str, "workload": str, "num_gpus": int | null,
        "goodput": {"rate": float, "status": "interpolated" | "above_range" | "below_range",
                    "per_gpu": float | null},
        "runs": [{"rate": float, "file": str, "summary": stats.summarize(...)}]
      }]
    }

Files next to it: report.md (the table, for bench/RESULTS.md), attainment_<workload>.png and
cdf_<workload>_rate<R>.png for each rate that every system of the workload ran.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.bench.plots import plot_attainment, plot_cdfs
from splitserve.bench.results import RunFile, clean_json, find_runs
from splitserve.bench.stats import SLO, Goodput, goodput, summarize

REPORT_SCHEMA = "splitserve.bench.report/1"


@dataclass
class SystemResult:
    """One system on one workload: summaries per rate and the goodput over them."""

    label: str
    workload: str
    num_gpus: int | None
    rates: list[float]
    summaries: list[dict[str, Any]]
    goodput: Goodput
    runs: list[RunFile]

    @property
    def goodput_per_gpu(self) -> float | None:
        """Goodput divided by the GPUs the system used, when known."""
        return self.goodput.rate / self.num_gpus if self.num_gpus else None


def resolve_slo(runs: list[RunFile], ttft_ms: float | None, tpot_ms: float | None,
                attainment: float | None) -> SLO:
    """The SLO to judge by: each given value, else the runs' own, which must then agree."""
    chosen = {}
    for key, given in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms), ("attainment", attainment)):
        if given is not None:
            chosen[key] = given
            continue
        seen = sorted({r.slo[key] for r in runs})
        if len(seen) > 1:
            raise ValueError(
                f"runs were made with different {key} values {seen}; pass --{key.replace('_', '-')}"
                " to judge them all by one"
            )
        chosen[key] = seen[0]
    return SLO(chosen["ttft_ms"] / 1000.0, chosen["tpot_ms"] / 1000.0, chosen["attainment"])


def evaluate(runs: list[RunFile], slo: SLO) -> list[SystemResult]:
    """Group runs by (workload, label), summarise each rate and compute the goodput."""
    groups: dict[tuple[str, str], list[RunFile]] = defaultdict(list)
    for run in runs:
        groups[(run.workload, run.label)].append(run)
    results = []
    for (workload, label), group in sorted(groups.items()):
        group.sort(key=lambda r: r.rate)
        rates = [r.rate for r in group]
        if len(set(rates)) != len(rates):
            paths = ", ".join(str(r.path) for r in group)
            raise ValueError(f"{label}/{workload}: two runs at the same rate ({paths})")
        summaries = [summarize(r.records, slo, r.run_seconds) for r in group]
        gp = goodput([(s_rate, s["attainment"]["both"])
                      for s_rate, s in zip(rates, summaries, strict=True)], slo.attainment)
        gpus = {r.num_gpus for r in group}
        results.append(SystemResult(label, workload, gpus.pop() if len(gpus) == 1 else None,
                                    rates, summaries, gp, group))
    return results


def build_report(
    paths: list[str | Path],
    out_dir: str | Path,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
    attainment: float | None = None,
    plots: bool = True,
) -> tuple[list[SystemResult], SLO, list[Path]]:
    """Load, evaluate and write report.json, report.md and (unless ``plots`` is off) PNGs
    into ``out_dir``."""
    runs = find_runs(list(paths))
    slo = resolve_slo(runs, ttft_ms, tpot_ms, attainment)
    results = evaluate(runs, slo)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_json(results, slo, out / "report.json"), out / "report.md"]
    (out / "report.md").write_text(markdown_table(results, slo))
    if plots:
        written += write_plots(results, slo, out)
    return results, slo, written


def write_plots(results: list[SystemResult], slo: SLO, out: Path) -> list[Path]:
    """Per workload: attainment vs rate, and TTFT/TPOT CDFs at each rate all systems ran."""
    by_wl: dict[str, list[SystemResult]] = defaultdict(list)
    for res in results:
        by_wl[res.workload].append(res)
    written = []
    slo_txt = f"TTFT {slo.ttft_s * 1000:g} ms, TPOT {slo.tpot_s * 1000:g} ms"
    for wl, systems in by_wl.items():
        written.append(plot_attainment(
            {s.label: [(r, x["attainment"]["both"]) for r, x in zip(s.rates, s.summaries,
                                                                    strict=True)]
             for s in systems},
            out / f"attainment_{wl}.png",
            f"{wl}: attainment of both SLOs ({slo_txt})",
            slo.attainment,
            {s.label: s.goodput.rate for s in systems},
        ))
        common = set(systems[0].rates).intersection(*(s.rates for s in systems[1:]))
        for rate in sorted(common):
            runs = {s.label: s.runs[s.rates.index(rate)] for s in systems}
            panels = {
                "TTFT (ms)": {k: [r.ttft_s * 1000 for r in v.records if r.ok and r.ttft_s]
                              for k, v in runs.items()},
                "TPOT (ms)": {k: [t * 1000 for r in v.records if (t := r.tpot_s) is not None]
                              for k, v in runs.items()},
            }
            written.append(plot_cdfs(
                panels, out / f"cdf_{wl}_rate{rate:g}.png", f"{wl} at {rate:g} req/s",
                {"TTFT (ms)": slo.ttft_s * 1000, "TPOT (ms)": slo.tpot_s * 1000},
            ))
    return written


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def goodput_text(g: Goodput, per: int | None = None) -> str:
    """Goodput (divided by ``per`` GPUs if given) as a table cell: '0 (<)' means below the
    lowest measured rate, '>=' a lower bound (every measured rate met the SLO)."""
    if g.status == "below_range":
        return "0 (<)"
    rate = g.rate / per if per else g.rate
    return f">={rate:.2f}" if g.status == "above_range" else f"{rate:.2f}"


def rows(results: list[SystemResult]) -> list[list[str]]:
    """Table rows: one per (workload, system, rate), goodput on the system's first row."""
    out = []
    for res in results:
        for i, (rate, s) in enumerate(zip(res.rates, res.summaries, strict=True)):
            out.append([
                res.workload if i == 0 else "",
                res.label if i == 0 else "",
                goodput_text(res.goodput) if i == 0 else "",
                (goodput_text(res.goodput, res.num_gpus) if res.num_gpus else "-")
                if i == 0 else "",
                f"{rate:g}",
                _fmt(s["attainment"]["both"] * 100),
                _fmt(s["ttft_ms"]["p50"]), _fmt(s["ttft_ms"]["p90"]), _fmt(s["ttft_ms"]["p99"]),
                _fmt(s["tpot_ms"]["p50"]), _fmt(s["tpot_ms"]["p90"]), _fmt(s["tpot_ms"]["p99"]),
                _fmt(s["slo_scale"], 2),
                f"{s['num_errors']}",
            ])
    return out


HEADERS = [
    "workload", "system", "goodput", "/GPU", "rate", "attain%",
    "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99", "scale", "err",
]


def markdown_table(results: list[SystemResult], slo: SLO) -> str:
    """The comparison as a Markdown table (for bench/RESULTS.md); latencies in ms."""
    lines = [
        f"SLO: TTFT <= {slo.ttft_s * 1000:g} ms and TPOT <= {slo.tpot_s * 1000:g} ms for "
        f">= {slo.attainment * 100:g}% of requests. goodput: req/s (/GPU: per GPU); rate: "
        "offered req/s; latencies in ms; scale: tightest common factor on both targets that "
        "keeps the attainment; err: failed requests.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    return "\n".join(lines) + "\n"


def print_table(results: list[SystemResult], slo: SLO) -> None:
    """The comparison as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SLO TTFT {slo.ttft_s * 1000:g} ms / TPOT {slo.tpot_s * 1000:g} ms "
                        f"@ {slo.attainment * 100:g}%; goodput and rate in req/s, "
                        "latencies in ms")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("workload", "system") else "right")
    for r in rows(results):
        table.add_row(*r)
    console = Console()
    console.width = max(console.width, 130)  # 14 numeric columns: wrap rather than truncate
    console.print(table)


def _write_json(results: list[SystemResult], slo: SLO, path: Path) -> Path:
    doc = {
        "schema": REPORT_SCHEMA,
        "slo": {"ttft_ms": slo.ttft_s * 1000, "tpot_ms": slo.tpot_s * 1000,
                "attainment": slo.attainment},
        "systems": [
            {
                "label": r.label,
                "workload": r.workload,
                "num_gpus": r.num_gpus,
                "goodput": {"rate": r.goodput.rate, "status": r.goodput.status,
                            "per_gpu": r.goodput_per_gpu},
                "runs": [{"rate": rate, "file": str(run.path), "summary": s}
                         for rate, s, run in zip(r.rates, r.summaries, r.runs, strict=True)],
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(clean_json(doc), indent=1))
    return path
