"""Block manager and scheduler logic, without a model."""

from __future__ import annotations

import pytest
from splitserve.engine.block_manager import BlockManager, NoFreeBlocks
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerConfig
from splitserve.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=4))


def computed(s):
    s.num_computed_tokens = len(s)
    return s


def test_prefix_blocks_are_shared_only_once_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(10), "a")
    bm.allocate(a)
    b = seq(range(10), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 0, "a's blocks hold no KV yet: no reuse"
    bm.commit(computed(a))
    c = seq(range(10), "c")
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_whole_prompt_hit_still_computes_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(8), "a")
    bm.allocate(a)
    bm.commit(computed(a))
    b = seq(range(8), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the last block is recomputed so logits exist


def test_freed_blocks_keep_cache_until_reused_and_refcounts_return():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9), "a")
    bm.allocate(a)
    bm.commit(computed(a))
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq(range(9), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    bm.free(b)
    assert bm.num_free_blocks == 4 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_hash_hit_checks_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(9), "a")
    bm.allocate(a)
    bm.commit(computed(a))
    bm.blocks[a.block_table[0]].token_ids = [99, 99, 99, 99]  # as if a hash collided
    b = seq(range(9), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_out_of_blocks_is_refused_cleanly():
    bm = BlockManager(num_blocks=2, block_size=4)
    big = seq(range(12))
    assert not bm.can_allocate(big)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(big)
    assert bm.num_free_blocks == 2 and big.block_table == []


def test_scheduler_preempts_newest_when_cache_is_full():
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), bm)
    a, b = seq(range(4), "a"), seq(range(4), "b")
    sched.add(a)
    sched.add(b)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == [a, b]
    for s in batch:
        computed(s)
        s.token_ids.append(1)  # both now need a second block; only one is free
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a]
    assert list(sched.waiting) == [b] and b.block_table == []


def test_chunked_prefill_mixes_decodes_and_prompt_chunks():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, chunked_prefill=True), bm)
    short, long_ = seq(range(3), "short"), seq(range(20), "long")
    sched.add(short)
    sched.add(long_)
    batch, is_prefill = sched.schedule()
    assert is_prefill and [s.num_scheduled_tokens for s in batch] == [3, 5]
    for s in batch:
        s.num_computed_tokens += s.num_scheduled_tokens
    short.token_ids.append(7)  # short finished its prompt and sampled a token
    batch, _ = sched.schedule()
    assert batch[0] is short and short.num_scheduled_tokens == 1
    assert batch[1] is long_ and long_.num_scheduled_tokens == 7
