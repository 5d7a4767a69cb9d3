"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

Two figures, the ones the goodput argument rests on: SLO attainment against offered rate
(one line per system; the goodput is where a line crosses the target), and latency CDFs of
TTFT and TPOT at one rate (one line per system; the SLO as a vertical line). A third sums up
many of those: goodput per GPU against the SLO scale, disaggregated against colocated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    """matplotlib's pyplot on the Agg backend (imported late: it is slow and optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attainment(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str,
    target: float = 0.9,
    goodputs: Mapping[str, float] | None = None,
) -> Path:
    """Attainment (0-1) vs rate, one line per system, the target as a dashed line.

    ``series``: label -> [(rate req/s, attainment)]; ``goodputs``: label -> rate, marked on
    the target line when > 0.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        pts = sorted(points)
        line = ax.plot([r for r, _ in pts], [a * 100 for _, a in pts], marker="o", label=label)
        if goodputs and goodputs.get(label, 0) > 0:
            ax.plot([goodputs[label]], [target * 100], marker="x", markersize=10,
                    color=line[0].get_color())
    ax.axhline(target * 100, linestyle="--", color="grey", linewidth=1,
               label=f"target {target * 100:g}%")
    rates = [r for pts in series.values() for r, _ in pts]
    if rates and min(rates) > 0 and max(rates) / min(rates) >= 8:
        ax.set_xscale("log")  # doubling sweeps (1, 2, 4, ... req/s) read evenly
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def plot_cdfs(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    title: str,
    slo_ms: Mapping[str, float] | None = None,
) -> Path:
    """Side-by-side empirical CDFs, one panel per metric (e.g. "TTFT (ms)", "TPOT (ms)").

    ``panels``: metric -> (label -> values in ms); ``slo_ms``: metric -> target line.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (metric, by_label) in zip(axes[0], panels.items(), strict=True):
        for label, values in by_label.items():
            xs = sorted(values)
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=label)
        if slo_ms and metric in slo_ms:
            ax.axvline(slo_ms[metric], linestyle="--", color="grey", linewidth=1, label="SLO")
        ax.set_xlabel(metric)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, plt, path)


def plot_goodput_vs_scale(
    lines: Mapping[int, Mapping[str, Sequence[tuple[float, float]]]],
    path: str | Path,
    title: str,
) -> Path:
    """Goodput per GPU against the SLO scale (both targets times the scale; log axis, tight to
    loose): one colour per GPU count, one line style per system (the first solid, the next
    dashed, ...).

    ``lines``: GPU count -> (system, e.g. "best split" or "colocated" -> [(scale, req/s per GPU)]).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ("-", "--", ":", "-.")
    for n, (gpus, systems) in enumerate(sorted(lines.items())):
        color = f"C{n}"
        for style, (system, points) in zip(styles, systems.items(), strict=False):
            pts = sorted(points)
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=color,
                    label=f"{system}, {gpus} GPUs")
    ax.set_xscale("log", base=2)
    scales = sorted({x for systems in lines.values() for pts in systems.values() for x, _ in pts})
    ax.set_xticks(scales, [f"{x:g}" for x in scales])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("SLO scale (x the workload's TTFT and TPOT targets; tight to loose)")
    ax.set_ylabel("goodput per GPU (requests/s)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
