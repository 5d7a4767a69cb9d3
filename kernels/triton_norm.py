"""Fused residual-add + RMSNorm (and plain RMSNorm) in Triton.

One program per row: ``summed = x + residual`` is rounded to the input dtype (as the reference
adds in that dtype), stored as the new residual, normalised in float32, rounded, and multiplied by
the weight, all from one read of ``x`` and ``residual``. Reference: ``ops.add_rms_norm_ref`` and
``ops.rms_norm_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from splitserve.kernels._launch import (
    FLOAT_DTYPES,
    check_dtype,
    check_last_contiguous,
    check_launchable,
    next_pow2,
)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
    stride_x, stride_r, stride_o, stride_ro, hidden,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    tensors = (x, weight) if residual is None else (x, residual, weight)
    check_launchable(*tensors)
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("weight", weight, FLOAT_DTYPES)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({hidden},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)}/{residual.dtype} != x {tuple(x.shape)}/{x.dtype}")
    check_last_contiguous("weight", weight)
    x2 = x.reshape(-1, hidden)
    check_last_contiguous("x", x2)
    r2 = None if residual is None else residual.reshape(-1, hidden)
    if r2 is not None:
        check_last_contiguous("residual", r2)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res_out = None if r2 is None else torch.empty_like(x2)
    rows = x2.shape[0]
    if rows:
        block = next_pow2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, x2 if r2 is None else r2, weight, out, out if res_out is None else res_out, eps,
            x2.stride(0), 0 if r2 is None else r2.stride(0), out.stride(0),
            0 if res_out is None else res_out.stride(0), hidden,
            HAS_RESIDUAL=r2 is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    shape = x.shape
    return out.view(shape), None if res_out is None else res_out.view(shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as ``ops.rms_norm_ref``."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``ops.add_rms_norm_ref``: (normed, x + residual)."""
    out, summed = _launch(x, residual, weight, eps)
    return out, summed
