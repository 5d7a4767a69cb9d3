"""The routing interface: filters -> scorers -> weighted sum -> picker, per role.

A filter returns the workers that may serve the request; a scorer gives each survivor a value in
[0, 1]; a stage adds the weighted scores and its picker chooses one. A policy is a configuration
of stages (or, for goodput, a pair-wise rule); each plugin is one small class. Every decision
records how long each step took, so slow plugins show up.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property

from splitserve.engine.prefix_hash import prompt_block_hashes
from splitserve.router.config import SLO
from splitserve.router.workers import WorkerState


@dataclass
class RouteRequest:
    """What a policy may look at: the prompt, how long the answer may be, its targets."""

    prompt_token_ids: list[int]
    max_tokens: int
    slo: SLO = field(default_factory=SLO)
    block_size: int = 16
    with_prefill: bool = True  # False: decode computes the prompt (no prefill pool)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @cached_property
    def block_hashes(self) -> list[bytes]:
        return prompt_block_hashes(self.prompt_token_ids, self.block_size)


@dataclass
class Decision:
    prefill: WorkerState | None  # None: no prefill pool, decode computes the prompt itself
    decode: WorkerState
    policy: str
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    timings_us: dict[str, float] = field(default_factory=dict)


class NoCandidate(Exception):
    """No worker of a role passed the filters (503)."""

    def __init__(self, role: str, reason: str) -> None:
        super().__init__(f"no {role} worker available: {reason}")
        self.role, self.reason = role, reason


class SloUnattainable(Exception):
    """Workers exist, but none can meet the request's targets now (queue or shed, 429)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Filter(ABC):
    name = "filter"

    @abstractmethod
    def apply(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        """The subset of ``workers`` that may serve ``req``."""


class Scorer(ABC):
    name = "scorer"

    @abstractmethod
    def score(self, req: RouteRequest, worker: WorkerState) -> float:
        """How good ``worker`` is for ``req``, in [0, 1] (higher is better)."""


class Picker(ABC):
    @abstractmethod
    def pick(self, scored: list[tuple[WorkerState, float]]) -> WorkerState:
        """Choose one of the (non-empty) scored candidates."""


class RoundRobinPicker(Picker):
    """Ignores scores: cycles through candidates (by URL order, so it is stable as sets change)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, scored: list[tuple[WorkerState, float]]) -> WorkerState:
        ordered = sorted(scored, key=lambda ws: ws[0].url)
        return ordered[next(self._counter) % len(ordered)][0]


class MaxScorePicker(Picker):
    """Highest score; ties (within 1e-9) are broken round robin so equal workers share work."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, scored: list[tuple[WorkerState, float]]) -> WorkerState:
        best = max(s for _, s in scored)
        top = sorted((w for w, s in scored if s >= best - 1e-9), key=lambda w: w.url)
        return top[next(self._counter) % len(top)]


@dataclass
class Stage:
    """Filters, weighted scorers and a picker for one role."""

    role: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker

    def select(self, req: RouteRequest, workers: list[WorkerState], timings: dict[str, float]) -> WorkerState:
        if not workers:
            raise NoCandidate(self.role, "none registered")
        candidates = workers
        for f in self.filters:
            t0 = time.perf_counter()
            candidates = f.apply(req, candidates)
            timings[f"{self.role}.{f.name}"] = (time.perf_counter() - t0) * 1e6
            if not candidates:
                raise NoCandidate(self.role, f"all {len(workers)} filtered out by '{f.name}'")
        t0 = time.perf_counter()
        scored = [(w, sum(wt * s.score(req, w) for s, wt in self.scorers)) for w in candidates]
        timings[f"{self.role}.score"] = (time.perf_counter() - t0) * 1e6
        return self.picker.pick(scored)


class Policy(ABC):
    name = "policy"

    @abstractmethod
    def pick(self, req: RouteRequest, prefills: list[WorkerState], decodes: list[WorkerState]) -> Decision:
        """A (prefill, decode) pair for ``req``; raises NoCandidate or SloUnattainable."""

    def on_routed(self, req: RouteRequest, decision: Decision) -> None:
        """Called once the request is sent (e.g. to remember where a prefix went)."""
        return None


class StagedPolicy(Policy):
    """Chooses the prefill and the decode worker independently, one stage each."""

    def __init__(self, name: str, prefill: Stage, decode: Stage) -> None:
        self.name, self.prefill_stage, self.decode_stage = name, prefill, decode

    def pick(self, req: RouteRequest, prefills: list[WorkerState], decodes: list[WorkerState]) -> Decision:
        timings: dict[str, float] = {}
        d = self.decode_stage.select(req, decodes, timings)
        p = self.prefill_stage.select(req, prefills, timings) if req.with_prefill else None
        return Decision(p, d, self.name, timings_us=timings)
