"""TCP backend: layer bytes travel inline on the transfer's connection (any two hosts).

Sender: the layer tensor's own memory goes to ``sendall`` through a memoryview (no copy in
Python). Receiver: one buffer per connection, filled with ``recv_into`` and scattered into the
paged cache with one ``index_copy_`` per layer.
"""

from __future__ import annotations

import socket
from typing import Any

import torch

from .base import FailureReason, TransferError
from .receiver import LayerSource, SocketReceiver
from .sender import LayerSink, SocketSender
from .wire import Frame, FrameType, byte_buffer, recv_into_exact, send_frame, tensor_bytes


class InlineSource(LayerSource):
    """Reads each layer's payload from the socket into one reused buffer."""

    def __init__(self, nbytes: int) -> None:
        self._buf, self._view = byte_buffer(nbytes)

    def read(self, sock: socket.socket, frame: Frame, nbytes: int) -> torch.Tensor:
        if frame.payload_len != nbytes:
            raise TransferError(
                FailureReason.PROTOCOL_ERROR,
                f"layer payload is {frame.payload_len} bytes, expected {nbytes}",
            )
        recv_into_exact(sock, self._view)
        return self._buf

    def close(self) -> None:
        self._view.release()


class InlineSink(LayerSink):
    """Writes each layer as a LAYER frame whose payload is the tensor's bytes."""

    def write(self, sock: socket.socket, layer: int, tensor: torch.Tensor) -> None:
        send_frame(sock, FrameType.LAYER, {"layer": layer}, tensor_bytes(tensor))


class TCPReceiver(SocketReceiver):
    backend = "tcp"

    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        return InlineSource(nbytes)


class TCPSender(SocketSender):
    backend = "tcp"

    def open_sink(self, nbytes: int) -> LayerSink:
        return InlineSink()
