"""The dispatch rule of ``splitserve.kernels`` (no Triton launch here: CPU tensors, no interpreter)."""

from __future__ import annotations

import pytest
import torch
from splitserve.kernels import _launch, attention, ops


def test_auto_uses_torch_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_KERNELS", raising=False)
    x = torch.randn(4, 8)
    assert not _launch.use_triton(x)
    torch.testing.assert_close(ops.silu_and_mul(x), ops.silu_and_mul_ref(x))


@pytest.mark.parametrize("mode,expected", [("torch", False), ("TRITON", True), ("auto", False)])
def test_env_var_forces_a_side(monkeypatch: pytest.MonkeyPatch, mode: str, expected: bool) -> None:
    monkeypatch.setenv("SPLITSERVE_KERNELS", mode)
    assert _launch.use_triton(torch.zeros(1)) is expected


def test_bad_env_value_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="SPLITSERVE_KERNELS='cuda'"):
        _launch.use_triton(torch.zeros(1))


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.silu_and_mul(torch.randn(2, 8))


def test_decode_reference_equals_prefill_reference_for_one_token() -> None:
    """The two references agree where their contracts overlap (a 1-token prefill)."""
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 6, 16, 2, 32, generator=gen)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    lens = torch.tensor([19, 40], dtype=torch.int32)
    q = torch.randn(2, 8, 32, generator=gen)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    dec = attention.decode_attention_ref(q, kv, table, lens, 0.2)
    pre = attention.prefill_attention_ref(q, kv, table, cu, lens, 0.2)
    torch.testing.assert_close(dec, pre)
