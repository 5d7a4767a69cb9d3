"""Shared-memory backend (two processes on one host, CPU): bulk bytes skip the socket.

Control frames use the same TCP connection and handshake as the TCP backend. The sender creates
one file in ``/dev/shm`` per transfer holding a ring of ``SLOTS`` layer-sized slots, names it in
HELLO; the receiver maps it before ACCEPT, and the sender unlinks it right after ACCEPT (so a
crash of either process afterwards leaves nothing behind: the memory goes with the last mapping).

Per layer the sender copies the tensor into a free slot and sends LAYER [layer] {slot} without
a payload; the receiver scatters from the slot and answers CREDIT {slot}. The ring bounds memory
and gives backpressure: with no free slot the sender waits for a credit (with the I/O timeout).

Ring size: ``SLOTS`` (double buffering) for big layers; for small ones as many slots as fit in
``RING_BYTES``, up to one per layer. A two-slot ring puts sender and receiver in lock step, a
CREDIT round trip per layer, which for a short prompt costs far more than its copies; a ring that
holds every layer needs no CREDIT at all (no slot is reused), so the receiver sends none.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from typing import Any

import torch

from .base import FailureReason, TransferError
from .layout import PagedWriter
from .receiver import LayerSource, SlotSource, SocketReceiver
from .sender import LayerSink, SlotSink, SocketSender
from .wire import Frame, tensor_bytes

SLOTS = 2  # the fewest: one being filled while the receiver reads the other
RING_BYTES = 1 << 20  # small layers: as many slots as fit (up to num_layers)
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def ring_slots(nbytes: int, num_layers: int) -> int:
    """Slots of a transfer's ring for layers of ``nbytes`` (see the module doc)."""
    return max(SLOTS, min(num_layers, RING_BYTES // max(nbytes, 1)))


def _map(path: str, nbytes: int) -> torch.Tensor:
    """A uint8 tensor backed by the shared file (MAP_SHARED), released with the tensor."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


class ShmSource(SlotSource):
    """Receiver side: reads layers from the sender's slots and hands slots back."""

    def __init__(self, hello: dict[str, Any], nbytes: int, num_layers: int) -> None:
        path, slots = hello.get("shm_path"), hello.get("shm_slots")
        if not isinstance(path, str) or not isinstance(slots, int) or slots < 1:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "HELLO lacks shm_path / shm_slots")
        if os.path.dirname(os.path.abspath(path)) != SHM_DIR or not os.path.isfile(path):
            raise TransferError(
                FailureReason.BACKEND_UNAVAILABLE,
                f"shared memory {path!r} is not visible here (sender on another host?)",
            )
        if os.path.getsize(path) != slots * nbytes:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "shared memory segment has the wrong size")
        self._slots = slots
        self._credits = slots < num_layers  # else no slot is ever reused
        self._nbytes = nbytes
        self._mem: torch.Tensor | None = _map(path, slots * nbytes)
        self._view: memoryview | None = memoryview(self._mem.numpy())

    def read_into(
        self, sock: socket.socket, frame: Frame, layer: int, writer: PagedWriter
    ) -> None:
        slot = frame.meta.get("slot")
        if frame.payload_len or not isinstance(slot, int) or not 0 <= slot < self._slots:
            raise TransferError(FailureReason.PROTOCOL_ERROR, f"bad shm LAYER frame {frame.meta}")
        n = self._nbytes
        writer.from_buffer(layer, self._view[slot * n : (slot + 1) * n])

    def release(self, sock: socket.socket, frame: Frame) -> None:
        if self._credits:
            super().release(sock, frame)

    def close(self) -> None:
        self._view = self._mem = None


class ShmSink(SlotSink):
    """Sender side: owns the segment for one transfer; copies layers into free slots."""

    def __init__(self, nbytes: int, slots: int = SLOTS) -> None:
        self._nbytes = nbytes
        self._slots = slots
        self._path = os.path.join(SHM_DIR, f"splitserve-kv-{os.getpid()}-{uuid.uuid4().hex}")
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, slots * nbytes)
        finally:
            os.close(fd)
        self._mem: torch.Tensor | None = _map(self._path, slots * nbytes)
        self._view: memoryview | None = memoryview(self._mem.numpy())
        super().__init__(slots, nbytes)

    def hello_fields(self) -> dict[str, Any]:
        return {"shm_path": self._path, "shm_slots": self._slots}

    def accepted(self) -> None:
        self._unlink()

    def fill(self, slot: int, tensor: torch.Tensor) -> None:
        n = self._nbytes
        self._view[slot * n : (slot + 1) * n] = tensor_bytes(tensor)  # memcpy, no torch kernel

    def close(self) -> None:
        self._view = self._mem = None
        self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            return  # already unlinked after ACCEPT


class ShmReceiver(SocketReceiver):
    backend = "shm"

    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        return ShmSource(hello, nbytes, self.spec.num_layers)


class ShmSender(SocketSender):
    backend = "shm"

    def open_sink(self, nbytes: int) -> LayerSink:
        return ShmSink(nbytes, ring_slots(nbytes, self.spec.num_layers))
