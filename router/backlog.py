"""How long the oldest request has waited for its first token, as the router sees it.

A request waits for its first token while it sits in the admission queue, in a prefill worker's
queue, in its prefill and in its KV transfer. The planner takes that age as an input (a planner
whose estimate stayed at hundreds of milliseconds while clients waited minutes in queues is
what it prevents); every request passes the router, so counting here covers the router's queue
and the workers' alike without asking the workers.
"""

from __future__ import annotations

import itertools


class AwaitingFirstToken:
    """Requests between arrival and first token: ``add`` at arrival, ``remove`` at the first
    token or the end (either, twice is harmless)."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._arrivals: dict[int, float] = {}  # key -> arrival (time.monotonic)

    def add(self, arrival: float) -> int:
        key = next(self._ids)
        self._arrivals[key] = arrival
        return key

    def remove(self, key: int) -> None:
        self._arrivals.pop(key, None)

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest waiting request has waited (0 when none waits)."""
        return max(0.0, now - min(self._arrivals.values())) if self._arrivals else 0.0
