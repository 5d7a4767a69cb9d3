"""Small per-step values between the host and the GPU without waiting for the GPU.

A plain ``torch.tensor(values, device="cuda")`` or ``gpu_tensor.cpu()`` copies through pageable
memory, which makes the host wait for everything already queued on the GPU: in the overlapped
engine that is the step in flight. Going through pinned memory with ``non_blocking`` queues the
copy instead; on the CPU both are plain tensors.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(data: list | np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host values (a list or a numpy array) as a ``dtype`` tensor on ``device``, queued."""
    host = torch.from_numpy(data).to(dtype) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor copied into fresh pinned host memory, queued: read it only after an
    event recorded later on the same stream has passed. A CPU tensor is returned as it is."""
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
