"""The routing interface: filters -> scorers -> weighted sum -> picker, per role.

A filter returns the workers that may serve the request; a scorer gives each survivor a value in
[0, 1]; a stage adds the weighted scores and its picker chooses one. Where the choice depends on
the pair (goodput: the KV transfer between the two is part of the first token's time), each role
only filters and a pair stage scores every (prefill, decode) pair and picks one. A policy is a
configuration of these (``spec.py``); each plugin is one small class, registered by name
(``plugins.py``). Every decision records how long each step took (``Decision.timings_us``, the
histogram ``splitserve_router_policy_step_seconds``), so slow plugins show up.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from splitserve.protocol.prefix_hash import prompt_block_hashes
from splitserve.router.config import SLO
from splitserve.router.policy.latency import LatencyModel
from splitserve.router.policy.prefix import PrefixIndex
from splitserve.router.policy.transfer import TransferEstimator
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

    def target_ms(self, slo: str) -> float:
        """The request's target for ``slo``: "ttft" or "tpot"."""
        return self.slo.ttft_ms if slo == "ttft" else self.slo.tpot_ms

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
    """No worker of a role is there to take the request: none registered, none healthy, none a
    filter that does not wait let through (503)."""

    def __init__(self, role: str, reason: str) -> None:
        super().__init__(f"no {role} worker available: {reason}")
        self.role, self.reason = role, reason


class Unservable(NoCandidate):
    """No worker there is could ever take the request, however long it waited (its prompt is
    larger than every decode worker's whole KV cache): refused at once (400), never queued.
    ``code`` names why (the error's code); ``message`` says it to the client."""

    def __init__(self, role: str, code: str, message: str) -> None:
        super().__init__(role, message)
        self.code, self.message = code, message


class SloUnattainable(Exception):
    """Workers exist, but none can take the request now: none can meet its targets, or
    (``Shortage``) none has room (queue, asked again at each poll round, then shed: 429)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Shortage(SloUnattainable):
    """Healthy workers exist, but a filter that waits (``Filter.waits``) let none through: what
    it needs frees up as running requests end (KV blocks), so the request waits like one whose
    targets cannot be met now, rather than failing while the shortage lasts."""


class PolicyContext:
    """What plugins of one policy share: the latency model, the prefix index (made when a
    plugin first asks, so policies that ignore prefixes do not hash prompts) and the per-pair
    transfer estimates."""

    def __init__(self, model: LatencyModel | None = None) -> None:
        self.model = model or LatencyModel()
        self.transfers = TransferEstimator(self.model)
        self._prefix: PrefixIndex | None = None

    @property
    def prefix(self) -> PrefixIndex:
        if self._prefix is None:
            self._prefix = PrefixIndex()
        return self._prefix

    @property
    def uses_prefix(self) -> bool:
        return self._prefix is not None


class Plugin:
    """One named step of a policy; ``create`` builds it from a configuration's arguments."""

    kind = "plugin"
    name = "plugin"

    @classmethod
    def create(cls, ctx: PolicyContext, **args: Any) -> Plugin:
        return cls(**args)


class Filter(Plugin, ABC):
    """Filters pass workers through; the first to let none through says what the request gets:
    ``waits``: a shortage that ends by itself (``Shortage``: queue, then shed with ``shortage``'s
    reason); ``shortage`` without ``waits``: what no waiting mends (``Unservable``: 400);
    neither: no worker to serve (``NoCandidate``: 503)."""

    kind = "filter"
    shortage: tuple[str, str] | None = None  # (reason: the shed or error code, message)
    waits = False

    @abstractmethod
    def apply(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        """The subset of ``workers`` that may serve ``req``."""


class Scorer(Plugin, ABC):
    kind = "scorer"

    @abstractmethod
    def score(self, req: RouteRequest, worker: WorkerState) -> float:
        """How good ``worker`` is for ``req``, in [0, 1] (higher is better)."""


class Picker(Plugin, ABC):
    kind = "picker"

    @abstractmethod
    def pick(self, scored: list[tuple[WorkerState, float]]) -> WorkerState:
        """Choose one of the (non-empty) scored candidates."""


class PairScorer(Plugin, ABC):
    """Scores (prefill, decode) pairs from a prediction in ms. With ``slo`` set ("ttft" or
    "tpot") the prediction must stay within the request's target of that name."""

    kind = "pair_scorer"
    slo: str | None = None

    @abstractmethod
    def predict_ms(self, req: RouteRequest, prefills: list[WorkerState | None],
                   decodes: list[WorkerState]) -> list[list[float]]:
        """The prediction for every pair: ``[i][j]`` for ``prefills[i]`` with ``decodes[j]``
        (``prefills`` is ``[None]`` when decode computes the prompt)."""

    @abstractmethod
    def score(self, req: RouteRequest, predicted_ms: float) -> float:
        """How good a pair with this prediction is, in [0, 1] (higher is better)."""

    def slack(self, req: RouteRequest, predicted_ms: float) -> float:
        """1 - predicted / target: < 0 misses the target (only for ``slo`` scorers)."""
        return 1.0 - predicted_ms / req.target_ms(self.slo)


# One pair scorer's predictions, with its weight: (scorer, weight, matrix [i][j]).
PairPredictions = tuple[PairScorer, float, list[list[float]]]


class PairPicker(Plugin, ABC):
    kind = "pair_picker"

    @abstractmethod
    def pick(self, req: RouteRequest, predictions: list[PairPredictions], shape: tuple[int, int]) -> tuple[int, int]:
        """``(i, j)``: the chosen pair of a ``shape[0]`` x ``shape[1]`` grid; raises
        SloUnattainable when no pair will do."""


@dataclass
class Stage:
    """Filters, weighted scorers and a picker for one role."""

    role: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker | None  # None in a policy with a pair stage: the role only filters

    def filter(self, req: RouteRequest, workers: list[WorkerState], timings: dict[str, float],
               queue: bool = False) -> list[WorkerState]:
        """The workers that pass every filter; when none does, the refusal of the filter that
        let none through (``Filter``): a shortage waits only when ``queue``, else NoCandidate."""
        if not workers:
            raise NoCandidate(self.role, "none registered")
        candidates = workers
        for f in self.filters:
            t0 = time.perf_counter()
            candidates = f.apply(req, candidates)
            timings[f"{self.role}.{f.name}"] = (time.perf_counter() - t0) * 1e6
            if not candidates:
                raise self._refusal(f, req, len(workers), queue)
        return candidates

    def _refusal(self, f: Filter, req: RouteRequest, n: int, queue: bool) -> Exception:
        filtered = f"all {n} filtered out by '{f.name}'"
        if f.shortage is None:
            return NoCandidate(self.role, filtered)
        reason, message = f.shortage
        if not f.waits:
            return Unservable(self.role, reason, f"{message} ({req.num_prompt_tokens} prompt tokens)")
        if queue:
            return Shortage(reason, message)
        return NoCandidate(self.role, f"{message} ({filtered})")

    def select(self, req: RouteRequest, workers: list[WorkerState], timings: dict[str, float],
               queue: bool = False) -> WorkerState:
        candidates = self.filter(req, workers, timings, queue)
        t0 = time.perf_counter()
        scored = [(w, sum(wt * s.score(req, w) for s, wt in self.scorers)) for w in candidates]
        timings[f"{self.role}.score"] = (time.perf_counter() - t0) * 1e6
        return self.picker.pick(scored)


@dataclass
class PairStage:
    """Weighted pair scorers and a pair picker: chooses prefill and decode together, after each
    role's filters, for rules that depend on the pair (time to first token includes the KV
    transfer between the two)."""

    scorers: list[tuple[PairScorer, float]]
    picker: PairPicker

    def select(self, req: RouteRequest, prefills: list[WorkerState | None], decodes: list[WorkerState],
               timings: dict[str, float]) -> tuple[WorkerState | None, WorkerState, dict[str, float]]:
        """The chosen pair and each ``slo`` scorer's prediction for it (by SLO name)."""
        ps = sorted(prefills, key=lambda w: w.url if w else "")
        ds = sorted(decodes, key=lambda w: w.url)
        predictions: list[PairPredictions] = []
        for scorer, weight in self.scorers:
            t0 = time.perf_counter()
            predictions.append((scorer, weight, scorer.predict_ms(req, ps, ds)))
            timings[f"pair.{scorer.name}"] = (time.perf_counter() - t0) * 1e6
        t0 = time.perf_counter()
        i, j = self.picker.pick(req, predictions, (len(ps), len(ds)))
        timings["pair.pick"] = (time.perf_counter() - t0) * 1e6
        return ps[i], ds[j], {s.slo: m[i][j] for s, _, m in predictions if s.slo}


class Policy(ABC):
    name = "policy"

    @abstractmethod
    def pick(self, req: RouteRequest, prefills: list[WorkerState], decodes: list[WorkerState]) -> Decision:
        """A (prefill, decode) pair for ``req``; raises NoCandidate or SloUnattainable."""

    def on_routed(self, req: RouteRequest, decision: Decision) -> None:
        """Called once the request is sent (e.g. to remember where a prefix went)."""
        return None

    def observe_transfer(self, prefill_url: str, decode_url: str, tokens: int, measured_ms: float | None) -> None:
        """A prefill worker's answer measured the KV transfer to ``decode_url`` (ms past its
        compute; None when it did not say)."""
        return None


class StagedPolicy(Policy):
    """A policy as configuration: each role's stage (filters, weighted scorers, picker), or, with
    a pair stage, each role's filters and then one choice of the pair.

    ``queue``: a filter's shortage that ends by itself (no decode worker has the KV blocks for
    the prompt now) waits (``Shortage``: the dispatcher queues, then sheds) rather than being
    refused at once (503). A pair picker's SloUnattainable always queues."""

    def __init__(self, name: str, prefill: Stage, decode: Stage, pair: PairStage | None = None,
                 ctx: PolicyContext | None = None, queue: bool = True) -> None:
        self.name, self.prefill_stage, self.decode_stage = name, prefill, decode
        self.pair_stage, self.ctx, self.queue = pair, ctx or PolicyContext(), queue

    @property
    def prefix(self) -> PrefixIndex:
        return self.ctx.prefix

    def pick(self, req: RouteRequest, prefills: list[WorkerState], decodes: list[WorkerState]) -> Decision:
        timings: dict[str, float] = {}
        if self.pair_stage is None:
            d = self.decode_stage.select(req, decodes, timings, self.queue)
            p = self.prefill_stage.select(req, prefills, timings, self.queue) if req.with_prefill else None
            return Decision(p, d, self.name, timings_us=timings)
        ds = self.decode_stage.filter(req, decodes, timings, self.queue)
        ps: list[WorkerState | None] = [None]
        if req.with_prefill:
            ps = list(self.prefill_stage.filter(req, prefills, timings, self.queue))
        p, d, predicted = self.pair_stage.select(req, ps, ds, timings)
        return Decision(p, d, self.name, predicted.get("ttft"), predicted.get("tpot"), timings)

    def on_routed(self, req: RouteRequest, decision: Decision) -> None:
        if decision.prefill is not None and self.ctx.uses_prefix:
            self.ctx.prefix.record(req.block_hashes, decision.prefill.url)

    def observe_transfer(self, prefill_url: str, decode_url: str, tokens: int, measured_ms: float | None) -> None:
        self.ctx.transfers.observe(prefill_url, decode_url, tokens, measured_ms)
