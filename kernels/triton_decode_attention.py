"""Paged decode attention in Triton (flash-decoding, grouped-query).

One program handles one (sequence, KV head, context split): it loads the query rows of every
query head that shares that KV head (the GQA group, padded to 16 rows for ``tl.dot``), so each
K/V row is read from HBM once per group, not once per query head. Long contexts are cut into
``num_splits`` chunks processed by separate programs (enough programs to fill the GPU even at
small batch); each writes a normalised partial output and its log-sum-exp, and a second
kernel merges the splits. With one split the first kernel writes the output directly.

Reference: ``attention.decode_attention_ref``. Cache layout: ``(2, num_blocks, block_size,
num_kv_heads, head_dim)``; token ``t`` of sequence ``b`` is at ``block_tables[b, t // block_size]``.
A sequence with ``context_lens[b] == 0`` (a padded CUDA-graph slot) gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from splitserve.kernels._launch import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_last_contiguous,
    check_launchable,
    check_ndim,
    next_pow2,
    num_sms,
)

LOG2E = 1.4426950408889634


# The block table's width changes between eager calls (see the prefill kernel's note): not a
# reason to compile again.
@triton.jit(do_not_specialize=["stride_btb"])
def _decode_split_kernel(
    q_ptr, kv_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kv, stride_blk, stride_tok, stride_kvh,
    stride_btb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    # The splits divide this sequence's own context (not the longest one the block table could
    # hold), so a short context still spreads over every split's program.
    split_size = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_size
    end = tl.minimum(start + split_size, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_base = kv_ptr + kvh * stride_kvh
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        blk = tl.load(bt_row + offs // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = blk * stride_blk + (offs % BLOCK_SIZE) * stride_tok
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(k_base + stride_kv + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partial buffers are contiguous (B, Hq, NUM_SPLITS, HEAD_DIM_PAD) and (B, Hq, NUM_SPLITS)
        row_id = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(part_o_ptr + row_id[:, None] * HEAD_DIM_PAD + d[None, :], o, mask=o_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + row_id, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    base = (b.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(
        part_o_ptr + (base + sp)[:, None] * HEAD_DIM_PAD + d[None, :],
        mask=(sp < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :] & (w > 0.0)[:, None],
        other=0.0,
    )
    total = tl.sum(w, 0)
    total = tl.where(total == 0.0, 1.0, total)
    res = tl.sum(o * w[:, None], 0) / total
    out = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d
    tl.store(out, res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(
    batch: int, num_kv_heads: int, max_context: int, sms: int, block_n: int = 64
) -> int:
    """About 3 programs per multiprocessor (the fastest in the sweeps of bench/RESULTS.md), at
    most one split per ``block_n`` tokens of the longest possible context. The kernel divides
    each sequence's own context by this count, so at batch 1 a 540-token context runs as ~9
    programs per KV head of one tile each instead of 2 programs walking 8 tiles in a row, which
    is latency-bound."""
    want = -(-3 * sms // max(1, batch * num_kv_heads))
    return max(1, min(want, -(-max_context // block_n), 64))


def decode_attention_triton(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Decode attention for ``q (B, Hq, D)``; same contract as ``decode_attention_ref``.

    ``num_splits``/``block_n``/``num_warps``/``num_stages`` are tuning knobs for benchmarks and
    tests; ``None`` picks them from the shapes. The split count depends only on host-known
    shapes (the block table's width bounds the context), never on ``context_lens`` values, so
    a call needs no device sync and can be captured in a CUDA graph.
    """
    _check_inputs(q, kv_cache_layer, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache_layer.shape
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    if block_n is None:
        block_n = 64
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, num_sms(q.device), block_n)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    out = torch.empty_like(q)
    if batch == 0:
        return out
    d_pad = next_pow2(head_dim)
    if num_splits > 1:
        part_o = torch.empty(batch, num_heads, num_splits, d_pad, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused by the kernel
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache_layer, block_tables, context_lens, out, part_o, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        kv_cache_layer.stride(0), kv_cache_layer.stride(1), kv_cache_layer.stride(2),
        kv_cache_layer.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_N=block_n, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
            NUM_SPLITS=num_splits, SPLITS_PAD=next_pow2(num_splits),
            num_warps=4,
        )
    return out


def _check_inputs(
    q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> None:
    check_launchable(q, kv, block_tables, context_lens)
    check_ndim("q", q, 3)
    check_ndim("kv_cache_layer", kv, 5)
    check_ndim("block_tables", block_tables, 2)
    check_ndim("context_lens", context_lens, 1)
    check_dtype("q", q, FLOAT_DTYPES)
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    check_dtype("context_lens", context_lens, INDEX_DTYPES)
    if kv.dtype != q.dtype:
        raise TypeError(f"kv_cache_layer dtype {kv.dtype} != q dtype {q.dtype}")
    if kv.shape[0] != 2 or kv.shape[4] != q.shape[2]:
        raise ValueError(f"kv_cache_layer shape {tuple(kv.shape)} does not match q {tuple(q.shape)}")
    if q.shape[1] % kv.shape[3]:
        raise ValueError(f"{q.shape[1]} query heads not a multiple of {kv.shape[3]} KV heads")
    if block_tables.shape[0] != q.shape[0] or context_lens.shape[0] != q.shape[0]:
        raise ValueError("block_tables and context_lens need one row per query")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    check_last_contiguous("q", q)
    check_last_contiguous("kv_cache_layer", kv)
