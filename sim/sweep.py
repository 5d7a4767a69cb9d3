"""One deployment over a list of rates, simulated: the same requests ``splitserve bench`` would
send (same workload, seed, arrival process, length caps, requests per rate), the same run files
(``bench/results.py``'s schema, with a ``simulated`` entry saying so) and the same report
(``bench/report.py``: table, report.json, attainment and CDF plots), so a simulated sweep and a
measured one can be put in one report.
"""

from __future__ import annotations

import heapq
import math
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
    """A ``Simulation`` watch that stops the run once so many requests surely miss ``slo`` that
    its attainment can no longer reach ``slo.attainment``; ``bound`` is then an upper bound of
    that attainment, below the target.

    A request surely misses once it failed, or its first token came after the TTFT target, or
    it finished and ``bench/stats.meets`` says so (``stats.surely_misses``); and, at each call
    (time ``now_ms``), once the TTFT target has passed without a first token, or its first token
    plus ``max_tokens - 1`` TPOT targets have passed unfinished (it cannot finish with more
    tokens, so its TPOT can only come out larger). Each deadline is the value that the record
    would hold, computed as the simulation and ``bench/stats`` compute it, so floating point
    cannot make a request that meets its targets count as a miss."""

    def __init__(self, slo: SLO, requests: Sequence[SimRequest]) -> None:
        self.slo, self.num_requests = slo, len(requests)
        self.missed: set[int] = set()
        self._by_arrival = sorted((r.arrival_s, r.index) for r in requests)
        self._next = 0  # requests before it in _by_arrival are past their TTFT target
        self._started: set[int] = set()  # first token left
        self._ended: set[int] = set()
        self._tpot_due: list[tuple[float, int]] = []  # heap: (ms from which unfinished misses, index)

    @property
    def bound(self) -> float:
        """The attainment if every request not yet missed met the SLO (stats.attainment's sum)."""
        return (self.num_requests - len(self.missed)) / self.num_requests

    def __call__(self, record: RequestRecord, now_ms: float | None) -> bool:
        i = record.index
        if record.ttft_s is not None:
            self._started.add(i)
        if record.e2e_s is not None:
            self._ended.add(i)
        if i not in self.missed:
            if surely_misses(record, self.slo):
                self.missed.add(i)
            elif record.output_tokens == 1 and record.e2e_s is None and record.max_tokens >= 2:
                heapq.heappush(self._tpot_due, (self._tpot_due_ms(record), i))
        if now_ms is not None:
            self._sweep(now_ms)
        return self.bound < self.slo.attainment

    def _sweep(self, now_ms: float) -> None:
        arrivals, ttft = self._by_arrival, self.slo.ttft_s
        while self._next < len(arrivals) and now_ms / 1000 - arrivals[self._next][0] > ttft:
            if arrivals[self._next][1] not in self._started:
                self.missed.add(arrivals[self._next][1])
            self._next += 1
        due = self._tpot_due
        while due and due[0][0] <= now_ms:
            _, i = heapq.heappop(due)
            if i not in self._ended:
                self.missed.add(i)

    def _tpot_due_ms(self, r: RequestRecord) -> float:
        """The first time (ms) at which the TPOT of ``r`` finishing then is over the target."""
        sent, ttft, gaps, tpot = r.sent_s, r.ttft_s, r.max_tokens - 1, self.slo.tpot_s
        t = (sent + ttft + tpot * gaps) * 1000
        while not max(0.0, (t / 1000 - sent) - ttft) / gaps > tpot:
            t = math.nextafter(t, math.inf)
        return t


def simulate(spec: SimSpec, latency: LatencyModel, requests: Sequence[SimRequest], slo: SLO,
             seed: int = 0, stop_early: bool = False) -> tuple[list[RequestRecord], dict]:
    """Records of one simulated run and what it cost to simulate. With ``stop_early`` the run
    stops once its attainment surely misses ``slo.attainment`` (``MissCount``); the cost then
    says ``stopped`` and, when it stopped, ``attainment_bound``."""
    t0 = time.perf_counter()
    watch = MissCount(slo, requests) if stop_early and requests else None
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
