"""Fused SwiGLU activation in Triton: ``silu(gate) * up`` from a ``[gate | up]`` projection.

One read of the fused projection, one write of the result (the reference reads it twice and
materialises ``silu(gate)``). Rounding follows the reference: silu in float32, rounded to the
input dtype, then the product rounded. Reference: ``ops.silu_and_mul_ref``.
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
)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as ``ops.silu_and_mul_ref``: ``(..., 2I) -> (..., I)``."""
    check_launchable(gate_up)
    check_dtype("gate_up", gate_up, FLOAT_DTYPES)
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"gate_up last dim {width} must be even ([gate | up])")
    inter = width // 2
    x = gate_up.reshape(-1, width)
    check_last_contiguous("gate_up", x)
    out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    if x.shape[0] and inter:
        block = 1024
        _silu_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
        )
    return out.view(*gate_up.shape[:-1], inter)
