"""A bounded table of per-peer records that forgets the peers left idle.

A long-lived worker in an autoscaling cluster meets peers that come and go: decode workers
scaled away, restarted at new addresses, prefill hosts replaced. What it keeps per peer (the
negotiated backend, failure counts, avoided backends, Prometheus label sets) must not outlive
them, so a record is dropped once unused for ``idle_s`` and, beyond ``max_entries`` peers, the
least recently used one goes first. ``on_drop`` runs for each record the table drops by itself
(expired or evicted; not for :meth:`pop`), e.g. to remove the peer's metric labels.

Not thread-safe: the owner guards it with its own lock (``on_drop`` runs under that lock).
Expiry is checked on every access, oldest first, so it costs O(1) per call amortised and needs
no timer thread: an owner that stops using the table entirely keeps its last records.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

IDLE_S = 1800.0  # the default: a peer unused for 30 minutes is forgotten
MAX_PEERS = 1024  # the default bound

K = TypeVar("K")
V = TypeVar("V")


class PeerTable(Generic[K, V]):
    """Records by peer key, least recently used first (module doc)."""

    def __init__(
        self,
        max_entries: int,
        idle_s: float,
        *,
        on_drop: Callable[[K, V], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or idle_s <= 0:
            raise ValueError(f"max_entries must be >= 1 and idle_s > 0, got {max_entries}, {idle_s}")
        self.max_entries = max_entries
        self.idle_s = idle_s
        self._on_drop = on_drop
        self._clock = clock
        self._entries: collections.OrderedDict[K, tuple[float, V]] = collections.OrderedDict()

    def get(self, key: K) -> V | None:
        """The record of ``key`` (marked used now), or None."""
        self.expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries[key] = (self._clock(), entry[1])
        self._entries.move_to_end(key)
        return entry[1]

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        """The record of ``key`` (marked used now), made by ``make()`` if there is none; making
        one beyond ``max_entries`` drops the least recently used record."""
        record = self.get(key)
        if record is None:
            record = make()
            while len(self._entries) >= self.max_entries:
                self._drop(*self._entries.popitem(last=False))
            self._entries[key] = (self._clock(), record)
        return record

    def pop(self, key: K) -> V | None:
        """Remove ``key``'s record and return it (``on_drop`` is not called)."""
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[1]

    def expire(self) -> None:
        """Drop the records unused for ``idle_s``."""
        horizon = self._clock() - self.idle_s
        while self._entries:
            key, (used, record) = next(iter(self._entries.items()))
            if used > horizon:
                return
            del self._entries[key]
            self._drop(key, (used, record))

    def items(self) -> Iterator[tuple[K, V]]:
        """Every live record, least recently used first (not marked used)."""
        self.expire()
        return iter([(key, record) for key, (_, record) in self._entries.items()])

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: K, entry: tuple[float, V]) -> None:
        if self._on_drop is not None:
            self._on_drop(key, entry[1])
