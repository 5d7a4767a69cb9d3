"""Fused rotary embedding + paged KV-cache write in Triton.

One program per token: it rotates that token's query heads and key heads (Llama's half-split
layout, in float32 as ``ops.rotate_ref`` does), writes the rotated query and key out, and stores
the rotated key and the value into the token's cache slot, one pass over q/k/v instead of the
reference's five. ``q``/``k``/``v`` may be strided views of the fused QKV projection (only the
head dim must be contiguous). A negative slot (a padded CUDA-graph row) skips the cache write.
Reference: ``ops.rope_and_write_kv`` with ``SPLITSERVE_KERNELS=torch``.
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


@triton.jit
def _rotate(
    x_ptr, stride_xh, out_ptr, stride_oh, cos, sin, j, mask,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
):
    """Rotate the head rows of one token, store them to ``out`` and return both halves."""
    hh = tl.arange(0, HEADS_PAD)
    first = x_ptr + hh[:, None] * stride_xh + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    # round to the input dtype first, as the reference does before writing the cache
    r1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty)
    r2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty)
    dst = out_ptr + hh[:, None] * stride_oh + j[None, :]
    tl.store(dst, r1, mask=mask)
    tl.store(dst + HALF, r2, mask=mask)
    return r1, r2


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, kv_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cos, stride_sin,
    stride_kv, stride_blk, stride_tok, stride_kvh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    j_mask = j < HALF
    cos = tl.load(cos_ptr + t * stride_cos + j, mask=j_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + j, mask=j_mask, other=0.0).to(tl.float32)
    slot_raw = tl.load(slot_ptr + t).to(tl.int64)
    slot = tl.maximum(slot_raw, 0)
    cache = kv_ptr + (slot // BLOCK_SIZE) * stride_blk + (slot % BLOCK_SIZE) * stride_tok

    hq = tl.arange(0, Q_HEADS_PAD)
    _rotate(
        q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * stride_qot, stride_qoh, cos, sin, j,
        (hq < NUM_Q_HEADS)[:, None] & j_mask[None, :], HALF, Q_HEADS_PAD,
    )
    hk = tl.arange(0, KV_HEADS_PAD)
    k_mask = (hk < NUM_KV_HEADS)[:, None] & j_mask[None, :]
    k1, k2 = _rotate(
        k_ptr + t * stride_kt, stride_kh, k_out_ptr + t * stride_kot, stride_koh, cos, sin, j,
        k_mask, HALF, KV_HEADS_PAD,
    )
    # the slot test as a per-head vector: a scalar in a mask breaks the interpreter
    k_write = k_mask & ((hk * 0 + slot_raw) >= 0)[:, None]
    k_dst = cache + hk[:, None] * stride_kvh + j[None, :]
    tl.store(k_dst, k1.to(kv_ptr.dtype.element_ty), mask=k_write)
    tl.store(k_dst + HALF, k2.to(kv_ptr.dtype.element_ty), mask=k_write)
    hh = tl.arange(0, KV_HEADS_PAD)
    dd = tl.arange(0, 2 * HALF_PAD)
    mask = (hh < NUM_KV_HEADS)[:, None] & (dd < 2 * HALF)[None, :]
    v = tl.load(v_ptr + t * stride_vt + hh[:, None] * stride_vh + dd[None, :], mask=mask, other=0.0)
    tl.store(
        cache + stride_kv + hh[:, None] * stride_kvh + dd[None, :],
        v.to(kv_ptr.dtype.element_ty),
        mask=mask & ((hh * 0 + slot_raw) >= 0)[:, None],
    )


def rope_and_write_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``ops.rope_and_write_kv``: returns the rotated (q, k), fills the cache."""
    _check_inputs(q, k, v, cos, sin, kv_cache_layer, slot_mapping)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rope_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, slot_mapping, kv_cache_layer, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0),
        kv_cache_layer.stride(0), kv_cache_layer.stride(1), kv_cache_layer.stride(2),
        kv_cache_layer.stride(3),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=next_pow2(num_q_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=next_pow2(num_kv_heads),
        HALF=half, HALF_PAD=next_pow2(half), BLOCK_SIZE=kv_cache_layer.shape[2],
        num_warps=4,
    )
    return q_out, k_out


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    check_launchable(q, k, v, cos, sin, kv, slot_mapping)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(name, t, 3)
        check_dtype(name, t, FLOAT_DTYPES)
        check_last_contiguous(name, t)
    check_ndim("kv_cache_layer", kv, 5)
    check_dtype("kv_cache_layer", kv, FLOAT_DTYPES)
    check_last_contiguous("kv_cache_layer", kv)
    check_ndim("cos", cos, 2)
    check_ndim("sin", sin, 2)
    check_last_contiguous("cos", cos)
    check_last_contiguous("sin", sin)
    check_ndim("slot_mapping", slot_mapping, 1)
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    n, _, d = q.shape
    if d % 2:
        raise ValueError(f"head_dim {d} must be even for rotary embedding")
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if cos.shape != (n, d // 2) or sin.shape != (n, d // 2):
        raise ValueError(f"cos/sin must be ({n}, {d // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if slot_mapping.shape[0] != n or slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping must be contiguous ({n},), got {tuple(slot_mapping.shape)}")
    if kv.shape[0] != 2 or kv.shape[3:] != k.shape[1:]:
        raise ValueError(f"kv_cache_layer shape {tuple(kv.shape)} does not match k {tuple(k.shape)}")
