"""CUDA IPC backend (two processes on one host, GPU to GPU): bulk bytes never leave the GPUs.

Control frames use the same TCP connection and handshake as the TCP backend (so faults, cancel,
timeouts and backpressure behave alike). The sender allocates, per transfer, a ring of ``SLOTS``
layer-sized uint8 slots on its GPU and shares it in HELLO as a CUDA IPC handle: the fields of
``UntypedStorage._share_cuda_()`` as JSON (bytes base64), never pickle, plus the GPU's UUID so
the receiver finds the same physical GPU even under another ``CUDA_VISIBLE_DEVICES``. The receiver
opens the handle before ACCEPT (``UntypedStorage._new_shared_cuda``).

Per layer the sender copies the layer (a GPU tensor: ``layer_device = None`` keeps it where it is)
into a free slot, synchronizes its stream, and sends LAYER {layer, slot}; the receiver scatters
the slot into its paged cache with one ``index_copy_`` (after a peer copy when the cache lives on
another GPU), synchronizes, and answers CREDIT {slot}. The ring bounds memory and gives
backpressure, exactly like the shared-memory backend.

Opening a handle costs milliseconds, so both ends keep them: the sender reuses its rings (a small
pool, one ring per transfer in flight) and the receiver keeps the mappings it opened (a bounded
LRU, dropped after ``MAPPING_IDLE_S`` unused or when a transfer through it failed, so a dead
sender's memory is not held for long). The receiver only ever reads a ring, between LAYER and
CREDIT, so a ring may go back to the pool even after a failed transfer; torch's IPC reference
count is therefore dropped at once (the sender's memory is freed when the sender frees it).

A handle cannot be opened by the process that made it; when both ends live in one process (tests,
a colocated worker) the receiver recognises that from a per-process nonce and uses the ring
directly. A sender dying mid-transfer ends its TCP connection, so the receiver fails at once; its
mapping of the dead process's memory is released when the source closes.
"""

from __future__ import annotations

import base64
import collections
import socket
import threading
import time
import uuid
import weakref
from typing import Any, ClassVar

import torch

from .base import FailureReason, KVSpec, TransferError
from .layout import PagedWriter
from .receiver import LayerSource, SlotSource, SocketReceiver
from .sender import LayerSink, SlotSink, SocketSender
from .wire import Frame

SLOTS = 2
RING_MIN_BYTES = 2 << 20
POOLED_RINGS = 4  # free rings a sender keeps (one per concurrent transfer is reused)
MAPPING_CACHE = 16  # rings a receiver keeps open
MAPPING_IDLE_S = 60.0
_PROCESS_NONCE = uuid.uuid4().hex  # tells "same process" apart even across PID namespaces
_LOCAL_RINGS: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
_LOCAL_LOCK = threading.Lock()
# (sender nonce, ring token) -> (ring tensor, last use): the handles this process opened
_MAPPINGS: collections.OrderedDict[tuple[str, str], tuple[torch.Tensor, float]] = (
    collections.OrderedDict()
)


def require_cuda(role: str) -> None:
    """Fail at construction, with a reason, where no GPU is visible (never hang later)."""
    if not torch.cuda.is_available():
        raise TransferError(
            FailureReason.BACKEND_UNAVAILABLE,
            f"cuda_ipc {role} needs CUDA, but torch.cuda.is_available() is False "
            "(use the tcp or shm backend on CPU hosts)",
        )


def gpu_uuid(index: int) -> str | None:
    """The GPU's UUID (stable across processes and CUDA_VISIBLE_DEVICES), if torch exposes it."""
    value = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return None if value is None else str(value)


def encode_handle(fields: tuple) -> list[Any]:
    """``_share_cuda_()``'s tuple as JSON-able values (bytes -> {"b64": ...})."""
    out: list[Any] = []
    for value in fields:
        if isinstance(value, bytes):
            out.append({"b64": base64.b64encode(value).decode("ascii")})
        elif isinstance(value, (bool, int)) or value is None:
            out.append(value)
        else:
            raise TypeError(f"unexpected CUDA IPC handle field {type(value).__name__}")
    return out


def decode_handle(values: list[Any]) -> list[Any]:
    """The inverse of :func:`encode_handle`; malformed input is a protocol error."""
    out: list[Any] = []
    for value in values:
        if isinstance(value, dict):
            try:
                out.append(base64.b64decode(value["b64"], validate=True))
            except (KeyError, TypeError, ValueError) as exc:
                raise TransferError(
                    FailureReason.PROTOCOL_ERROR, f"bad handle field: {exc}"
                ) from exc
        elif isinstance(value, (bool, int)) or value is None:
            out.append(value)
        else:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "bad CUDA IPC handle field")
    return out


def release_share(fields: tuple | list) -> None:
    """Drop the IPC reference that ``_share_cuda_()`` took for its consumer: rings are reused
    and mapped by several receivers, so their lifetime is the sender's (see the module doc)."""
    if len(fields) < 6:
        return
    counter, offset = fields[4], fields[5]
    if isinstance(counter, bytes) and isinstance(offset, int):
        torch.UntypedStorage._release_ipc_counter_cuda(counter, offset)


def _local_device(hello_ipc: dict[str, Any], sender_index: int) -> int:
    """This process's index of the sender's GPU (matched by UUID when both sides know it)."""
    want = hello_ipc.get("uuid")
    count = torch.cuda.device_count()
    if want is None:
        if not 0 <= sender_index < count:
            raise TransferError(
                FailureReason.BACKEND_UNAVAILABLE, "sender's GPU is not visible here"
            )
        return sender_index
    for index in range(count):
        if gpu_uuid(index) == want:
            return index
    raise TransferError(
        FailureReason.BACKEND_UNAVAILABLE,
        f"sender's GPU {want} is not visible here (sender on another host, or hidden by "
        "CUDA_VISIBLE_DEVICES)",
    )


def _open_ring(hello: dict[str, Any], nbytes: int) -> torch.Tensor:
    """The sender's ring as a uint8 CUDA tensor in this process."""
    ipc, slots = hello.get("cuda_ipc"), hello.get("ipc_slots")
    if not isinstance(ipc, dict) or not isinstance(slots, int) or slots < 1:
        raise TransferError(FailureReason.PROTOCOL_ERROR, "HELLO lacks cuda_ipc / ipc_slots")
    if ipc.get("nonce") == _PROCESS_NONCE:  # same process: IPC handles cannot be opened here
        with _LOCAL_LOCK:
            ring = _LOCAL_RINGS.get(str(ipc.get("token")))
        if ring is None:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "the sender's ring is gone")
    else:
        ring = _mapped_ring(ipc)
    if ring.numel() < slots * nbytes:
        raise TransferError(FailureReason.PROTOCOL_ERROR, "CUDA IPC ring is too small")
    return ring[: slots * nbytes]


def _mapped_ring(ipc: dict[str, Any]) -> torch.Tensor:
    """The ring of another process: from the mapping cache, else opened now and cached."""
    key = (str(ipc.get("nonce")), str(ipc.get("token")))
    now = time.monotonic()
    with _LOCAL_LOCK:
        for old, (_, used) in list(_MAPPINGS.items()):
            if now - used > MAPPING_IDLE_S:
                del _MAPPINGS[old]
        hit = _MAPPINGS.get(key)
        if hit is not None:
            _MAPPINGS[key] = (hit[0], now)
            _MAPPINGS.move_to_end(key)
            return hit[0]
    ring = _open_handle(ipc)
    with _LOCAL_LOCK:
        _MAPPINGS[key] = (ring, now)
        while len(_MAPPINGS) > MAPPING_CACHE:
            _MAPPINGS.popitem(last=False)
    return ring


def forget_mapping(ipc: dict[str, Any]) -> None:
    """Drop a cached mapping (its transfer failed: the sender may be gone)."""
    with _LOCAL_LOCK:
        _MAPPINGS.pop((str(ipc.get("nonce")), str(ipc.get("token"))), None)


def _open_handle(ipc: dict[str, Any]) -> torch.Tensor:
    """Open the sender's CUDA IPC handle (never pickle: JSON fields of ``_share_cuda_()``)."""
    fields = ipc.get("handle")
    if not isinstance(fields, list) or len(fields) < 2 or not isinstance(fields[0], int):
        raise TransferError(FailureReason.PROTOCOL_ERROR, "bad cuda_ipc handle in HELLO")
    fields = decode_handle(fields)
    fields[0] = _local_device(ipc, fields[0])
    try:
        storage = torch.UntypedStorage._new_shared_cuda(*fields)
    except RuntimeError as exc:  # e.g. another host's handle, or IPC not permitted
        raise TransferError(
            FailureReason.BACKEND_UNAVAILABLE, f"cannot open the sender's CUDA IPC handle: {exc}"
        ) from exc
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
            storage, 0, (storage.nbytes(),), (1,))


class CudaIpcSource(SlotSource):
    """Receiver side: scatters layers from the sender's GPU slots and hands slots back."""

    def __init__(self, hello: dict[str, Any], nbytes: int, num_layers: int) -> None:
        self._nbytes = nbytes
        self._ipc = hello.get("cuda_ipc")
        self._ring: torch.Tensor | None = _open_ring(hello, nbytes)
        self._slots = self._ring.numel() // nbytes
        self._layers_left = num_layers

    def read_into(
        self, sock: socket.socket, frame: Frame, layer: int, writer: PagedWriter
    ) -> None:
        slot = frame.meta.get("slot")
        if frame.payload_len or not isinstance(slot, int) or not 0 <= slot < self._slots:
            raise TransferError(
                FailureReason.PROTOCOL_ERROR, f"bad cuda_ipc LAYER frame {frame.meta}"
            )
        n = self._nbytes
        writer.from_tensor(layer, self._ring[slot * n : (slot + 1) * n])
        # the slot is handed back next: every read of it must have finished
        torch.cuda.current_stream(self._ring.device).synchronize()
        if writer.kv_cache.is_cuda and writer.kv_cache.device != self._ring.device:
            torch.cuda.current_stream(writer.kv_cache.device).synchronize()
        self._layers_left -= 1

    def close(self) -> None:
        if self._layers_left > 0 and isinstance(self._ipc, dict):
            forget_mapping(self._ipc)  # failed mid-way: the sender may be dead, let it go
        self._ring = None


class _Ring:
    """One GPU ring of the sender, shared once; reused by later transfers."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.tensor = torch.empty(capacity, dtype=torch.uint8, device=device)
        self.token = uuid.uuid4().hex
        shared = self.tensor.untyped_storage()._share_cuda_()
        release_share(shared)
        self.handle = encode_handle(shared)
        self.uuid = gpu_uuid(device.index)
        with _LOCAL_LOCK:
            _LOCAL_RINGS[self.token] = self.tensor


class CudaIpcSink(SlotSink):
    """Sender side: one transfer's use of a ring; copies layers into free slots."""

    def __init__(self, nbytes: int, ring: _Ring, give_back: Any) -> None:
        self._nbytes = nbytes
        self._ring: _Ring | None = ring
        self._give_back = give_back
        super().__init__(SLOTS)

    def hello_fields(self) -> dict[str, Any]:
        ring = self._ring
        return {
            "cuda_ipc": {"handle": ring.handle, "uuid": ring.uuid, "nonce": _PROCESS_NONCE,
                         "token": ring.token},
            "ipc_slots": SLOTS,
        }

    def fill(self, slot: int, tensor: torch.Tensor) -> None:
        n = self._nbytes
        ring = self._ring.tensor
        with torch.cuda.device(ring.device):
            ring[slot * n : (slot + 1) * n].copy_(tensor.reshape(-1).view(torch.uint8),
                                                  non_blocking=True)
            # the receiver reads the slot from another process: the bytes must have landed
            torch.cuda.current_stream(ring.device).synchronize()

    def close(self) -> None:
        # safe even after a failure: a receiver only reads the ring, and only into a transfer
        # that is failing anyway
        ring, self._ring = self._ring, None
        if ring is not None:
            self._give_back(ring)


class CudaIpcReceiver(SocketReceiver):
    """Decode side; the cache may be on any GPU of this host (or on the CPU)."""

    backend = "cuda_ipc"

    def __init__(self, spec: KVSpec, kv_cache: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        require_cuda("receiver")
        super().__init__(spec, kv_cache, *args, **kwargs)

    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        return CudaIpcSource(hello, nbytes, self.spec.num_layers)


class CudaIpcSender(SocketSender):
    """Prefill side; layers stay on their GPU (``device`` holds the rings, default: current)."""

    backend = "cuda_ipc"
    layer_device: ClassVar[str | None] = None

    def __init__(self, spec: KVSpec, *, device: torch.device | str | int | None = None,
                 **kwargs: Any) -> None:
        require_cuda("sender")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else (
            torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        )
        if dev.type != "cuda":
            raise ValueError(f"cuda_ipc sender device must be a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self._pool: list[_Ring] = []
        self._pool_lock = threading.Lock()
        super().__init__(spec, **kwargs)

    def open_sink(self, nbytes: int) -> LayerSink:
        return CudaIpcSink(nbytes, self._take_ring(SLOTS * nbytes), self._give_ring)

    def close(self) -> None:
        super().close()
        with self._pool_lock:
            self._pool.clear()

    def _take_ring(self, need: int) -> _Ring:
        """The smallest free ring that fits, else a new one (a power of two, >= 2 MiB, so
        prompts of similar length share rings)."""
        with self._pool_lock:
            fits = [ring for ring in self._pool if ring.capacity >= need]
            if fits:
                ring = min(fits, key=lambda r: r.capacity)
                self._pool.remove(ring)
                return ring
        return _Ring(max(RING_MIN_BYTES, 1 << (need - 1).bit_length()), self.device)

    def _give_ring(self, ring: _Ring) -> None:
        with self._pool_lock:
            if self._closed:
                return
            self._pool.append(ring)
            while len(self._pool) > POOLED_RINGS:
                self._pool.remove(min(self._pool, key=lambda r: r.capacity))
