"""Scorers: how good each worker is for a request, in [0, 1]."""

from __future__ import annotations

from typing import Any

from splitserve.router.policy.base import PolicyContext, RouteRequest, Scorer
from splitserve.router.policy.plugins import register
from splitserve.router.policy.prefix import PrefixIndex
from splitserve.router.workers import WorkerState


@register
class PrefillQueueScorer(Scorer):
    """Fewer queued prompt tokens is better: 1 / (1 + queued / scale)."""

    name = "prefill_queue"

    def __init__(self, scale_tokens: float = 2048.0) -> None:
        self.scale = scale_tokens

    def score(self, req: RouteRequest, worker: WorkerState) -> float:
        load = worker.load
        queued = worker.assigned_tokens_since_poll + (load.queued_prompt_tokens if load else 0)
        waiting = worker.assigned_since_poll + (load.waiting if load else 0)
        return 1.0 / (1.0 + queued / self.scale + waiting)


@register
class DecodeLoadScorer(Scorer):
    """Fewer running sequences and more free KV blocks is better (equal weights)."""

    name = "decode_load"

    def score(self, req: RouteRequest, worker: WorkerState) -> float:
        load = worker.load
        seqs = worker.assigned_since_poll + (load.running + load.waiting if load else 0)
        free = load.free_fraction if load and load.total_blocks else 1.0
        return 0.5 / (1.0 + seqs) + 0.5 * free


@register
class PrefixHitScorer(Scorer):
    """Fraction of the prompt's cacheable blocks the worker probably holds."""

    name = "prefix_hit"

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index

    @classmethod
    def create(cls, ctx: PolicyContext, **args: Any) -> PrefixHitScorer:
        return cls(ctx.prefix, **args)

    def score(self, req: RouteRequest, worker: WorkerState) -> float:
        hashes = req.block_hashes
        if not hashes:
            return 0.0
        return self.index.matched_blocks(hashes, worker.url) / len(hashes)
