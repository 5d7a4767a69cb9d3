"""One deployment over a list of rates, simulated: the same requests ``splitserve bench`` would
send (same workload, seed, arrival process, length caps, requests per rate), the same run files
(``bench/results.py``'s schema, with a ``simulated`` entry saying so) and the same report
(``bench/report.py``: table, report.json, attainment and CDF plots), so a simulated sweep and a
measured one can be put in one report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from splitserve.bench.records import RequestRecord
from splitserve.bench.results import run_path, write_run
from splitserve.bench.runner import requests_at
from splitserve.bench.stats import SLO, summarize, surely_misses
from splitserve.bench.workloads import LengthCaps, RequestSet, build_requests
from splitserve.router.config import SLO as RouterSLO
from splitserve.router.policy.latency import LatencyModel
from splitserve.sim.cluster import Layout, SimConfig, SimRequest, Simulation
from splitserve.sim.runner import EngineShape


@dataclass(frozen=True)
class Load:
    """Which requests each rate sends, as ``splitserve bench run/sweep`` chooses them."""

    workload: str
    seed: int = 0
    cv: float = 1.0
    caps: LengthCaps = field(default_factory=LengthCaps)
    num_requests: int = 200
    duration_s: float | None = None
    max_requests: int = 1000

    def request_set(self, rate: float) -> RequestSet:
        n = requests_at(rate, self.duration_s, self.num_requests, self.max_requests)
        return build_requests(self.workload, n, rate, self.seed, self.cv, self.caps, with_text=False)


def sim_requests(request_set: RequestSet) -> list[SimRequest]:
    return [SimRequest(r.index, r.arrival_s, r.prompt_tokens, r.max_tokens, r.prefix_of)
            for r in request_set.requests]


def records_span(records: Sequence[RequestRecord]) -> float:
    """First send to last token, seconds (what the load generator reports as run_seconds)."""
    ends = [r.sent_s + r.e2e_s for r in records if r.sent_s is not None and r.e2e_s is not None]
    starts = [r.sent_s for r in records if r.sent_s is not None]
    return max(ends) - min(starts) if ends and starts else 0.0


@dataclass(frozen=True)
class SimSpec:
    """A simulated deployment and how its router and workers are set up."""

    layout: Layout
    shape: EngineShape
    policy: str = "least_loaded"
    overhead_ms: float = 0.0
    max_queue_ms: float = 500.0

    def config(self, slo: SLO) -> SimConfig:
        return SimConfig(self.layout, self.shape, self.policy,
                         RouterSLO(slo.ttft_s * 1000, slo.tpot_s * 1000),
                         self.max_queue_ms, self.overhead_ms)


class MissCount:
    """A ``Simulation`` watch that stops the run once so many requests surely miss ``slo``
    (``bench/stats.surely_misses``) that its attainment can no longer reach ``slo.attainment``;
    ``bound`` is then an upper bound of that attainment, below the target."""

    def __init__(self, slo: SLO, num_requests: int) -> None:
        self.slo, self.num_requests = slo, num_requests
        self.missed: set[int] = set()

    @property
    def bound(self) -> float:
        """The attainment if every request not yet missed met the SLO (stats.attainment's sum)."""
        return (self.num_requests - len(self.missed)) / self.num_requests

    def __call__(self, record: RequestRecord) -> bool:
        if record.index not in self.missed and surely_misses(record, self.slo):
            self.missed.add(record.index)
            return self.bound < self.slo.attainment
        return False


def simulate(spec: SimSpec, latency: LatencyModel, requests: Sequence[SimRequest], slo: SLO,
             seed: int = 0, stop_early: bool = False) -> tuple[list[RequestRecord], dict]:
    """Records of one simulated run and what it cost to simulate. With ``stop_early`` the run
    stops once its attainment surely misses ``slo.attainment`` (``MissCount``); the cost then
    says ``stopped`` and, when it stopped, ``attainment_bound``."""
    t0 = time.perf_counter()
    watch = MissCount(slo, len(requests)) if stop_early and requests else None
    sim = Simulation(spec.config(slo), latency, requests, seed, watch)
    records = sim.run()
    cost = {"wall_s": time.perf_counter() - t0, "steps": sim.steps}
    if watch is not None:
        cost["stopped"] = sim.stopped
        if sim.stopped:
            cost["attainment_bound"] = watch.bound
    return records, cost


def run_rate(spec: SimSpec, latency: LatencyModel, load: Load, rate: float, slo: SLO,
             out_dir: str | Path, label: str | None = None,
             latency_source: str | None = None) -> Path:
    """Simulate one rate and write its run file; returns the path."""
    reqs = load.request_set(rate)
    records, cost = simulate(spec, latency, sim_requests(reqs), slo, load.seed)
    label = label or spec.layout.label
    return write_run(run_path(out_dir, label, load.workload, rate), {
        "label": label,
        "server": {"base_url": "sim://", "model": "(simulated)", "ignore_eos": True,
                   "extra_body": {}, "headers": []},
        "num_gpus": spec.layout.num_gpus,
        "workload": reqs.meta(),
        "rate": rate,
        "run_seconds": records_span(records),
        "max_send_lag_s": 0.0,
        "summary": summarize(records, slo, records_span(records)),
        "requests": [r.to_dict() for r in records],
        "simulated": {
            "layout": spec.layout.label, "policy": spec.policy, "overhead_ms": spec.overhead_ms,
            "engine": {"num_blocks": spec.shape.num_blocks, "block_size": spec.shape.block_size,
                       "max_num_seqs": spec.shape.max_num_seqs,
                       "max_num_batched_tokens": spec.shape.max_num_batched_tokens},
            "latency_model": latency_source, **cost,
        },
    })


def with_layout(spec: SimSpec, layout: Layout) -> SimSpec:
    return replace(spec, layout=layout)
