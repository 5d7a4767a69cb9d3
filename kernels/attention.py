"""Attention over the paged KV cache: the one entry point the engine calls.

Both phases read keys and values from the paged cache (``kv_cache_layer`` has shape
``(2, num_blocks, block_size, num_kv_heads, head_dim)``), addressed by per-sequence block tables,
so prefill with a cached prefix and decode share one layout. Each function dispatches to a Triton
kernel (``triton_*_attention.py`` beside this file) by the rule in ``_launch.py``: on CUDA when
Triton imports, forced either way by ``SPLITSERVE_KERNELS=torch|triton``; otherwise the
plain-torch reference here runs, which is also what the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from splitserve.kernels._launch import use_triton


def write_kv(
    kv_cache_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values ``(num_tokens, num_kv_heads, head_dim)`` at their flat cache slots."""
    _, num_blocks, block_size, h, d = kv_cache_layer.shape
    flat = kv_cache_layer.view(2, num_blocks * block_size, h, d)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def gather_kv(
    kv_cache_layer: torch.Tensor, block_table: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_tokens`` keys and values of one sequence, contiguous ``(T, H, D)``."""
    block_size = kv_cache_layer.shape[2]
    n_blocks = -(-num_tokens // block_size)
    blocks = kv_cache_layer[:, block_table[:n_blocks].long()]  # (2, n_blocks, bs, H, D)
    kv = blocks.flatten(1, 2)[:, :num_tokens]
    return kv[0], kv[1]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int) -> torch.Tensor:
    """q (Tq, Hq, D) attends causally to k/v (Tk, Hkv, D); query i sits at position q_offset+i."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    tq, tk = q.shape[0], k.shape[0]
    pos_q = torch.arange(tq, device=q.device) + q_offset
    mask = pos_q[:, None] >= torch.arange(tk, device=q.device)[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(),
        k.transpose(0, 1).float(),
        v.transpose(0, 1).float(),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(0, 1).to(q.dtype)


def prefill_attention_ref(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed new tokens ``q (N, Hq, D)``.

    Sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of ``q``; its context (cached
    prefix + the new tokens, already written to the cache) is ``context_lens[b]`` tokens long, so
    its queries sit at the last ``q_len`` positions of that context.
    """
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        k, v = gather_kv(kv_cache_layer, block_tables[b], ctx)
        out[s:e] = _sdpa(q[s:e], k, v, scale, q_offset=ctx - (e - s))
    return out


def decode_attention_ref(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence ``q (B, Hq, D)`` attending to its whole cached context."""
    out = torch.empty_like(q)
    for b, ctx in enumerate(context_lens.tolist()):
        k, v = gather_kv(kv_cache_layer, block_tables[b], ctx)
        out[b : b + 1] = _sdpa(q[b : b + 1], k, v, scale, q_offset=ctx - 1)
    return out


def prefill_attention(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA when available, else the torch reference.

    ``k``/``v``: this step's new keys (rotated) and values, the ones just written to the cache;
    the kernel reads them contiguously instead of through the block table (the same numbers,
    fewer scattered loads; bench/RESULTS.md has the measured gain). The reference ignores them.
    """
    if use_triton(q):
        from splitserve.kernels.triton_prefill_attention import prefill_attention_triton

        return prefill_attention_triton(
            q, kv_cache_layer, block_tables, cu_seqlens_q, context_lens, scale, k=k, v=v
        )
    return prefill_attention_ref(q, kv_cache_layer, block_tables, cu_seqlens_q, context_lens, scale)


def decode_attention(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA when available, else the torch reference."""
    if use_triton(q):
        from splitserve.kernels.triton_decode_attention import decode_attention_triton

        return decode_attention_triton(q, kv_cache_layer, block_tables, context_lens, scale)
    return decode_attention_ref(q, kv_cache_layer, block_tables, context_lens, scale)
