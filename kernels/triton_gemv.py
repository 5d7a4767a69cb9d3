"""Skinny GEMM (``y = x @ W.T + b`` for a few rows of x) in Triton, split along K when N is small.

Decode runs the model's projections with M = batch (1..64) rows: the time is the read of W, so
the kernel must keep every SM streaming W. cuBLAS picks tiles that leave a 4096-row weight on too
few SMs (o_proj at 2.2 TB/s on an H200). Here each program reads a ``BLOCK_N x k_per_split``
slab of W once and multiplies it with all M rows of x on the tensor cores ("swap AB": W is the
MMA's M side, so M = 1 wastes only x-side work). When ``cdiv(N, BLOCK_N)`` programs would not
fill the GPU, K is split: each split writes fp32 partials to a ``(split_k, M, N)`` workspace and
a second kernel sums them in split order (deterministic), adds the bias and casts. Every size is
derived from shapes alone, so a call is CUDA-graph capturable (no host sync; the workspace comes
from torch's caching allocator like the output). Reference: ``torch.nn.functional.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from splitserve.kernels._launch import (
    FLOAT_DTYPES,
    check_dtype,
    check_last_contiguous,
    check_launchable,
    check_ndim,
    next_pow2,
    num_sms,
)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, k_per_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Out-of-range rows are clamped, not masked: their loads are valid (and discarded at the
    # store), which keeps the main loop free of row masks.
    rn_ld = tl.minimum(rn, N - 1).to(tl.int64)
    rm_ld = tl.minimum(rm, M - 1).to(tl.int64)
    w_rows = w_ptr + rn_ld[:, None] * stride_wn
    x_rows = x_ptr + rm_ld[:, None] * stride_xm
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + rk[None, :])
            x = tl.load(x_rows + rk[None, :])
        else:
            kmask = rk[None, :] < k_end
            w = tl.load(w_rows + rk[None, :], mask=kmask, other=0.0)
            x = tl.load(x_rows + rk[None, :], mask=kmask, other=0.0)
        if IEEE:
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    if SPLIT:
        ws = ws_ptr + pid_k.to(tl.int64) * M * N + rm[None, :].to(tl.int64) * N + rn[:, None]
        tl.store(ws, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_reduce_kernel(
    ws_ptr, b_ptr, out_ptr, M, N, stride_om, split_k,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split_k):
        acc += tl.load(ws_ptr + (s * M + m) * N + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters; ``split_k`` 0 = chosen from the shape and the SM count."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 6


# The best all-round config of the H200 sweep (bench/RESULTS.md, "## GEMV"); with one program per
# SM it splits K in 2 for N = 4096 and not for N >= 6144, as the sweep's winners did.
DEFAULT_CONFIG = GemvConfig()
PROGRAMS_PER_SM = 1  # target grid size when choosing split_k
SMEM_BUDGET = 180 * 1024  # bytes of pipelined tiles per program (H100/H200: 227 KiB per SM)


def fit_stages(cfg: GemvConfig, block_m: int, elem_size: int) -> int:
    """``cfg.num_stages`` lowered until the staged W and x tiles fit in shared memory."""
    per_stage = (cfg.block_n + block_m) * cfg.block_k * elem_size
    return max(1, min(cfg.num_stages, SMEM_BUDGET // per_stage))


def choose_split_k(n: int, k: int, cfg: GemvConfig, sms: int) -> int:
    """Splits so that about ``PROGRAMS_PER_SM`` programs per SM stream W (1 when N fills it)."""
    if cfg.split_k:
        return cfg.split_k
    n_blocks = triton.cdiv(n, cfg.block_n)
    want = max(1, round(PROGRAMS_PER_SM * sms / n_blocks))
    return max(1, min(want, triton.cdiv(k, cfg.block_k), 16))


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Same contract as ``F.linear`` for x ``(..., K)``, weight ``(N, K)``, bias ``(N,)``.

    fp32 accumulation; the result has x's dtype. Any M works, but the kernel is built for small
    M (the whole M side of a tile is at most 64 rows; larger M tiles over a third grid axis).
    """
    cfg = config or DEFAULT_CONFIG
    tensors = (x, weight) if bias is None else (x, weight, bias)
    check_launchable(*tensors)
    check_dtype("x", x, FLOAT_DTYPES)
    check_ndim("weight", weight, 2)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: last dim of shape {tuple(x.shape)} must equal weight's K = {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    if bias is not None and not bias.is_contiguous():
        raise ValueError("bias: must be contiguous")
    check_last_contiguous("weight", weight)
    x2 = x.reshape(-1, k)
    check_last_contiguous("x", x2)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        if k == 0:
            out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
        else:
            _launch(x2, weight, bias, out, cfg)
    return out.view(*x.shape[:-1], n)


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            cfg: GemvConfig) -> None:
    m, k = x.shape
    n = w.shape[0]
    block_m = min(64, max(16, next_pow2(m)))
    split = choose_split_k(n, k, cfg, num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    b = bias if bias is not None else out
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, block_m))
    _gemv_kernel[grid](
        x, w, b, out, ws, m, n, k, x.stride(0), w.stride(0), out.stride(0), k_per_split,
        HAS_BIAS=bias is not None, SPLIT=split > 1, EVEN_K=k % cfg.block_k == 0,
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=fit_stages(cfg, block_m, x.element_size()),
    )
    if split > 1:
        block = 1024
        _split_reduce_kernel[(m, triton.cdiv(n, block))](
            ws, b, out, m, n, out.stride(0), split, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=4,
        )
