"""Where each prompt prefix went: the router's mirror of the prefill workers' prefix caches.

Blocks are hashed exactly like the engine's block manager does (chained blake2b of 16-token
blocks, never the block holding the last prompt token), so a hit here means the chosen prefill
worker most likely still holds those blocks. Bounded LRU; stale entries only cost a wrong guess.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict


def block_hash(prev_hash: bytes, token_ids: list[int]) -> bytes:
    """Same as ``splitserve.engine.block_manager.block_hash`` (a test checks they agree)."""
    h = hashlib.blake2b(prev_hash, digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """Chained hashes of the prompt's cacheable full blocks."""
    out, prev = [], b""
    for i in range((len(token_ids) - 1) // block_size):
        prev = block_hash(prev, token_ids[i * block_size : (i + 1) * block_size])
        out.append(prev)
    return out


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
