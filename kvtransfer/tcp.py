"""TCP backend: layer bytes travel inline on the transfer's connection (any two hosts).

Sender: the layer tensor's own memory goes to ``sendall`` through a memoryview (no copy in
Python). Receiver: ``recv_into`` straight into the destination blocks (CPU cache), or into one
staging buffer then one ``index_copy_`` per layer (GPU cache); see ``layout.PagedWriter``.
"""

from __future__ import annotations

import socket
from typing import Any

import torch

from .base import FailureReason, TransferError
from .layout import PagedWriter
from .receiver import LayerSource, SocketReceiver
from .sender import HeldFrames, LayerSink, SocketSender
from .wire import Frame, FrameType, tensor_bytes


class InlineSource(LayerSource):
    """Reads each layer's payload from the socket straight into the blocks."""

    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes

    def read_into(
        self, sock: socket.socket, frame: Frame, layer: int, writer: PagedWriter
    ) -> None:
        if frame.payload_len != self._nbytes:
            raise TransferError(
                FailureReason.PROTOCOL_ERROR,
                f"layer payload is {frame.payload_len} bytes, expected {self._nbytes}",
            )
        writer.from_socket(sock, layer)


class InlineSink(LayerSink):
    """Writes each layer as a LAYER frame whose payload is the tensor's bytes (small layers in
    batches, see :class:`~.sender.HeldFrames`)."""

    def __init__(self, nbytes: int) -> None:
        self._held = HeldFrames(nbytes)

    def write(self, sock: socket.socket, layer: int, tensor: torch.Tensor) -> None:
        self._held.send(sock, FrameType.LAYER, payload=tensor_bytes(tensor), index=layer)

    def flush(self, sock: socket.socket) -> None:
        self._held.flush(sock)


class TCPReceiver(SocketReceiver):
    backend = "tcp"

    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        return InlineSource(nbytes)


class TCPSender(SocketSender):
    backend = "tcp"
    max_streams = 16

    def open_sink(self, nbytes: int) -> LayerSink:
        return InlineSink(nbytes)
