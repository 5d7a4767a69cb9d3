"""Chained block hashes of token ids: the one definition the engine's prefix cache and the
router's prefix-aware policy share, so that a router hit names blocks a worker really holds.

Block i's hash is blake2b-128 over (block i-1's hash, block i's token ids as little-endian
uint32), so equal hashes mean equal whole prefixes, not only equal blocks. Torch-free: the router
imports it without loading torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence


def iter_block_hashes(token_ids: Sequence[int], block_size: int, prev: bytes = b"") -> Iterator[bytes]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block has none),
    continuing the chain from ``prev`` (the hash of the block before, ``b""`` at the start);
    lazily, so a prefix-cache lookup that misses early stops hashing there.

    The tokens are packed once and each block hashes a slice of that buffer: about 1 us a block,
    where packing block by block cost several (commit hashes every block a prefill filled)."""
    n = len(token_ids) // block_size
    data = struct.pack(f"<{n * block_size}I", *token_ids[: n * block_size])
    step = 4 * block_size
    for i in range(n):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(data[i * step : (i + 1) * step])
        prev = h.digest()
        yield prev


def iter_prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> Iterator[bytes]:
    """Hashes of the prompt blocks a prefix cache can serve: every full block except one that
    holds the last prompt token (that token is always computed, to produce the first logits)."""
    cacheable = (len(token_ids) - 1) // block_size
    return iter_block_hashes(token_ids[: cacheable * block_size], block_size)


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """``iter_prompt_block_hashes`` as a list (the router keeps them per request)."""
    return list(iter_prompt_block_hashes(token_ids, block_size))
