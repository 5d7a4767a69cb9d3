"""Backends by name, imported lazily so that a worker only loads the transport it uses.

A backend is a module with a sender class and a receiver class; registering the same name twice is
an error (two modules silently fighting over "tcp" is worse than a crash at import).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .base import KVReceiver, KVSender, KVSpec


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    module: str
    sender: str
    receiver: str


_BACKENDS: dict[str, BackendEntry] = {}


def register_backend(name: str, module: str, sender: str, receiver: str) -> None:
    """Register backend ``name`` whose classes ``sender``/``receiver`` live in ``module``."""
    if not name or not isinstance(name, str):
        raise ValueError("backend name must be a non-empty string")
    if name in _BACKENDS:
        raise ValueError(f"KV transfer backend {name!r} is already registered")
    _BACKENDS[name] = BackendEntry(module, sender, receiver)


def available_backends() -> list[str]:
    """Names of the registered backends, in registration order."""
    return list(_BACKENDS)


def backend_class(name: str, role: str) -> type:
    """The ``role`` ("sender" or "receiver") class of backend ``name``, imported now."""
    entry = _BACKENDS.get(name)
    if entry is None:
        raise ValueError(f"unknown KV transfer backend {name!r}; known: {available_backends()}")
    module = importlib.import_module(entry.module)
    return getattr(module, getattr(entry, role))


def _load(name: str, role: str, spec: KVSpec) -> type:
    cls = backend_class(name, role)
    if spec.backend != name:
        raise ValueError(f"KVSpec.backend is {spec.backend!r} but backend {name!r} was requested")
    return cls


def create_sender(name: str, spec: KVSpec, **kwargs: Any) -> KVSender:
    """A prefill-side sender of backend ``name`` (kwargs go to the backend, unknown ones fail)."""
    return _load(name, "sender", spec)(spec, **kwargs)


def create_receiver(
    name: str, spec: KVSpec, kv_cache: Any, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> KVReceiver:
    """A decode-side receiver of backend ``name`` writing into ``kv_cache`` (shape
    ``(num_layers, 2, num_blocks, block_size, H, D)``), listening on ``host:port`` (0 = free)."""
    return _load(name, "receiver", spec)(spec, kv_cache, host=host, port=port, **kwargs)


register_backend("tcp", "splitserve.kvtransfer.tcp", "TCPSender", "TCPReceiver")
register_backend("shm", "splitserve.kvtransfer.shm", "ShmSender", "ShmReceiver")
register_backend("cuda_ipc", "splitserve.kvtransfer.cuda_ipc", "CudaIpcSender", "CudaIpcReceiver")
register_backend("nixl", "splitserve.kvtransfer.nixl", "NixlSender", "NixlReceiver")
# negotiates one of the above per peer (auto.py); the workers' default
register_backend("auto", "splitserve.kvtransfer.auto", "AutoSender", "AutoReceiver")
