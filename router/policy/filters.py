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


def blocks_needed(req: RouteRequest, block_size: int) -> int:
    """KV blocks the prompt and its first token take on a decode worker."""
    return -(-(req.num_prompt_tokens + 1) // max(1, block_size))


@register
class KVCapacity(Filter):
    """Decode workers whose whole KV cache holds the prompt (and the first token), however full
    it is now. A prompt no worker can ever hold fails at once (400) instead of waiting for room
    that will never come; put it before ``healthy``, so that a worker down for a while still
    counts as one that could. Workers with no load report yet pass."""

    name = "kv_capacity"
    shortage = ("prompt_exceeds_kv_cache", "the prompt is larger than every decode worker's whole KV cache")

    def apply(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        return [w for w in workers if w.load is None or w.load.total_blocks == 0
                or w.load.total_blocks >= blocks_needed(req, w.load.block_size)]


@register
class HasRoom(Filter):
    """Decode workers with enough free KV blocks for the prompt (and the first token).

    Blocks claimed by requests this router sent since the last poll are subtracted, so a burst
    does not overfill a worker between polls. Workers with no load report yet pass. Blocks free
    as running requests end, so when no worker has room the request waits (``waits``) for a
    poll that shows some; ``kv_capacity`` before it refuses the prompts that never fit.
    """

    name = "has_room"
    shortage = ("no_kv_room", "every decode worker is out of KV blocks for this prompt")
    waits = True

    def apply(self, req: RouteRequest, workers: list[WorkerState]) -> list[WorkerState]:
        out = []
        for w in workers:
            load = w.load
            if load is None or load.total_blocks == 0:
                out.append(w)
                continue
            pending = -(-w.assigned_tokens_since_poll // max(1, load.block_size))
            if load.free_blocks - pending >= blocks_needed(req, load.block_size):
                out.append(w)
        return out
