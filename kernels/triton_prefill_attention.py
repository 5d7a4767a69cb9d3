"""Prefill attention in Triton over packed variable-length prompts with a paged prefix.

The new tokens of all sequences are packed into ``q (N, Hq, D)`` (no padding) with offsets
``cu_seqlens_q``; sequence ``b``'s keys and values (cached prefix + its new tokens, already written
by ``rope_and_write_kv``) are read from the paged cache through its block table, so prefix reuse
and chunked prefill cost nothing extra. Flash-attention style: one program per (query tile of
``BLOCK_M`` rows, query head), online softmax in float32 over ``BLOCK_N`` key tiles, the causal
mask applied only on the tiles that straddle the diagonal.

The grid is sized from host-known shapes (``N // BLOCK_M + B`` tiles bound the real count); each
program finds its sequence from the cumulative tile counts, computed on the device, so no call
needs a device->host sync. Reference: ``attention.prefill_attention_ref``.
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
)

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_base, v_base, bt_row, lo, hi, pos_q, ctx, qk_scale, stride_blk, stride_tok,
    d, d_mask,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, SCALE_MODE: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over keys ``lo .. hi`` of one sequence.

    Off the diagonal (``CAUSAL`` false) every key is below ``ctx`` by construction, so the loads
    go unmasked (plain vector copies) when the head dim needs no padding either.
    """
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < ctx
        kv_mask = valid[:, None] & d_mask[None, :]
        if CAUSAL or not EVEN_D:
            blk = tl.load(bt_row + offs // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + offs // BLOCK_SIZE).to(tl.int64)
        row = blk * stride_blk + (offs % BLOCK_SIZE) * stride_tok
        if CAUSAL or not EVEN_D:
            k = tl.load(k_base + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + row[:, None] + d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SCALE_MODE == 0:  # scale the scores (SCALE_MODE 1: q came pre-scaled)
            s = s * qk_scale
        if CAUSAL:
            s = tl.where((offs[None, :] <= pos_q[:, None]) & valid[None, :], s, float("-inf"))
        if SCALE_MODE == 2:  # fold the scale into the exponent's argument (one FMA)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if CAUSAL or not EVEN_D:
            v = tl.load(v_base + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_base + row[:, None] + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, cu_q_ptr, ctx_ptr, tile_end_ptr, out_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh,
    stride_kv, stride_blk, stride_tok, stride_kvh,
    stride_btb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SEQ_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALE_MODE: tl.constexpr,
):
    # Heaviest tiles first: program 0 takes the last tile id, which belongs to the last tiles.
    t = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(0) * 0  # an int32 scalar, so the loop carries one type
    for c in range(0, num_seqs, SEQ_CHUNK):
        offs_b = c + tl.arange(0, SEQ_CHUNK)
        ends = tl.load(tile_end_ptr + offs_b, mask=offs_b < num_seqs, other=2147483647)
        b += tl.sum((ends <= t).to(tl.int32), 0)
    if b < num_seqs:
        tile_begin = tl.load(tile_end_ptr + b - 1, mask=b > 0, other=0)
        m0 = (t - tile_begin) * BLOCK_M
        q_start = tl.load(cu_q_ptr + b).to(tl.int64)
        q_len = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
        ctx = tl.load(ctx_ptr + b).to(tl.int32)
        prefix = ctx - q_len

        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        d = tl.arange(0, HEAD_DIM_PAD)
        d_mask = d < HEAD_DIM
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(
            q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=q_mask,
            other=0.0,
        )
        if SCALE_MODE == 1:
            q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)
        pos_q = prefix + offs_m

        kvh = h // GROUP
        k_base = kv_ptr + kvh * stride_kvh
        v_base = k_base + stride_kv
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        # keys below the tile's first query position are visible to every row: no mask
        full_end = ((prefix + m0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_base, v_base, bt_row, 0, full_end, pos_q, ctx, qk_scale,
            stride_blk, stride_tok, d, d_mask,
            False, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, HEAD_DIM == HEAD_DIM_PAD, SCALE_MODE,
        )
        diag_end = tl.minimum(ctx, prefix + m0 + BLOCK_M)
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_base, v_base, bt_row, full_end, diag_end, pos_q, ctx, qk_scale,
            stride_blk, stride_tok, d, d_mask,
            True, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, HEAD_DIM == HEAD_DIM_PAD, SCALE_MODE,
        )
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_i[:, None]
        out = out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention_triton(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 8,
    num_stages: int | None = None,
    scale_mode: int = 0,
) -> torch.Tensor:
    """Prefill attention for packed ``q (N, Hq, D)``; same contract as ``prefill_attention_ref``.

    The tile sizes and launch knobs are for benchmarks and tests; the defaults were the fastest
    of a sweep at head dim 128 on an H200 (bench/RESULTS.md). ``None``: 128x128 tiles and 3
    stages for 2-byte dtypes up to head dim 128 (32 keys a tile above); float32 halves the tiles
    and uses 2 stages, since 128x128 fp32 tiles at head dim 128 need more shared memory than an
    H200 has (262,656 of 232,448 bytes, seen on the GPU). ``scale_mode``: where the softmax scale is applied
    (0: on the scores, 1: on q once, rounded to q's dtype, 2: folded into the exponent).
    """
    _check_inputs(q, kv_cache_layer, block_tables, cu_seqlens_q, context_lens)
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache_layer.shape
    num_seqs = context_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    wide = q.element_size() >= 4
    block_m = block_m or (64 if wide else 128)
    num_stages = num_stages or (2 if wide else 3)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
    tile_end = torch.cumsum(-(-q_lens // block_m), 0, dtype=torch.int32)
    max_tiles = -(-num_tokens // block_m) + num_seqs
    if block_n is None:
        block_n = (64 if wide else 128) if head_dim <= 128 else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _prefill_kernel[(max_tiles, num_heads)](
        q, kv_cache_layer, block_tables, cu_seqlens_q, context_lens, tile_end, out,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1),
        kv_cache_layer.stride(0), kv_cache_layer.stride(1), kv_cache_layer.stride(2),
        kv_cache_layer.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=next_pow2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        SEQ_CHUNK=min(256, max(16, next_pow2(num_seqs))), DOT_PRECISION=precision,
        SCALE_MODE=scale_mode, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _check_inputs(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    check_launchable(q, kv, block_tables, cu_seqlens_q, context_lens)
    check_ndim("q", q, 3)
    check_ndim("kv_cache_layer", kv, 5)
    check_ndim("block_tables", block_tables, 2)
    check_ndim("cu_seqlens_q", cu_seqlens_q, 1)
    check_ndim("context_lens", context_lens, 1)
    check_dtype("q", q, FLOAT_DTYPES)
    for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q),
                    ("context_lens", context_lens)):
        check_dtype(name, t, INDEX_DTYPES)
    if kv.dtype != q.dtype:
        raise TypeError(f"kv_cache_layer dtype {kv.dtype} != q dtype {q.dtype}")
    if kv.shape[0] != 2 or kv.shape[4] != q.shape[2]:
        raise ValueError(f"kv_cache_layer shape {tuple(kv.shape)} does not match q {tuple(q.shape)}")
    if q.shape[1] % kv.shape[3]:
        raise ValueError(f"{q.shape[1]} query heads not a multiple of {kv.shape[3]} KV heads")
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"cu_seqlens_q ({cu_seqlens_q.shape[0]}) must have one more entry than context_lens "
            f"({num_seqs}), and block_tables one row per sequence ({block_tables.shape[0]})"
        )
    if block_tables.stride(1) != 1 or cu_seqlens_q.stride(0) != 1 or context_lens.stride(0) != 1:
        raise ValueError("block_tables rows, cu_seqlens_q and context_lens must be contiguous")
    check_last_contiguous("q", q)
    check_last_contiguous("kv_cache_layer", kv)
