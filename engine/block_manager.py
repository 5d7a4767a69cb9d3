"""Paged KV-cache block allocation with reference counts and prefix reuse.

Every full block of a sequence gets a chained hash (the hash of the previous block plus this
block's tokens), so two prompts that share a prefix share its blocks: a hash hit also checks the
block's tokens, so a hash collision can never hand out the wrong cache. A block is hashed only
once its KV has been computed (``commit`` after each step), so no sequence can ever reuse a block
whose contents are still to come. A freed block keeps its contents and hash until it is handed out
again, which is what makes a later hit possible.

Single-threaded by design: only the engine thread calls it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from splitserve.engine.sequence import Sequence
from splitserve.protocol.prefix_hash import iter_block_hashes, iter_prompt_block_hashes


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: list[int] = field(default_factory=list)


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation cannot be served; callers check ``can_allocate`` first."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in least-recently-freed order; values unused (an ordered set).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _take(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        del self._free[block_id]
        block.ref_count = 1
        return block

    def _take_fresh(self) -> Block:
        if not self._free:
            raise NoFreeBlocks("no free KV-cache blocks")
        block = self._take(next(iter(self._free)))
        if block.hash is not None and self._by_hash.get(block.hash) == block.block_id:
            del self._by_hash[block.hash]
        block.hash, block.token_ids = None, []
        return block

    def _register(self, block: Block, h: bytes, token_ids: list[int]) -> None:
        block.hash, block.token_ids = h, list(token_ids)
        self._by_hash[h] = block.block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks matching the prompt's leading full blocks (never the whole prompt:
        the last prompt token must be computed to produce logits)."""
        bs, hits = self.block_size, []
        for i, h in enumerate(iter_prompt_block_hashes(seq.prompt_token_ids, bs)):
            block_id = self._by_hash.get(h)
            if block_id is None or self.blocks[block_id].token_ids != seq.block_tokens(i, bs):
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> bool:
        hits = self._cached_prefix(seq) if use_prefix_cache else []
        reusable_free = sum(1 for b in hits if b in self._free)
        needed = seq.num_blocks(self.block_size) - len(hits)
        return needed <= len(self._free) - reusable_free

    def allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached prefix blocks when allowed
        (``use_prefix_cache=False`` for blocks that a KV transfer will fill)."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id} already has blocks")
        if not self.can_allocate(seq, use_prefix_cache):
            raise NoFreeBlocks(f"not enough free blocks for {len(seq)} tokens")
        hits = self._cached_prefix(seq) if use_prefix_cache else []
        for block_id in hits:
            if block_id in self._free:
                self._take(block_id)
            else:
                self.blocks[block_id].ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        for _ in range(len(hits), seq.num_blocks(self.block_size)):
            seq.block_table.append(self._take_fresh().block_id)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks that reach zero return to the free list."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0  # num_cached_tokens stays: it records what the cache gave

    def needs_block(self, seq: Sequence) -> bool:
        """Whether the token that the next step writes (the last) lies past ``seq``'s blocks."""
        return len(seq.token_ids) > len(seq.block_table) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        """Room for the token that the next step will write (a new block when one is full)."""
        return not self.needs_block(seq) or bool(self._free)

    def append_slot(self, seq: Sequence) -> None:
        """Before a decode step: make sure the last token has a block."""
        if self.needs_block(seq):
            seq.block_table.append(self._take_fresh().block_id)

    def try_append_slot(self, seq: Sequence) -> bool:
        """``append_slot`` if ``can_append``, in one call (once per sequence per decode step);
        False, with nothing done, when the token needs a new block and none is free."""
        if len(seq.token_ids) <= len(seq.block_table) * self.block_size:
            return True
        if not self._free:
            return False
        seq.block_table.append(self._take_fresh().block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks that ``seq``'s computed tokens have filled, making them reusable."""
        bs, table = self.block_size, seq.block_table
        full = min(seq.num_computed_tokens // bs, len(table))
        # Hashed blocks are always a prefix of the table (hashing goes front to back), so only
        # the tail past the last hashed block needs work: O(1) per decode step, not O(length).
        if not full or self.blocks[table[full - 1]].hash is not None:
            return  # nothing newly filled (most decode steps)
        first = full
        while first > 0 and self.blocks[table[first - 1]].hash is None:
            first -= 1
        if first == full:
            return
        prev = self.blocks[table[first - 1]].hash if first else b""
        hashes = iter_block_hashes(seq.token_ids[first * bs : full * bs], bs, prev)
        for i, h in enumerate(hashes, start=first):
            self._register(self.blocks[table[i]], h, seq.block_tokens(i, bs))
