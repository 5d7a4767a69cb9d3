"""Filters: which workers may take a request at all."""

from __future__ import annotations

from splitserve.router.policy.base import Filter, RouteRequest
from splitserve.router.policy.plugins import register
from splitserve.router.workers import WorkerState


@register
class Healthy(Filter):
    """Workers whose last poll succeeded, that no request has found dead since, and that are
    not draining (their running sequences finish; nothing new goes there)."""

    name = "healthy"

    def apply(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        return [w for w in workers if w.healthy and not (w.load and w.load.draining)]


@register
class HasKVEndpoint(Filter):
    """Decode workers that told us where to send their KV (needed to pair with a prefill)."""

    name = "kv_endpoint"

    def apply(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        if not req.with_prefill:
            return workers
        return [w for w in workers if w.kv_endpoint]


@register
class HasRoom(Filter):
    """Decode workers with enough free KV blocks for the prompt (and the first token).

    Blocks claimed by requests this router sent since the last poll are subtracted, so a burst
    does not overfill a worker between polls. Workers with no load report yet pass.
    """

    name = "has_room"
    shortage = ("no_kv_room", "every decode worker is out of KV blocks for this prompt")

    def apply(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        out = []
        for w in workers:
            load = w.load
            if load is None or load.total_blocks == 0:
                out.append(w)
                continue
            bs = max(1, load.block_size)
            needed = -(-(req.num_prompt_tokens + 1) // bs)
            pending = -(-w.assigned_tokens_since_poll // bs)
            if load.free_blocks - pending >= needed:
                out.append(w)
        return out
