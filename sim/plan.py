"""``splitserve sim plan``: the best way to use N GPUs for a workload and SLO.

Every xPyD with x + y = N (x, y >= 1) and colocated N are simulated; each one's goodput (the
highest rate up to which at least the target fraction of requests meets both TTFT and TPOT,
``bench/stats.goodput``) is found by a rate search: from a throughput estimate, double (or halve)
the rate until the attainment crosses the target, then bisect ``refine`` times; the goodput is
interpolated from every simulated point, as ``bench report`` does over a measured sweep. The same
seeded request list is time-scaled to each rate (``bench/workloads.arrival_times``), so attainment
against rate is a deterministic curve and the search does not chase noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from splitserve.bench.stats import SLO, Goodput, attainment, goodput
from splitserve.router.policy.latency import LatencyModel
from splitserve.sim.cluster import Layout
from splitserve.sim.sweep import Load, SimSpec, sim_requests, simulate, with_layout

MAX_STEPS = 12  # doublings or halvings before giving up on finding a crossing


def candidates(num_gpus: int) -> list[Layout]:
    """Every xPyD with x + y = ``num_gpus``, then colocated ``num_gpus``."""
    if num_gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {num_gpus}")
    return [Layout(x, num_gpus - x) for x in range(1, num_gpus)] + [Layout(0, num_gpus)]


def rate_guess(latency: LatencyModel, load: Load, spec: SimSpec) -> float:
    """A throughput estimate to start the search from (req/s for the whole layout): each GPU
    prefills a mean prompt and decodes a mean answer in full batches."""
    reqs = load.request_set(1.0).requests
    mean_in = sum(r.prompt_tokens for r in reqs) / len(reqs)
    mean_out = sum(r.max_tokens for r in reqs) / len(reqs)
    batch = spec.shape.max_num_seqs
    per_token = latency.decode_step_ms(batch, batch * (mean_in + mean_out / 2)) / batch
    ms = latency.prefill_ms(mean_in) + mean_out * per_token
    return spec.layout.num_gpus * 1000.0 / max(ms, 1e-3)


@dataclass(frozen=True)
class PlanRow:
    """One layout's search: its goodput and the (rate, attainment) points it simulated."""

    layout: Layout
    goodput: Goodput
    points: tuple[tuple[float, float], ...]
    wall_s: float

    @property
    def per_gpu(self) -> float:
        return self.goodput.rate / self.layout.num_gpus


def search(spec: SimSpec, latency: LatencyModel, load: Load, slo: SLO, refine: int = 4,
           start: float | None = None) -> PlanRow:
    """The goodput of ``spec``'s layout (see the module docstring)."""
    t0 = time.perf_counter()
    points: dict[float, float] = {}

    def meets(rate: float) -> bool:
        if rate not in points:
            records, _ = simulate(spec, latency, sim_requests(load.request_set(rate)), slo, load.seed)
            points[rate] = attainment(records, slo).both
        return points[rate] >= slo.attainment

    rate = start or rate_guess(latency, load, spec) / 2
    lo, hi = None, None
    for _ in range(MAX_STEPS):
        if meets(rate):
            lo = rate
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo is not None:
                break
            rate /= 2
    if lo is not None and hi is not None:
        for _ in range(refine):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    pts = tuple(sorted(points.items()))
    return PlanRow(spec.layout, goodput(list(pts), slo.attainment), pts, time.perf_counter() - t0)


def plan(spec: SimSpec, latency: LatencyModel, load: Load, slo: SLO, num_gpus: int,
         refine: int = 4, jobs: int = 1, progress: Callable[[PlanRow], None] | None = None) -> list[PlanRow]:
    """Every candidate layout's row, best goodput first (colocated first among equals)."""
    specs = [with_layout(spec, lay) for lay in candidates(num_gpus)]
    rows: list[PlanRow] = []
    if jobs <= 1:
        for s in specs:
            rows.append(search(s, latency, load, slo, refine))
            if progress:
                progress(rows[-1])
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(search, s, latency, load, slo, refine) for s in specs]
            for f in futures:
                rows.append(f.result())
                if progress:
                    progress(rows[-1])
    return sorted(rows, key=lambda r: (-r.goodput.rate, not r.layout.colocated, r.layout.num_prefill))
