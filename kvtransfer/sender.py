"""The prefill-side engine shared by the socket backends (TCP, shared memory, CUDA IPC).

One connection per transfer: connect -> HELLO -> wait for ACCEPT (the receiver may hold us until
decode's expect() arrives) -> per layer, pull the next tensor from the caller's iterable and hand
it to the backend's :class:`LayerSink` -> END {first_token, logprobs} -> wait for DONE.

Backpressure comes from the socket: ``sendall`` blocks while the receiver is behind, so at most
one layer plus the kernel's socket buffers are in flight. Small layers are the exception: a sink
may hold their frames (copied) and send several in one call (:class:`HeldFrames`), because each
send wakes the receiver, a cross-process wake-up that costs more than a small layer's bytes; at
most ``COALESCE_BYTES`` of layers are held, a frame waits at most one layer's compute past
``HOLD_S``, and the last layers leave before END. Every
socket operation has a timeout; every failure is a :class:`TransferError` with a reason, and when
the failure is ours (bad input, the caller's iterator raised) the receiver is told with an ERROR
frame so its future fails at once instead of on a timeout.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import queue
import select
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from splitserve.trust import InternalSecret

from . import auth, metrics
from .base import (
    FailureReason,
    FirstToken,
    KVSender,
    KVSpec,
    SampledToken,
    TransferError,
    TransferResult,
    TransferState,
)
from .wire import (
    Frame,
    FrameType,
    encode_frame,
    end_meta,
    error_from_meta,
    error_meta,
    expect_frame,
    parse_endpoint,
    recv_frame,
    send_frame,
    tune_socket,
    valid_logprobs,
)

log = logging.getLogger(__name__)

COALESCE_BYTES = 64 << 10  # layers smaller than this go out in batches of up to this many bytes
HOLD_S = 0.001  # a held frame goes out with the next layer once it waited this long


class LayerSink(ABC):
    """Where one transfer's layer bytes go (backend-specific)."""

    def hello_fields(self) -> dict[str, Any]:
        """Extra HELLO fields the receiver needs to open its :class:`LayerSource`."""
        return {}

    def accepted(self) -> None:
        """The receiver accepted (shm: it has mapped the segment, so unlink it now)."""
        return None

    def on_accept(self, sock: socket.socket) -> None:
        """Right after ACCEPT, before any layer: read what the backend's receiver sends next
        (cuda_ipc: where to write). Runs under the I/O timeout."""
        return None

    @abstractmethod
    def write(self, sock: socket.socket, layer: int, tensor: torch.Tensor) -> None:
        """Ship one contiguous layer tensor (on the sender's ``layer_device``)."""

    def flush(self, sock: socket.socket) -> None:
        """Send what :meth:`write` held back (see :class:`HeldFrames`); called after the last
        layer, before END. Default: write() holds nothing."""
        return None

    def on_frame(self, frame: Frame) -> None:
        """A control frame from the receiver other than ERROR/DONE (shm: CREDIT)."""
        raise TransferError(FailureReason.PROTOCOL_ERROR, f"unexpected {frame.type.name} frame")

    def drain(self) -> None:
        """Return once nothing this sink started can still land in the receiver's memory; called
        before the sender tells the receiver that it failed (cuda_ipc writes the receiver's blocks
        asynchronously on the GPU). Default: a layer is delivered when write() returns."""
        return None

    def close(self) -> None:
        """Release buffers / segments."""
        return None


class HeldFrames:
    """Frames of small layers (under ``COALESCE_BYTES`` each), copied and held back to leave in
    one send: about one wake-up of the receiver per ``COALESCE_BYTES`` instead of one per
    layer. Copied, so holding them changes nothing for a caller that reuses a layer's memory
    once the next layer is asked for (safe over one stream; with several streams a lane may
    still be sending a layer then, see ``KVSender.send``)."""

    def __init__(self, layer_nbytes: int) -> None:
        self.enabled = layer_nbytes < COALESCE_BYTES
        self._layer_nbytes = layer_nbytes
        self._frames = bytearray()
        self._held = 0  # layer bytes held
        self._since = 0.0

    def send(
        self,
        sock: socket.socket,
        ftype: FrameType,
        meta: dict[str, Any] | None = None,
        payload: memoryview | None = None,
        *,
        index: int = 0,
    ) -> None:
        """``send_frame``, held back when this transfer's layers are small (``enabled``)."""
        if not self.enabled:
            send_frame(sock, ftype, meta, payload, index=index)
            return
        head = encode_frame(ftype, meta, 0 if payload is None else payload.nbytes, index=index)
        self.add(sock, *((head,) if payload is None else (head, payload)))

    def add(self, sock: socket.socket, *parts: bytes | memoryview) -> None:
        """Hold one layer's frame (``parts`` in order); send everything held when enough bytes
        are held or the oldest frame waited ``HOLD_S``."""
        if not self._held:
            self._since = time.monotonic()
        for part in parts:
            self._frames += part
        self._held += self._layer_nbytes
        if self._held >= COALESCE_BYTES or time.monotonic() - self._since >= HOLD_S:
            self.flush(sock)

    def flush(self, sock: socket.socket) -> None:
        if self._frames:
            sock.sendall(self._frames)
            self._frames.clear()
        self._held = 0


class SlotSink(LayerSink):
    """A sink whose layers go through a ring of ``slots`` buffers that the receiver reads in place
    (shared memory): LAYER {layer, slot} announces a filled slot, CREDIT {slot} hands it
    back. The ring bounds memory and gives backpressure: with no free slot the sender waits for a
    credit (with the I/O timeout)."""

    def __init__(self, slots: int, nbytes: int) -> None:
        self._free = collections.deque(range(slots))
        self._notes = HeldFrames(nbytes)  # LAYER notes of small layers

    @abstractmethod
    def fill(self, slot: int, tensor: torch.Tensor) -> None:
        """Copy one layer's bytes into ``slot``; they must be readable by the receiver on return."""

    def write(self, sock: socket.socket, layer: int, tensor: torch.Tensor) -> None:
        while not self._free:  # ring full: wait for the receiver to hand a slot back
            self._notes.flush(sock)  # (it can only if it has heard of the filled ones)
            self.on_frame(expect_frame(sock, FrameType.CREDIT))
        slot = self._free.popleft()
        self.fill(slot, tensor)
        self._notes.send(sock, FrameType.LAYER, {"slot": slot}, index=layer)

    def flush(self, sock: socket.socket) -> None:
        self._notes.flush(sock)

    def on_frame(self, frame: Frame) -> None:
        slot = frame.meta.get("slot")
        if frame.type != FrameType.CREDIT or not isinstance(slot, int) or slot in self._free:
            raise TransferError(FailureReason.PROTOCOL_ERROR, f"unexpected frame {frame}")
        self._free.append(slot)


class SocketSender(KVSender):
    """Sender over one TCP connection per transfer; subclasses provide :meth:`open_sink`."""

    backend: ClassVar[str]
    max_streams: ClassVar[int] = 1
    # where _check_layer moves each layer before the sink sees it; None keeps the tensor's own
    # device (cuda_ipc scatters GPU layers straight into the receiver; tcp/shm need host memory)
    layer_device: ClassVar[str | None] = "cpu"

    def __init__(
        self,
        spec: KVSpec,
        *,
        connect_timeout: float = 5.0,
        accept_timeout: float = 15.0,
        io_timeout: float = 30.0,
        streams: int = 1,
        min_stream_bytes: int = 64 << 20,
        secret: InternalSecret | None = None,
    ) -> None:
        """``streams`` > 1 spreads the layers of a transfer of at least ``min_stream_bytes``
        over that many connections (layer i on connection i % streams), for links where one
        TCP stream cannot fill the pipe. Backends that cannot (shm) allow only 1. With
        ``secret``, KV goes only to receivers that prove they hold it (``auth.py``)."""
        if spec.backend != self.backend:
            raise ValueError(f"spec.backend is {spec.backend!r}, this sender is {self.backend!r}")
        if min(connect_timeout, accept_timeout, io_timeout) <= 0:
            raise ValueError("timeouts must be > 0")
        if not 1 <= streams <= self.max_streams:
            raise ValueError(f"streams must be in [1, {self.max_streams}] for {self.backend}")
        self.streams = streams
        self.min_stream_bytes = min_stream_bytes
        self.spec = spec
        self.secret = secret
        self.connect_timeout = connect_timeout
        self.accept_timeout = accept_timeout
        self.io_timeout = io_timeout
        self._dtype = getattr(torch, spec.dtype)
        self._spec_dict = spec.to_dict()  # HELLO's; the spec is frozen
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
        negotiated_with: str | None = None,
    ) -> TransferResult:
        """``KVSender.send``; ``negotiated_with``: the receiver instance whose offer chose this
        backend (a negotiating sender's, ``auto.py``), named in the HELLO. A receiver that is
        another instance by now refuses it (``handshake_mismatch`` on ``instance``) and that is
        not counted as this backend's failure: the negotiating sender asks again and retries."""
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
                                num_tokens, start, negotiated_with)
        except TransferError as err:
            if not peer_restarted(err):
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
        negotiated_with: str | None = None,
    ) -> TransferResult:
        first = None
        if num_tokens is None:  # learn the length from layer 0 before the handshake
            first = self._check_layer(_next_layer(layers), 0, None)
            num_tokens = first.shape[1]
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise TransferError(FailureReason.INVALID_INPUT, f"num_tokens must be >= 1: {num_tokens}")
        nbytes = self.spec.layer_nbytes(num_tokens)
        streams = self._streams_for(nbytes)
        lanes: list[_Lane] = []
        try:
            hello = {"request_id": request_id, "spec": self._spec_dict, "num_tokens": num_tokens,
                     "meta": meta, "streams": streams}
            if negotiated_with:
                hello["negotiated_with"] = negotiated_with
            main = self._open_lane(address, nbytes, FrameType.HELLO, hello, self.accept_timeout)
            lanes.append(main)
            for stream in range(1, streams):
                lanes.append(self._open_lane(address, nbytes, FrameType.JOIN, {
                    "request_id": request_id, "stream": stream}, self.io_timeout))
            pending = itertools.chain([first] if first is not None else [], _layers(layers))
            count = self._stream_layers(lanes, pending, num_tokens, nbytes)
            if count != self.spec.num_layers:
                raise TransferError(
                    FailureReason.INVALID_INPUT,
                    f"kv_layers yielded {count} layers, num_layers is {self.spec.num_layers}",
                )
            first = _resolve_first_token(first_token)
            send_frame(main.sock, FrameType.END, end_meta(first))
            while True:  # shm may still return credits before DONE
                frame = expect_frame(main.sock, FrameType.DONE, FrameType.CREDIT)
                if frame.type == FrameType.DONE:
                    break
            return TransferResult(
                TransferState.DONE, request_id, first.token_id, num_tokens, nbytes * count,
                time.monotonic() - start, meta=meta, first_logprobs=first.logprobs,
            )
        except TransferError as err:
            ours = err.reason in (FailureReason.INVALID_INPUT, FailureReason.ABORTED)
            if lanes and ours and all(lane.halt(1.0) for lane in lanes):
                _tell_peer(lanes[0].sock, err)  # our fault: the receiver fails fast with the reason
            raise
        except TimeoutError as exc:
            raise TransferError(FailureReason.TIMEOUT, f"receiver stalled: {exc}") from exc
        except OSError as exc:
            raise self._closed_error() or _peer_error(lanes) or TransferError(
                FailureReason.CONNECTION_LOST, f"receiver connection lost: {exc}"
            ) from exc
        finally:
            for lane in lanes:
                lane.close()
                with self._lock:
                    self._active.discard(lane.sock)

    def _streams_for(self, layer_nbytes: int) -> int:
        """Parallel connections for one transfer: several only for big payloads."""
        if self.streams == 1 or layer_nbytes * self.spec.num_layers < self.min_stream_bytes:
            return 1
        return min(self.streams, self.spec.num_layers)

    def _open_lane(
        self, address: tuple[str, int], nbytes: int, kind: FrameType, hello: dict[str, Any],
        reply_timeout: float,
    ) -> _Lane:
        """Connect, introduce the connection (HELLO or JOIN) and wait for ACCEPT."""
        lane = _Lane(self._connect(address))
        try:
            lane.sink = self.open_sink(nbytes)
            nonce = auth.new_nonce() if self.secret is not None else ""
            proof_fields = auth.hello_fields(nonce) if nonce else {}
            send_frame(lane.sock, kind, {**hello, **lane.sink.hello_fields(), **proof_fields})
            if self.secret is not None:
                auth.authenticate_receiver(
                    lane.sock, self.secret, nonce, hello["request_id"], self.backend
                )
            lane.sock.settimeout(reply_timeout)
            expect_frame(lane.sock, FrameType.ACCEPT)
            lane.sock.settimeout(self.io_timeout)
            lane.sink.accepted()
            lane.sink.on_accept(lane.sock)
        except BaseException:
            lane.close()
            with self._lock:
                self._active.discard(lane.sock)
            raise
        return lane

    def _stream_layers(
        self, lanes: list[_Lane], pending: Iterator[Any], num_tokens: int, nbytes: int
    ) -> int:
        """Send every layer, layer i on lane i % len(lanes); returns the number of layers.
        The bytes metric is updated once per transfer (also when it fails part-way), not per
        layer: a labelled Prometheus update costs a few microseconds, like a small layer."""
        count = 0
        try:
            for layer, tensor in enumerate(pending):
                if layer >= self.spec.num_layers:
                    raise TransferError(
                        FailureReason.INVALID_INPUT,
                        f"kv_layers yielded more than num_layers={self.spec.num_layers} layers",
                    )
                tensor = self._check_layer(tensor, layer, num_tokens)
                lane = lanes[layer % len(lanes)]
                if len(lanes) == 1:
                    lane.write(layer, tensor)
                else:
                    lane.submit(layer, tensor, self.io_timeout, lanes)
                count += 1
        finally:
            if count:
                metrics.record_bytes("send", self.backend, nbytes * count)
        for lane in lanes:
            lane.finish(self.io_timeout)
        return count

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
        """Validate one layer and return it contiguous on ``layer_device`` (no copy if it is)."""
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
        # each step only when needed: three no-op torch calls cost more than a small layer's
        # sendmsg (the result is the same tensor either way)
        if tensor.requires_grad:
            tensor = tensor.detach()
        if self.layer_device is not None and tensor.device.type != self.layer_device:
            tensor = tensor.to(self.layer_device)
        return tensor if tensor.is_contiguous() else tensor.contiguous()


def peer_restarted(err: TransferError) -> bool:
    """Whether ``err`` is a receiver refusing a HELLO negotiated with an earlier instance of it
    (``receive_session.py``): the transfer is intact there, to be retried after a new OFFER."""
    return err.reason == FailureReason.HANDSHAKE_MISMATCH and err.field == "instance"


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


def _resolve_first_token(first_token: FirstToken) -> SampledToken:
    try:
        first = first_token() if callable(first_token) else first_token
    except Exception as exc:  # the caller's sampling failed
        raise TransferError(FailureReason.ABORTED, f"first_token raised {exc!r}") from exc
    if not isinstance(first, SampledToken):
        first = SampledToken(first)
    token = first.token_id.item() if isinstance(first.token_id, torch.Tensor) else first.token_id
    if isinstance(token, bool) or not isinstance(token, int):
        raise TransferError(FailureReason.INVALID_INPUT, f"first_token must be an int: {token!r}")
    if not valid_logprobs(first.logprobs):
        raise TransferError(FailureReason.INVALID_INPUT, f"malformed first-token logprobs: {first.logprobs!r}")
    return SampledToken(token, first.logprobs)


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


def _peer_error(lanes: list[_Lane]) -> TransferError | None:
    """The receiver's ERROR frame if one is already waiting on a lane (why it hung up)."""
    for lane in lanes:
        try:
            if not select.select([lane.sock], [], [], 0.05)[0]:
                continue
            lane.sock.settimeout(0.2)
            frame = recv_frame(lane.sock)
        except (OSError, TransferError, ValueError):
            continue  # nothing readable here: the plain connection error stands
        if frame.type == FrameType.ERROR:
            return error_from_meta(frame.meta)
    return None


class _Lane:
    """One connection of a transfer. With several lanes, each has a thread fed through a
    one-slot queue, so the caller's iterator blocks (backpressure) when a lane is behind."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sink: LayerSink | None = None
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, torch.Tensor] | None] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def write(self, layer: int, tensor: torch.Tensor) -> None:
        self._poll_peer()
        self.sink.write(self.sock, layer, tensor)

    def submit(self, layer: int, tensor: torch.Tensor, timeout: float, lanes: list[_Lane]) -> None:
        """Queue a layer for this lane's thread; fail fast if any lane already failed."""
        if self._thread is None:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._run, name="kv-send-lane", daemon=True)
            self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            for lane in lanes:
                if lane.error is not None:
                    raise lane.error
            try:
                self._queue.put((layer, tensor), timeout=0.05)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    raise TimeoutError("send lane stalled") from None

    def finish(self, timeout: float) -> None:
        """Send what the sink held back, or wait until this lane's thread sent everything
        queued (and flushed); re-raise its failure."""
        if self._thread is None and self.error is None:
            self.sink.flush(self.sock)
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                raise TimeoutError("send lane stalled") from None
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("send lane stalled")
        if self.error is not None:
            raise self.error

    def halt(self, timeout: float) -> bool:
        """Stop the lane's thread between layers and drain its sink; True once no frame is
        half-written and nothing more can land at the receiver."""
        self._stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        if self.sink is not None:
            self.sink.drain()
        return True

    def close(self) -> None:
        self._stopped = True
        if self._thread is not None and self._thread.is_alive():
            _shutdown(self.sock)  # wakes a thread blocked in sendall
            self._thread.join(5.0)
        if self.sink is not None:
            self.sink.close()
        self.sock.close()

    def _run(self) -> None:
        while not self._stopped:
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if self.error is not None:
                if item is None:
                    return
                continue  # failed: drop queued work until told to stop
            try:
                if item is None:
                    self.sink.flush(self.sock)
                    return
                self.write(*item)
            except BaseException as exc:  # handed to the caller's thread via self.error
                self.error = exc
                _shutdown(self.sock)
                if item is None:  # the last flush failed: finish() must not wait for more
                    return

    def _poll_peer(self) -> None:
        """Between layers, read whatever the receiver sent (an ERROR stops us early)."""
        while select.select([self.sock], [], [], 0)[0]:
            frame = recv_frame(self.sock)
            if frame.type == FrameType.ERROR:
                raise error_from_meta(frame.meta)
            self.sink.on_frame(frame)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already closed by its sender thread
        log.debug("shutdown of kv connection failed: %s", exc)
