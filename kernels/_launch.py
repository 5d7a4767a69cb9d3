"""Host-side helpers shared by the Triton wrappers: dispatch rule and input checks.

Dispatch rule (read on every call, so a test or an operator can flip it without a restart):
``SPLITSERVE_KERNELS`` unset or ``auto`` -> Triton when the tensors are on CUDA and Triton imports,
the torch reference otherwise; ``torch`` -> always the reference; ``triton`` -> always Triton (on the
CPU only under ``TRITON_INTERPRET=1``, which is how the CPU tests run the kernels).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV_VAR = "SPLITSERVE_KERNELS"
_MODES = ("auto", "torch", "triton")


def kernel_mode() -> str:
    """The validated value of ``SPLITSERVE_KERNELS`` (``auto`` when unset)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(_MODES)}")
    return mode


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (not imported here: that is costly)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    """Apply the dispatch rule for an op whose main input is ``x``."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return x.is_cuda and triton_available()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device can run Triton here (CUDA or the interpreter)."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"tensors on different devices: {device} and {t.device}")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device}) or TRITON_INTERPRET=1 set before "
            f"triton is imported; set {ENV_VAR}=torch to use the reference"
        )


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name}: dtype {t.dtype} not in {allowed}")


def check_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    """The kernels vectorise along the last dim; other strides are passed to the kernel."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (strides {t.stride()})")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (a fixed 8 on the CPU interpreter, only to shape grids)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
