"""Prefill attention in Triton over packed variable-length prompts with a paged prefix.

The new tokens of all sequences are packed into ``q (N, Hq, D)`` (no padding) with offsets
``cu_seqlens_q``; sequence ``b``'s cached prefix is read from the paged cache through its block
table, so prefix reuse and chunked prefill cost nothing extra. The new tokens' own keys and values
come either from the same cache (they were written there by ``rope_and_write_kv``) or, when the
caller passes them, straight from the contiguous ``k``/``v`` of this step: then the bulk of a long
prompt's work needs no block-table gathers and its tiles can be fetched by the tensor-memory
accelerator (``tl`` tensor descriptors) on Hopper.

Flash-attention style: one program per (query tile of ``BLOCK_M`` rows, query head), online
softmax in float32 (base 2, the softmax scale folded into the exponent's argument) over
``BLOCK_N`` key tiles, the ``1 / l`` division deferred to the end. Each program walks four ranges
so that only the tiles that need a mask pay for one:
  1. prefix keys, whole tiles (paged, no mask)   2. the prefix's last partial tile (masked)
  3. new keys below the query tile (no mask)     4. the diagonal tiles (causal mask)

The grid is 1-D and sized from host-known shapes (``N // BLOCK_M + B`` tiles bound the real
count, times the heads); each program finds its sequence from the cumulative tile counts,
computed on the device, so no call needs a device->host sync. Programs run heaviest tile first
(the last tiles of a causal prompt see the most keys), all heads of one tile together (the heads
sharing a KV head read the same tiles, from L2). Reference: ``attention.prefill_attention_ref``.
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
    interpreting,
    next_pow2,
)

LOG2E = 1.4426950408889634


@triton.jit
def _load_paged(base, bt_row, pos, hi, d, d_mask, stride_blk, stride_tok,
                MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Rows ``pos`` of one sequence's keys (or values) through its block table."""
    valid = pos < hi
    if MASKED:
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
    ptrs = base + (blk * stride_blk + (pos % BLOCK_SIZE) * stride_tok)[:, None] + d[None, :]
    if MASKED or not EVEN_D:
        return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_fresh(base, desc, desc_col, row0, n0, offs, hi, d, d_mask, stride_t,
                MASKED: tl.constexpr, EVEN_D: tl.constexpr, USE_DESC: tl.constexpr):
    """Rows ``row0 + offs`` of this step's contiguous keys (or values) of one KV head.

    With a tensor descriptor the copy engine fetches the tile (rows past the tensor come back
    as zeros; rows of the next sequence are finite and masked out of the scores by the caller).
    """
    if USE_DESC:
        return desc.load([row0 + n0, desc_col])
    ptrs = base + (row0 + offs).to(tl.int64)[:, None] * stride_t + d[None, :]
    if MASKED or not EVEN_D:
        return tl.load(ptrs, mask=(offs < hi)[:, None] & d_mask[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attend(
    acc, l_i, m_i, q, qpos, lo, hi,
    k_base, v_base, bt_row, key_off, stride_blk, stride_tok,
    desc_k, desc_v, desc_col, row0, stride_kt, stride_vt,
    qk_scale, d, d_mask,
    PAGED: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    USE_DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over the keys ``lo .. hi`` of one range.

    Keys and query positions ``qpos`` are in the range's own coordinates; a paged range finds
    key ``j`` at cache position ``key_off + j``, a fresh one at row ``row0 + j`` of ``k``/``v``.
    ``MASKED``: drop keys past ``hi`` or after the query (the causal mask); without it every key
    is visible to every row, so the tile runs with no compare or select at all.
    """
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        offs = n0 + tl.arange(0, BLOCK_N)
        if PAGED:
            k = _load_paged(k_base, bt_row, key_off + offs, key_off + hi, d, d_mask, stride_blk,
                            stride_tok, MASKED, EVEN_D, BLOCK_SIZE)
        else:
            k = _load_fresh(k_base, desc_k, desc_col, row0, n0, offs, hi, d, d_mask, stride_kt,
                            MASKED, EVEN_D, USE_DESC)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            keep = (offs[None, :] <= qpos[:, None]) & (offs < hi)[None, :]
            s = s * qk_scale + tl.where(keep, 0.0, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        else:  # the scale rides in the exponent's argument: one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PAGED:
            v = _load_paged(v_base, bt_row, key_off + offs, key_off + hi, d, d_mask, stride_blk,
                            stride_tok, MASKED, EVEN_D, BLOCK_SIZE)
        else:
            v = _load_fresh(v_base, desc_v, desc_col, row0, n0, offs, hi, d, d_mask, stride_vt,
                            MASKED, EVEN_D, USE_DESC)
        # accumulate in place (the MMA's own accumulator): no second BLOCK_M x D register tile
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Triton compiles a kernel anew for each specialisation of an integer argument (== 1, divisible
# by 16, neither). The sequence count and the block table's width change with every batch, so
# specialising on them would compile the kernel in the middle of serving; they only index
# scalar loads, where the hint buys nothing.
@triton.jit(do_not_specialize=["num_seqs", "stride_btb"])
def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, cu_q_ptr, ctx_ptr, out_ptr,
    k_ptr, v_ptr, desc_k, desc_v,
    qk_scale, num_seqs, num_heads, group,
    stride_qt, stride_qh,
    stride_kv, stride_blk, stride_tok, stride_kvh,
    stride_btb,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SEQ_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FRESH: tl.constexpr, USE_DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    # Heaviest tiles first: the first programs take the last tile id (the last tiles of the
    # last sequence), one program per head of it, before any lighter tile starts.
    pid = tl.program_id(0)
    t = tl.num_programs(0) // num_heads - 1 - pid // num_heads
    h = pid % num_heads
    # Find this tile's sequence: count the sequences whose tiles all end at or before it (and
    # their tiles), from the offsets alone, so the host launches nothing else.
    b = pid * 0  # int32 scalars, so the loop carries one type
    tile_begin = pid * 0
    base = pid * 0
    for c in range(0, num_seqs, SEQ_CHUNK):
        offs_b = c + tl.arange(0, SEQ_CHUNK)
        in_range = offs_b < num_seqs
        starts = tl.load(cu_q_ptr + offs_b, mask=in_range, other=0).to(tl.int32)
        stops = tl.load(cu_q_ptr + offs_b + 1, mask=in_range, other=0).to(tl.int32)
        n_tiles = (stops - starts + BLOCK_M - 1) // BLOCK_M
        before = (base + tl.cumsum(n_tiles, 0) <= t) & in_range
        b += tl.sum(before.to(tl.int32), 0)
        tile_begin += tl.sum(tl.where(before, n_tiles, 0), 0)
        base += tl.sum(n_tiles, 0)
    if b < num_seqs:
        m0 = (t - tile_begin) * BLOCK_M
        q_start = tl.load(cu_q_ptr + b).to(tl.int32)
        q_len = tl.load(cu_q_ptr + b + 1).to(tl.int32) - q_start
        prefix = tl.load(ctx_ptr + b).to(tl.int32) - q_len

        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        d = tl.arange(0, HEAD_DIM_PAD)
        d_mask = d < HEAD_DIM
        q_mask = m_mask[:, None] & d_mask[None, :]
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=q_mask, other=0.0)

        kvh = h // group
        ck_base = kv_ptr + kvh * stride_kvh
        cv_base = ck_base + stride_kv
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

        # 1-2. the cached prefix, always paged; every query sits after all of it
        prefix_full = (prefix // BLOCK_N) * BLOCK_N
        qpos_abs = prefix + offs_m
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, qpos_abs, 0, prefix_full,
            ck_base, cv_base, bt_row, 0, stride_blk, stride_tok,
            desc_k, desc_v, 0, 0, 0, 0, qk_scale, d, d_mask,
            True, False, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, EVEN_D, False, False,
        )
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, qpos_abs, prefix_full, prefix,
            ck_base, cv_base, bt_row, 0, stride_blk, stride_tok,
            desc_k, desc_v, 0, 0, 0, 0, qk_scale, d, d_mask,
            True, True, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, EVEN_D, False, False,
        )
        # 3-4. this step's own keys, in coordinates relative to the first new token
        if FRESH:
            fk_base = k_ptr + kvh * stride_kh
            fv_base = v_ptr + kvh * stride_vh
        else:
            fk_base = ck_base
            fv_base = cv_base
        full_end = (m0 // BLOCK_N) * BLOCK_N
        diag_end = tl.minimum(q_len, m0 + BLOCK_M)
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, offs_m, 0, full_end,
            fk_base, fv_base, bt_row, prefix, stride_blk, stride_tok,
            desc_k, desc_v, kvh * HEAD_DIM, q_start, stride_kt, stride_vt, qk_scale, d, d_mask,
            not FRESH, False, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, EVEN_D, USE_DESC, WARP_SPEC,
        )
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, offs_m, full_end, diag_end,
            fk_base, fv_base, bt_row, prefix, stride_blk, stride_tok,
            desc_k, desc_v, kvh * HEAD_DIM, q_start, stride_kt, stride_vt, qk_scale, d, d_mask,
            not FRESH, True, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, EVEN_D, USE_DESC, False,
        )
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_i[:, None]
        out = out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention_triton(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tma: bool | None = None,
    warp_specialize: bool = False,
) -> torch.Tensor:
    """Prefill attention for packed ``q (N, Hq, D)``; same contract as ``prefill_attention_ref``.

    ``k``, ``v`` (optional, both or neither): this step's new keys (after RoPE) and values
    ``(N, Hkv, D)``, the very values already written to the cache. Passing them lets the kernel
    read the new tokens' part of the context contiguously instead of through the block table;
    the result is the same. ``tma``: fetch those contiguous tiles with tensor descriptors
    (``None``: where the GPU has a copy engine, sm_90+, and the layout allows it).

    The tile sizes and launch knobs are for benchmarks and tests; ``None`` takes
    ``default_launch``'s choice. ``warp_specialize``: Triton's warp specialization of the hot
    loop (off by default: it has not paid off in the sweeps; kept so sweeps can try it again).
    """
    _check_inputs(q, kv_cache_layer, block_tables, cu_seqlens_q, context_lens)
    _check_fresh(q, kv_cache_layer, k, v)
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache_layer.shape
    num_seqs = context_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    fresh = k is not None
    default = default_launch(q.element_size(), head_dim, fresh)
    block_m = block_m or default["block_m"]
    block_n = block_n or default["block_n"]
    num_warps = num_warps or default["num_warps"]
    num_stages = num_stages or default["num_stages"]
    if block_m % 16 or block_n % 16:
        raise ValueError(f"block_m ({block_m}) and block_n ({block_n}) must be multiples of 16")
    max_tiles = -(-num_tokens // block_m) + num_seqs
    use_desc = fresh and _descriptors_allowed(k, v, head_dim, block_n, tma)
    desc_k = desc_v = None
    if use_desc:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc_k, desc_v = (
            TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim], [t.stride(0), 1],
                             [block_n, head_dim])
            for t in (k, v)
        )
    k_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1)) if fresh else (0, 0, 0, 0)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _prefill_kernel[(max_tiles * num_heads,)](
        q, kv_cache_layer, block_tables, cu_seqlens_q, context_lens, out,
        k, v, desc_k, desc_v,
        scale * LOG2E, num_seqs, num_heads, num_heads // num_kv_heads,
        q.stride(0), q.stride(1),
        kv_cache_layer.stride(0), kv_cache_layer.stride(1), kv_cache_layer.stride(2),
        kv_cache_layer.stride(3),
        block_tables.stride(0),
        *k_strides,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=next_pow2(head_dim),
        EVEN_D=head_dim == next_pow2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        # Fixed, not sized from num_seqs: each size was one more compile during serving.
        SEQ_CHUNK=64, DOT_PRECISION=precision,
        FRESH=fresh, USE_DESC=use_desc, WARP_SPEC=warp_specialize,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def default_launch(element_size: int, head_dim: int, fresh: bool) -> dict[str, int]:
    """Tiles, warps and pipeline depth per way of reading the new tokens' keys: the fastest of
    the sweeps at 1 x 4096 tokens, head dim 128 (the numbers: bench/RESULTS.md, "Prefill
    attention launch choices").

    - fresh k/v (tensor-descriptor loads): 64 x 64 tiles, 4 warps, 3 stages; finer tiles
      balance the causal triangle over the multiprocessors.
    - paged only (block-table gathers): 128 x 128 tiles, 8 warps, 3 stages; bigger tiles
      amortise the per-tile block-table loads.
    - float32: 64 x 64, 8 warps, 2 stages, because 128 x 128 fp32 tiles at head dim 128 need
      more shared memory than a multiprocessor has.
    Head dims above 128 take 32-key tiles (the same shared-memory bound).
    """
    if element_size >= 4:
        launch = dict(block_m=64, block_n=64, num_warps=8, num_stages=2)
    elif fresh:
        launch = dict(block_m=64, block_n=64, num_warps=4, num_stages=3)
    else:
        launch = dict(block_m=128, block_n=128, num_warps=8, num_stages=3)
    if head_dim > 128:
        launch["block_n"] = 32
    return launch


def _descriptors_allowed(
    k: torch.Tensor, v: torch.Tensor, head_dim: int, block_n: int, tma: bool | None
) -> bool:
    """Whether ``k``/``v`` can be read through 2-D tensor descriptors ``(N, Hkv * D)``.

    The copy engine needs 16-byte aligned bases and row strides, heads packed back to back
    (one descriptor row holds every KV head), a power-of-two head dim (the tile's width), and
    tiles of at most 256 rows and columns.
    ``tma=True`` on a layout that cannot be described is an error, not a silent fallback.
    """
    if tma is False:
        return False
    reasons = []
    if head_dim != next_pow2(head_dim):
        reasons.append(f"head dim {head_dim} is not a power of two")
    if max(head_dim, block_n) > 256:
        reasons.append(f"a {block_n} x {head_dim} tile is wider than 256")
    for name, t in (("k", k), ("v", v)):
        if t.shape[1] > 1 and t.stride(1) != head_dim:
            reasons.append(f"{name}'s heads are not packed (strides {t.stride()})")
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            reasons.append(f"{name} is not 16-byte aligned")
    if tma is None:
        on_hopper = k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9
        return not reasons and (on_hopper or interpreting())
    if reasons:
        raise ValueError("tma=True: " + "; ".join(reasons))
    return True


def _check_fresh(
    q: torch.Tensor, kv: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
) -> None:
    """``k``/``v``, when given, hold one row per new token for every KV head, like the cache."""
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    if k is None or v is None:
        return
    check_launchable(q, k, v)
    want = (q.shape[0], kv.shape[3], q.shape[2])
    for name, t in (("k", k), ("v", v)):
        check_ndim(name, t, 3)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} shape {tuple(t.shape)}, expected {want} (tokens, KV heads, D)")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        check_last_contiguous(name, t)


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
