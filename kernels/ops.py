"""Elementwise and normalisation ops of the decoder layer: one entry point each.

Each function here is the plain-torch reference and the dispatch point: on CUDA a Triton kernel
(``triton_norm.py``, ``triton_swiglu.py``, ``triton_rope_kv.py`` beside this file) takes over; on
the CPU the reference runs; ``SPLITSERVE_KERNELS=torch|triton`` forces either (rule in
``_launch.py``). The engine calls only these names, so a kernel plugs in without touching the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from splitserve.kernels._launch import kernel_mode, use_triton

# Decode-sized matmuls go to the Triton GEMV (``triton_gemv.py``) only where it measured faster
# than cuBLAS (F.linear) by >= 3% on an H200 (bf16, graph-replayed, W not in L2; bench/lab/gemv.py,
# bench/RESULTS.md "## GEMV"). Keyed by the weight's exact (N, K); each entry is an inclusive M
# range and the launch config measured there: (block_n, block_k, split_k, num_warps, num_stages).
# Ranges between measured M (1, 8, 32, 64) are interpolated. Everything else stays F.linear.
GemvEntry = tuple[int, int, tuple[int, int, int, int, int]]
GEMV_TABLE: dict[tuple[int, int], tuple[GemvEntry, ...]] = {
    (4096, 4096): ((1, 1, (64, 256, 2, 4, 4)), (2, 32, (64, 128, 1, 4, 6))),  # o_proj 1.05-1.14x
    (6144, 4096): ((9, 32, (64, 128, 1, 4, 6)),),  # qkv: 1.06x at M=32, a wash elsewhere
    (4096, 14336): ((2, 64, (64, 128, 2, 4, 6)),),  # down_proj 1.03-1.08x
    (128256, 4096): ((1, 64, (128, 128, 1, 8, 4)),),  # LM head 1.04-1.08x
}


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as Hugging Face Llama does, cast back to the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` then RMSNorm; returns (normed, new residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation on a fused ``[gate | up]`` projection: ``silu(gate) * up``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Llama's half-split layout; x (N, H, D), cos/sin (N, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :].float(), sin[:, None, :].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def gemv_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int] | None:
    """The measured-winning GEMV launch config for ``(M, K) @ (N, K).T``, None = use F.linear."""
    for lo, hi, cfg in GEMV_TABLE.get((n, k), ()):
        if lo <= m <= hi:
            return cfg
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; the decode-time projections of the model (few rows, big weight).

    Under ``SPLITSERVE_KERNELS=auto`` the Triton GEMV runs only on CUDA and only for the (M, N, K)
    in ``GEMV_TABLE``; ``triton`` forces it for any shape (default config where the table has
    none), ``torch`` never uses it.
    """
    if use_triton(x) and weight.dim() == 2:
        m = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        cfg = gemv_config(m, *weight.shape)
        if cfg is not None or kernel_mode() == "triton":
            from splitserve.kernels.triton_gemv import DEFAULT_CONFIG, GemvConfig, gemv_triton

            return gemv_triton(x, weight, bias, GemvConfig(*cfg) if cfg else DEFAULT_CONFIG)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        from splitserve.kernels.triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        from splitserve.kernels.triton_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate_up):
        from splitserve.kernels.triton_swiglu import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    return silu_and_mul_ref(gate_up)


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions' cos/sin, store k and v in the paged cache.

    Returns the rotated (q, k). One entry point so a fused kernel can do it in one pass.
    """
    if use_triton(q):
        from splitserve.kernels.triton_rope_kv import rope_and_write_kv_triton

        return rope_and_write_kv_triton(q, k, v, cos, sin, kv_cache_layer, slot_mapping)
    from splitserve.kernels.attention import write_kv

    q = rotate_ref(q, cos, sin)
    k = rotate_ref(k, cos, sin)
    write_kv(kv_cache_layer, k, v, slot_mapping)
    return q, k
