"""Where each prompt prefix went: the router's mirror of the prefill workers' prefix caches.

Blocks are hashed by the engine's own definition (``protocol/prefix_hash.py``: chained blake2b of
blocks, never the block holding the last prompt token), so a hit here means the chosen prefill
worker most likely still holds those blocks. Bounded LRU; stale entries only cost a wrong guess.
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._where: OrderedDict[bytes, set[str]] = OrderedDict()

    def matched_blocks(self, hashes: list[bytes], url: str) -> int:
        """How many leading blocks of the prompt ``url`` was last seen holding."""
        n = 0
        for h in hashes:
            urls = self._where.get(h)
            if urls is None or url not in urls:
                break
            n += 1
        return n

    def record(self, hashes: list[bytes], url: str) -> None:
        for h in hashes:
            urls = self._where.get(h)
            if urls is None:
                self._where[h] = {url}
            else:
                urls.add(url)
                self._where.move_to_end(h)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)
