"""The prefill-side engine shared by the socket backends (TCP, shared memory).

One connection per transfer: connect -> HELLO -> wait for ACCEPT (the receiver may hold us until
decode's expect() arrives) -> per layer, pull the next tensor from the caller's iterable and hand
it to the backend's :class:`LayerSink` -> END {first_token} -> wait for DONE.

Backpressure comes from the socket: ``sendall`` blocks while the receiver is behind, so at most
one layer plus the kernel's socket buffers are in flight; nothing is queued in Python. Every
socket operation has a timeout; every failure is a :class:`TransferError` with a reason, and when
the failure is ours (bad input, the caller's iterator raised) the receiver is told with an ERROR
frame so its future fails at once instead of on a timeout.
"""

from __future__ import annotations

import itertools
import json
import logging
import select
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch

from . import metrics
from .base import (
    FailureReason,
    FirstToken,
    KVSender,
    KVSpec,
    TransferError,
    TransferResult,
    TransferState,
)
from .wire import (
    Frame,
    FrameType,
    error_from_meta,
    error_meta,
    expect_frame,
    parse_endpoint,
    recv_frame,
    send_frame,
    tune_socket,
)

log = logging.getLogger(__name__)


class LayerSink(ABC):
    """Where one transfer's layer bytes go (backend-specific)."""

    def hello_fields(self) -> dict[str, Any]:
        """Extra HELLO fields the receiver needs to open its :class:`LayerSource`."""
        return {}

    def accepted(self) -> None:
        """The receiver accepted (shm: it has mapped the segment, so unlink it now)."""
        return None

    @abstractmethod
    def write(self, sock: socket.socket, layer: int, tensor: torch.Tensor) -> None:
        """Ship one contiguous CPU layer tensor."""

    def on_frame(self, frame: Frame) -> None:
        """A control frame from the receiver other than ERROR/DONE (shm: CREDIT)."""
        raise TransferError(FailureReason.PROTOCOL_ERROR, f"unexpected {frame.type.name} frame")

    def close(self) -> None:
        """Release buffers / segments."""
        return None


class SocketSender(KVSender):
    """Sender over one TCP connection per transfer; subclasses provide :meth:`open_sink`."""

    backend: ClassVar[str]

    def __init__(
        self,
        spec: KVSpec,
        *,
        connect_timeout: float = 5.0,
        accept_timeout: float = 15.0,
        io_timeout: float = 30.0,
    ) -> None:
        if spec.backend != self.backend:
            raise ValueError(f"spec.backend is {spec.backend!r}, this sender is {self.backend!r}")
        if min(connect_timeout, accept_timeout, io_timeout) <= 0:
            raise ValueError("timeouts must be > 0")
        self.spec = spec
        self.connect_timeout = connect_timeout
        self.accept_timeout = accept_timeout
        self.io_timeout = io_timeout
        self._dtype = getattr(torch, spec.dtype)
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self._closed = False

    @abstractmethod
    def open_sink(self, nbytes: int) -> LayerSink:
        """A sink for one transfer whose layers are ``nbytes`` each."""

    # ----------------------------------------------------------------- public API
    def send(
        self,
        request_id: str,
        endpoint: str,
        kv_layers: Iterable[Any],
        first_token: FirstToken,
        meta: Mapping[str, Any] | None = None,
        *,
        num_tokens: int | None = None,
    ) -> TransferResult:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        host, port = parse_endpoint(endpoint)
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta must be JSON-serialisable: {exc}") from exc
        start = time.monotonic()
        try:
            result = self._send(request_id, (host, port), iter(kv_layers), first_token, meta,
                                num_tokens, start)
        except TransferError as err:
            metrics.record_failure("send", self.backend, err.reason)
            raise err.with_request(request_id) from err.__cause__
        metrics.record_success("send", self.backend, result.seconds)
        return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for sock in self._active:
                _shutdown(sock)

    # ----------------------------------------------------------------- internals
    def _send(
        self,
        request_id: str,
        address: tuple[str, int],
        layers: Iterator[Any],
        first_token: FirstToken,
        meta: dict[str, Any],
        num_tokens: int | None,
        start: float,
    ) -> TransferResult:
        first = None
        if num_tokens is None:  # learn the length from layer 0 before the handshake
            first = self._check_layer(_next_layer(layers), 0, None)
            num_tokens = first.shape[1]
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise TransferError(FailureReason.INVALID_INPUT, f"num_tokens must be >= 1: {num_tokens}")
        nbytes = self.spec.layer_nbytes(num_tokens)
        sock = self._connect(address)
        sink: LayerSink | None = None
        try:
            sink = self.open_sink(nbytes)
            send_frame(sock, FrameType.HELLO, {
                "request_id": request_id, "spec": self.spec.to_dict(), "num_tokens": num_tokens,
                "meta": meta, **sink.hello_fields(),
            })
            sock.settimeout(self.accept_timeout)
            expect_frame(sock, FrameType.ACCEPT)
            sock.settimeout(self.io_timeout)
            sink.accepted()
            pending = itertools.chain([first] if first is not None else [], _layers(layers))
            count = 0
            for layer, tensor in enumerate(pending):
                if layer >= self.spec.num_layers:
                    raise TransferError(
                        FailureReason.INVALID_INPUT,
                        f"kv_layers yielded more than num_layers={self.spec.num_layers} layers",
                    )
                tensor = self._check_layer(tensor, layer, num_tokens)
                self._poll_peer(sock, sink)
                sink.write(sock, layer, tensor)
                metrics.record_bytes("send", self.backend, nbytes)
                count += 1
            if count != self.spec.num_layers:
                raise TransferError(
                    FailureReason.INVALID_INPUT,
                    f"kv_layers yielded {count} layers, num_layers is {self.spec.num_layers}",
                )
            token = _resolve_first_token(first_token)
            send_frame(sock, FrameType.END, {"first_token": token})
            while True:  # shm may still return credits before DONE
                frame = expect_frame(sock, FrameType.DONE, FrameType.CREDIT)
                if frame.type == FrameType.DONE:
                    break
            return TransferResult(
                TransferState.DONE, request_id, token, num_tokens, nbytes * count,
                time.monotonic() - start, meta=meta,
            )
        except TransferError as err:
            if err.reason in (FailureReason.INVALID_INPUT, FailureReason.ABORTED):
                _tell_peer(sock, err)  # our fault: let the receiver fail fast with the reason
            raise
        except TimeoutError as exc:
            raise TransferError(FailureReason.TIMEOUT, f"receiver stalled: {exc}") from exc
        except OSError as exc:
            raise self._closed_error() or _peer_error(sock) or TransferError(
                FailureReason.CONNECTION_LOST, f"receiver connection lost: {exc}"
            ) from exc
        finally:
            if sink is not None:
                sink.close()
            with self._lock:
                self._active.discard(sock)
            sock.close()

    def _connect(self, address: tuple[str, int]) -> socket.socket:
        with self._lock:
            if self._closed:
                raise TransferError(FailureReason.CLOSED, "sender is closed")
        try:
            sock = socket.create_connection(address, timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise TransferError(FailureReason.TIMEOUT, f"connect to {address}: {exc}") from exc
        except OSError as exc:
            raise TransferError(
                FailureReason.CONNECTION_LOST, f"connect to {address}: {exc}"
            ) from exc
        tune_socket(sock, self.io_timeout)
        with self._lock:
            if self._closed:
                sock.close()
                raise TransferError(FailureReason.CLOSED, "sender is closed")
            self._active.add(sock)
        return sock

    def _closed_error(self) -> TransferError | None:
        with self._lock:
            return TransferError(FailureReason.CLOSED, "sender closed") if self._closed else None

    def _check_layer(self, tensor: Any, layer: int, num_tokens: int | None) -> torch.Tensor:
        """Validate one layer and return it as a contiguous CPU tensor (no copy if it is one)."""
        if not isinstance(tensor, torch.Tensor):
            raise TransferError(
                FailureReason.INVALID_INPUT, f"layer {layer} is {type(tensor).__name__}, not a tensor"
            )
        shape = tuple(tensor.shape)
        want_tokens = num_tokens if num_tokens is not None else (shape[1] if len(shape) == 4 else 0)
        want = self.spec.layer_shape(want_tokens) if want_tokens >= 1 else None
        if want is None or shape != want:
            raise TransferError(
                FailureReason.INVALID_INPUT,
                f"layer {layer} has shape {shape}, expected {want or '(2, T>=1, H, D)'}",
            )
        if tensor.dtype != self._dtype:
            raise TransferError(
                FailureReason.INVALID_INPUT,
                f"layer {layer} dtype {tensor.dtype} != spec dtype {self.spec.dtype}",
            )
        return tensor.detach().to("cpu").contiguous()

    def _poll_peer(self, sock: socket.socket, sink: LayerSink) -> None:
        """Between layers, read whatever the receiver sent (an ERROR stops us early)."""
        while select.select([sock], [], [], 0)[0]:
            frame = recv_frame(sock)
            if frame.type == FrameType.ERROR:
                raise error_from_meta(frame.meta)
            sink.on_frame(frame)


def _next_layer(layers: Iterator[Any]) -> Any:
    try:
        return next(layers)
    except StopIteration as exc:
        raise TransferError(FailureReason.INVALID_INPUT, "kv_layers is empty") from exc
    except Exception as exc:  # the caller's compute failed: abort the transfer, keep the cause
        raise TransferError(FailureReason.ABORTED, f"kv_layers raised {exc!r}") from exc


def _layers(layers: Iterator[Any]) -> Iterator[Any]:
    """Iterate the caller's layers, turning its exceptions into an ABORTED transfer."""
    while True:
        try:
            tensor = next(layers)
        except StopIteration:
            return
        except Exception as exc:  # the caller's compute failed: abort the transfer, keep the cause
            raise TransferError(FailureReason.ABORTED, f"kv_layers raised {exc!r}") from exc
        yield tensor


def _resolve_first_token(first_token: FirstToken) -> int:
    try:
        token = first_token() if callable(first_token) else first_token
    except Exception as exc:  # the caller's sampling failed
        raise TransferError(FailureReason.ABORTED, f"first_token raised {exc!r}") from exc
    if isinstance(token, torch.Tensor):
        token = token.item()
    if isinstance(token, bool) or not isinstance(token, int):
        raise TransferError(FailureReason.INVALID_INPUT, f"first_token must be an int: {token!r}")
    return token


def _tell_peer(sock: socket.socket, err: TransferError, linger: float = 1.0) -> None:
    """Send ERROR, then half-close and read until the receiver hangs up: closing a socket with
    unread bytes (e.g. shm credits) would send a reset that can destroy our ERROR in flight."""
    try:
        send_frame(sock, FrameType.ERROR, error_meta(err))
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(linger)
        deadline = time.monotonic() + linger
        while sock.recv(65536) and time.monotonic() < deadline:
            continue
    except OSError as exc:  # the receiver is already gone (or slow to hang up): nothing to do
        log.debug("could not deliver ERROR to receiver: %s", exc)


def _peer_error(sock: socket.socket) -> TransferError | None:
    """The receiver's ERROR frame if one is already waiting on the socket (why it hung up)."""
    try:
        if not select.select([sock], [], [], 0.05)[0]:
            return None
        sock.settimeout(0.2)
        frame = recv_frame(sock)
    except (OSError, TransferError, ValueError):
        return None  # nothing readable: the plain connection error stands
    return error_from_meta(frame.meta) if frame.type == FrameType.ERROR else None


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already closed by its sender thread
        log.debug("shutdown of kv connection failed: %s", exc)
