"""The Triton GEMV (``kernels/triton_gemv.py``) against ``F.linear``, and ``ops.linear``'s dispatch.

As in ``test_kernels_triton.py``, the kernel cases run in a child Python with
``TRITON_INTERPRET=1`` (it must be set before triton is imported) and ``SPLITSERVE_KERNELS=triton``;
``SPLITSERVE_TEST_DEVICE=cuda`` runs them on a GPU instead (bf16 too: the interpreter's bf16 dot is
wrong). Shapes: M 1/3/16, N and K that are not multiples of the tiles, with and without bias, one
split and several (the split path adds the bias in the reduce kernel). Small tiles keep the
interpreter fast.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

DEVICE = os.environ.get("SPLITSERVE_TEST_DEVICE", "cpu")
RUN_KERNELS = os.environ.get("TRITON_INTERPRET") == "1" or DEVICE == "cuda"


def test_linear_on_cpu_is_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitserve.kernels import ops

    monkeypatch.delenv("SPLITSERVE_KERNELS", raising=False)
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    torch.testing.assert_close(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_gemv_rule_is_the_measured_table() -> None:
    from splitserve.kernels import ops

    assert ops.gemv_config(1, 4096, 4096) == (64, 256, 2, 4, 4)
    assert ops.gemv_config(8, 4096, 4096) == (64, 128, 1, 4, 6)
    assert ops.gemv_config(64, 4096, 4096) is None  # cuBLAS won there
    assert ops.gemv_config(1, 28672, 4096) is None  # gate_up: cuBLAS won at every M
    assert ops.gemv_config(0, 128256, 4096) is None
    assert ops.gemv_config(65, 128256, 4096) is None
    assert ops.gemv_config(1, 4096, 4095) is None  # unmeasured shapes stay F.linear


if not RUN_KERNELS:

    def test_gemv_in_triton_interpreter() -> None:
        from services import rerun_under_triton_interpreter

        rerun_under_triton_interpreter(__file__, timeout=120)

else:
    from splitserve.kernels import ops
    from splitserve.kernels.triton_gemv import GemvConfig, gemv_triton

    if DEVICE == "cuda":
        DTYPES = [torch.float32, torch.bfloat16, torch.float16]
    else:
        DTYPES = [torch.float32, torch.float16]
    REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    SMALL = GemvConfig(block_n=16, block_k=32, num_warps=1, num_stages=1)

    def _inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
        gen = torch.Generator().manual_seed(zlib.crc32(repr((m, n, k, dtype, bias)).encode()))
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
        b = torch.randn(n, generator=gen) if bias else None
        cast = lambda t: None if t is None else t.to(dtype=dtype, device=DEVICE)  # noqa: E731
        return cast(x), cast(w), cast(b)

    def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        assert out.shape == ref.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()
        rel = (out.double() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel < REL[x.dtype], f"relative error {rel:.2e}"

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("bias", [False, True])
    @pytest.mark.parametrize("m", [1, 3, 16])
    @pytest.mark.parametrize("n,k", [(48, 96), (37, 75)])
    def test_gemv_matches_linear(m, n, k, bias, dtype) -> None:
        x, w, b = _inputs(m, n, k, dtype, bias)
        for split in (1, 3):
            cfg = GemvConfig(**{**SMALL.__dict__, "split_k": split})
            _check(gemv_triton(x, w, b, config=cfg), x, w, b)

    def test_default_config_and_dispatch_with_leading_dims() -> None:
        x, w, b = _inputs(6, 70, 130, torch.float32, True)
        out = ops.linear(x.view(2, 3, 130), w, b)
        assert out.shape == (2, 3, 70)
        _check(out.view(6, 70), x, w, b)

    def test_dispatch_uses_the_table_config(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(ops.GEMV_TABLE, (70, 130), ((1, 8, (16, 32, 3, 1, 1)),))
        x, w, b = _inputs(5, 70, 130, torch.float16, True)
        _check(ops.linear(x, w, b), x, w, b)

    def test_m_beyond_one_tile() -> None:
        x, w, b = _inputs(70, 20, 40, torch.float32, False)
        _check(gemv_triton(x, w, b, config=SMALL), x, w, b)

    def test_bad_inputs_raise() -> None:
        x, w, b = _inputs(2, 16, 32, torch.float32, True)
        with pytest.raises(ValueError, match="K = 32"):
            gemv_triton(x[:, :16], w)
        with pytest.raises(ValueError, match="bias"):
            gemv_triton(x, w, b[:8])
        with pytest.raises(TypeError, match="weight"):
            gemv_triton(x, w.half())
        with pytest.raises(ValueError, match="contiguous"):
            gemv_triton(x, w.t().contiguous().t())
