"""``splitserve sim plan``: the best way to use N GPUs for a workload and SLO.

Every xPyD with x + y = N (x, y >= 1) and colocated N are simulated; each one's goodput (the
highest rate up to which at least the target fraction of requests meets both TTFT and TPOT,
``bench/stats.goodput``) is found by a rate search: from a throughput estimate, double (or halve)
the rate until the attainment crosses the target, then bisect ``refine`` times; the goodput is
interpolated from every simulated point, as ``bench report`` does over a measured sweep. The same
seeded request list is time-scaled to each rate (``bench/workloads.arrival_times``), so attainment
against rate is a deterministic curve and the search does not chase noise.

Most rates only need pass or fail, so a simulated run stops as soon as so many of its requests
have surely missed that its attainment cannot reach the target (``sweep.MissCount``); its point
is then that upper bound, below the target, and the decisions of the search are the ones a full
run gives (a run that meets the target never stops). The one failing point the interpolation
reads (the first one above the lowest passing rates) is simulated in full when its run stopped,
so the goodput is the one full runs give; the last bisection step runs in full from the start
(if it fails, it is that point; if it passes, it ran in full anyway).

The searches of several layouts (and of several plans, ``plan_many``) share one process pool:
each search is a generator of the rates it needs, advanced as their results come back, so every
core works while any search has a rate to simulate.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from splitserve.bench.stats import SLO, Goodput, attainment, goodput
from splitserve.router.policy.latency import LatencyModel
from splitserve.sim.cluster import Layout
from splitserve.sim.sweep import Load, SimSpec, sim_requests, simulate, with_layout

MAX_STEPS = 12  # doublings or halvings before giving up on finding a crossing

Outcome = tuple[float, bool, float]  # a probe's attainment (or its bound), whether it stopped, wall s


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
    """One layout's search: its goodput and the (rate, attainment) points it simulated;
    ``bounded`` holds the rates whose run stopped early (their attainment is an upper bound,
    below the target); ``wall_s`` is the seconds its simulations took, summed."""

    layout: Layout
    goodput: Goodput
    points: tuple[tuple[float, float], ...]
    wall_s: float
    bounded: tuple[float, ...] = ()

    @property
    def per_gpu(self) -> float:
        return self.goodput.rate / self.layout.num_gpus

    def to_dict(self) -> dict:
        """The row as plan.json and the prediction grid store it."""
        return {"layout": self.layout.label, "num_gpus": self.layout.num_gpus,
                "goodput": self.goodput.rate, "status": self.goodput.status,
                "per_gpu": self.per_gpu, "points": self.points, "bounded": self.bounded,
                "simulation_s": self.wall_s}


@dataclass(frozen=True)
class PlanJob:
    """One plan to make: every candidate layout of ``num_gpus`` GPUs (``spec``'s layout is
    replaced by each) under ``load`` and ``slo``."""

    spec: SimSpec
    latency: LatencyModel
    load: Load
    slo: SLO
    num_gpus: int
    refine: int = 4


@dataclass(frozen=True)
class Probe:
    """A simulation that a search asks for: ``rate``, stopped early once it surely misses the
    target unless ``exact``."""

    rate: float
    exact: bool = False


def simulate_probe(spec: SimSpec, latency: LatencyModel, load: Load, slo: SLO,
                   probe: Probe) -> Outcome:
    """One probe's simulation, in whichever process runs it."""
    requests = sim_requests(load.request_set(probe.rate))
    records, cost = simulate(spec, latency, requests, slo, load.seed, stop_early=not probe.exact)
    if cost.get("stopped"):
        return cost["attainment_bound"], True, cost["wall_s"]
    return attainment(records, slo).both, False, cost["wall_s"]


class _Search:
    """One layout's rate search as a generator of ``Probe`` s (see the module docstring)."""

    def __init__(self, spec: SimSpec, target: float, start: float, refine: int) -> None:
        self.spec, self.target, self.start, self.refine = spec, target, start, refine
        self.points: dict[float, float] = {}
        self.bounded: set[float] = set()
        self.wall_s = 0.0

    def _measure(self, probe: Probe) -> Generator[Probe, Outcome, None]:
        att, stopped, wall = yield probe
        self.points[probe.rate], self.wall_s = att, self.wall_s + wall
        (self.bounded.add if stopped else self.bounded.discard)(probe.rate)

    def _meets(self, rate: float, exact: bool = False) -> Generator[Probe, Outcome, bool]:
        if rate not in self.points:
            yield from self._measure(Probe(rate, exact))
        return self.points[rate] >= self.target

    def after(self, probe: Probe, meets: bool) -> Probe | None:
        """The probe this search will ask for next if ``probe``, the one it waits for, meets
        the target (or not): its rule replayed over its points (for speculation)."""
        twin = _Search(self.spec, self.target, self.start, self.refine)
        twin.points = {**self.points, probe.rate: self.target if meets else -1.0}
        twin.bounded = self.bounded | ({probe.rate} if not (meets or probe.exact) else set())
        try:
            return next(twin.steps())
        except StopIteration:
            return None

    def steps(self) -> Generator[Probe, Outcome, PlanRow]:
        rate, lo, hi = self.start, None, None
        for _ in range(MAX_STEPS):
            if (yield from self._meets(rate)):
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
            for step in range(self.refine):
                mid = (lo + hi) / 2
                # the last mid, when it fails, is the point the interpolation reads: run it in
                # full (when it passes, it runs in full anyway)
                lo, hi = (mid, hi) if (yield from self._meets(mid, step == self.refine - 1)) else (lo, mid)
        pts = sorted(self.points.items())
        # goodput reads the first failing point above the lowest passing ones: make it exact
        first_fail = next((r for r, a in pts if a < self.target), None)
        if pts[0][1] >= self.target and first_fail in self.bounded:
            yield from self._measure(Probe(first_fail, exact=True))
            pts = sorted(self.points.items())
        return PlanRow(self.spec.layout, goodput(pts, self.target), tuple(pts), self.wall_s,
                       tuple(sorted(self.bounded)))


class _Inline:
    """An executor that runs each call at once, in this process (``jobs`` <= 1)."""

    def submit(self, fn: Callable, *args: object) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Nothing runs after a call returns."""


def search(spec: SimSpec, latency: LatencyModel, load: Load, slo: SLO, refine: int = 4,
           start: float | None = None) -> PlanRow:
    """The goodput of ``spec``'s layout (see the module docstring), in this process."""
    s = _Search(spec, slo.attainment, start or rate_guess(latency, load, spec) / 2, refine)
    steps = s.steps()
    try:
        probe = next(steps)
        while True:
            probe = steps.send(simulate_probe(spec, latency, load, slo, probe))
    except StopIteration as done:
        return done.value


@dataclass
class _Live:
    """A search under way: its generator and the probe it waits for."""

    k: int
    search: _Search
    steps: Generator[Probe, Outcome, PlanRow]
    probe: Probe | None = None


def plan_many(jobs_: Sequence[PlanJob], jobs: int = 1,
              progress: Callable[[int, PlanRow], None] | None = None) -> Iterator[tuple[int, list[PlanRow]]]:
    """Make every plan of ``jobs_`` with ``jobs`` processes shared by all their searches; yields
    (index in ``jobs_``, its rows as ``plan`` returns them) as each plan completes, and calls
    ``progress(index, row)`` as each layout's search completes. Searches start in order, at
    most ``jobs`` at a time (each keeps one process busy), so plans complete in order too.

    A process left idle (fewer searches under way than processes: a small plan, or the last
    searches) simulates what a search under way will ask for next if its pending rate passes,
    and if it fails (``_Search.after``); the search takes that result when it asks, and the
    other one is dropped. The answers are the same: a probe's result does not depend on when
    or where it runs."""
    searches = [(i, job, with_layout(job.spec, lay)) for i, job in enumerate(jobs_)
                for lay in candidates(job.num_gpus)]
    rows: dict[int, list[PlanRow]] = {i: [] for i in range(len(jobs_))}
    left = {i: len(candidates(job.num_gpus)) for i, job in enumerate(jobs_)}
    running: dict[Future, _Live] = {}  # the probe each search under way waits for
    spare: dict[tuple[int, Probe], Future] = {}  # speculative probes
    dropped: set[Future] = set()  # speculative probes no search will ask for, still running
    unstarted, finished = iter(range(len(searches))), []
    pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else _Inline()

    def submit(k: int, probe: Probe) -> Future:
        _, job, spec = searches[k]
        return pool.submit(simulate_probe, spec, job.latency, job.load, job.slo, probe)

    def advance(live: _Live, outcome: Outcome | None) -> None:
        try:
            live.probe = live.steps.send(outcome)
        except StopIteration as done:
            live.probe = None
            i = searches[live.k][0]
            rows[i].append(done.value)
            if progress:
                progress(i, done.value)
            left[i] -= 1
            if not left[i]:
                finished.append(i)
        else:
            running[spare.pop((live.k, live.probe), None) or submit(live.k, live.probe)] = live
        for key in [key for key in spare if key[0] == live.k]:  # the branch not taken
            f = spare.pop(key)
            if not f.cancel():
                dropped.add(f)

    def start_more() -> None:
        while len(running) < max(jobs, 1) and (k := next(unstarted, None)) is not None:
            _, job, spec = searches[k]
            start = rate_guess(job.latency, job.load, spec) / 2
            search = _Search(spec, job.slo.attainment, start, job.refine)
            advance(_Live(k, search, search.steps()), None)

    def busy() -> list[Future]:
        dropped.difference_update([f for f in dropped if f.done()])
        return [f for f in (*running, *spare.values(), *dropped) if not f.done()]

    def speculate() -> None:
        idle = jobs - len(busy()) if jobs > 1 else 0
        for live in list(running.values()):
            for meets in (True, False):
                if idle <= 0:
                    return
                probe = live.search.after(live.probe, meets)
                if probe is not None and (live.k, probe) not in spare:
                    spare[(live.k, probe)] = submit(live.k, probe)
                    idle -= 1

    try:
        start_more()
        while running:
            speculate()
            wait([*running, *busy()], return_when=FIRST_COMPLETED)
            for f in [f for f in running if f.done()]:
                advance(running.pop(f), f.result())
            start_more()
            while finished:
                i = finished.pop(0)
                yield i, _ranked(rows[i])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ranked(rows: list[PlanRow]) -> list[PlanRow]:
    """Best goodput first (colocated first among equals)."""
    return sorted(rows, key=lambda r: (-r.goodput.rate, not r.layout.colocated, r.layout.num_prefill))


def plan(spec: SimSpec, latency: LatencyModel, load: Load, slo: SLO, num_gpus: int,
         refine: int = 4, jobs: int = 1, progress: Callable[[PlanRow], None] | None = None) -> list[PlanRow]:
    """Every candidate layout's row, best goodput first (colocated first among equals)."""
    job = PlanJob(spec, latency, load, slo, num_gpus, refine)
    [(_, rows)] = plan_many([job], jobs, progress and (lambda _, row: progress(row)))
    return rows
