"""NIXL backend: the sender writes each layer straight into the receiver's paged blocks with a
one-sided NIXL WRITE (UCX underneath: RDMA, cuda_ipc / cuda_copy, or TCP), one notification
per layer; any host to any host, host or device memory.

Control (handshake, ACCEPT/ERROR, END/DONE, faults) uses the TCP connection and frames of the
other socket backends; only the bulk bytes take the NIXL path:

* The receiver makes one NIXL agent and registers its whole paged cache once, when it is made.
* HELLO {nixl: {agent, process}} -> ACCEPT -> CREDIT {nixl: {agent, metadata, tag, base,
  device, mem}, blocks, block_size, num_blocks}: the receiver's agent metadata (the sender adds
  it once per receiver), where the cache lives, and this transfer's blocks in the *receiver's*
  layout; ``tag`` names the transfer in notifications.
* Per layer the sender copies the tensor into a slot of a registered staging ring (so the
  caller may reuse the layer's memory as soon as it asks for the next one, as the interface
  promises; on a GPU an event orders the copy after prefill's kernels without a CPU sync),
  and a pump thread posts one WRITE of the layer's runs of consecutive blocks (the wire is
  token-major, so block sizes may differ) with the notification ``tag:layer``. LAYER frames
  carry no payload: they are progress notes, batched like small TCP layers.
* Before END the sender waits for every WRITE to complete; the receiver, after the last LAYER
  note, waits for the notification of every layer (NIXL delivers a notification after its
  WRITE's bytes), so DONE means what it means for every backend.

Progress. Nothing here runs NIXL's own progress thread (it spins a core even when idle);
the receiver's :class:`_Notifications` thread drives the agent only while a transfer is
granted (UCX over TCP lands bytes when the *target* progresses) and for ``LINGER_S`` after,
and each sender transfer's pump drives its own WRITEs.

Block ownership (as for cuda_ipc: the sender writes memory the decode side owns, so the
receiver resolves a transfer only once nothing can land in its blocks any more):

* the sender fails: its pump stops posting and it waits for every WRITE already posted
  (``drain``) before it sends ERROR or closes the connection;
* the receiver fails it (cancel, timeout, close, no space): it sends ERROR as a stop request;
  the sender's pump sees it while the sending thread is elsewhere (computing the next layer),
  stops posting, waits for the WRITEs in flight and half-closes: that EOF is the
  acknowledgement, and only then does the future fail (at most ``STOP_WAIT_S``);
* the sender process dies: after the EOF the receiver waits for its exit (``/proc``, as
  cuda_ipc) and drives its agent ``SETTLE_S`` more, so that bytes already on this host land
  before the blocks are freed.

Transports are UCX's choice; on a host without RDMA or for tests, ``UCX_TLS=tcp`` (plus
``UCX_NET_DEVICES=lo`` for loopback only). Needs ``pip install 'splitserve[nixl]'``.
"""

from __future__ import annotations

import base64
import importlib
import logging
import os
import select
import socket
import threading
import time
import uuid
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from .base import FailureReason, KVSpec, TransferError
from .cuda_ipc import STOP_WAIT_S, GrantedSource, process_identity
from .layout import PagedWriter, _block_runs, check_cache, token_slots
from .receiver import LayerSource, SocketReceiver
from .sender import HeldFrames, LayerSink, SocketSender
from .wire import HEADER, Frame, FrameType, expect_frame

log = logging.getLogger(__name__)

# where the NIXL Python API lives: the meta package, else a CUDA variant wheel on its own
API_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")
INSTALL_HINT = "pip install 'splitserve[nixl]' (NIXL with UCX: nixl-cu13, or nixl-cu12 for a CUDA 12 torch)"
POLL_S = 0.0  # a pump yields (GIL) between polls while WRITEs are in flight
LINGER_S = 1.0  # the receiver keeps progressing this long after its last transfer
SETTLE_S = 0.05  # after a sender's EOF without a stop acknowledgement
WATCH_PERIOD_S = 0.05  # a sender pump's select timeout when it has nothing in flight
REMOTE_AGENTS = 16  # receivers a sender keeps added (oldest removed)
POOL_BUFFERS = 4  # registered staging buffers a sender keeps for later transfers
RING_BYTES = 64 << 20  # a transfer's staging ring: up to this many bytes of layers in flight
MIN_SLOTS = 2
_API: ModuleType | None = None
_PROBED: dict[bool, str | None] = {}  # probe(gpu)'s finding, per gpu
_PROBE_LOCK = threading.Lock()


def nixl_api() -> ModuleType:
    """NIXL's Python API, imported on first use; BACKEND_UNAVAILABLE with the fix if absent."""
    global _API
    if _API is None:
        errors = []
        raise_exceptions = logging.raiseExceptions
        for name in API_MODULES:
            try:
                _API = importlib.import_module(name)
                break
            except ImportError as exc:
                errors.append(f"{name}: {exc}")
        else:
            raise TransferError(
                FailureReason.BACKEND_UNAVAILABLE,
                f"the nixl KV backend needs NIXL: {INSTALL_HINT}; tried {'; '.join(errors)}",
            )
        _tame_logging(raise_exceptions)
    return _API


def _tame_logging(raise_exceptions: bool) -> None:
    """NIXL's import configures logging for the whole process: INFO lines on stdout (a worker's
    stdout is its output, e.g. the peer protocol of our tests) and ``logging.raiseExceptions``
    off. Its records go through our handlers instead, at WARNING unless NIXL_LOG_LEVEL says."""
    logging.raiseExceptions = raise_exceptions
    nixl_log = logging.getLogger("nixl")
    for handler in list(nixl_log.handlers):
        nixl_log.removeHandler(handler)
    nixl_log.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        nixl_log.setLevel(logging.WARNING)


def make_agent(role: str) -> Any:
    """A NIXL agent with UCX, no progress thread (see module doc), safe for many threads."""
    api = nixl_api()
    config = api.nixl_agent_config(
        enable_prog_thread=False, backends=["UCX"],
        sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
    )
    try:
        agent = api.nixl_agent(f"splitserve-{role}-{uuid.uuid4().hex[:12]}", config)
    except Exception as exc:  # noqa: BLE001 - NIXL raises its own (nixlBackendError) or RuntimeError
        raise TransferError(FailureReason.BACKEND_UNAVAILABLE,
                            f"NIXL could not create its UCX backend: {exc!r}") from exc
    if "UCX" not in agent.backends:
        raise TransferError(FailureReason.BACKEND_UNAVAILABLE, "NIXL has no UCX plugin here")
    return agent


def probe(gpu: bool) -> str | None:
    """Why nixl cannot run in this process (None: it can): NIXL imports, an agent with the UCX
    backend is created, and a small buffer (on the GPU too with ``gpu``) registers with it. An
    end offers nixl only where this passes: importing the package proves nothing about UCX (its
    transports, the devices it may open). Once per process, however many threads ask at once
    (a prefill's first transfers do); the finding is logged at INFO."""
    with _PROBE_LOCK:
        if gpu not in _PROBED:
            _PROBED[gpu] = _probe(gpu)
        return _PROBED[gpu]


def _probe(gpu: bool) -> str | None:
    start = time.monotonic()
    try:
        agent = make_agent("probe")
        for device in ("cpu", "cuda") if gpu else ("cpu",):
            buffer = torch.zeros(4096, dtype=torch.uint8, device=device)
            agent.deregister_memory(agent.register_memory(buffer))
    except Exception as exc:  # noqa: BLE001 - any failure means: do not offer nixl
        why = exc.message if isinstance(exc, TransferError) else repr(exc)
        log.info("nixl probe: not usable here, not offered (%s; UCX_TLS=%s)",
                 why, os.environ.get("UCX_TLS", "unset"))
        return why
    log.info("nixl probe: UCX agent made and %s memory registered in %.2f s (UCX_TLS=%s): "
             "offered", "host and GPU" if gpu else "host", time.monotonic() - start,
             os.environ.get("UCX_TLS", "unset"))
    return None


def mem_type(tensor: torch.Tensor) -> tuple[str, int]:
    """NIXL's memory type and device id of ``tensor``."""
    return ("VRAM", tensor.device.index or 0) if tensor.is_cuda else ("DRAM", 0)


# ----------------------------------------------------------------------------- receiver side
class _Inbox:
    """One transfer's arrived layers, and a pipe that wakes its handler (select-able beside the
    transfer's socket)."""

    def __init__(self) -> None:
        self.layers: set[int] = set()
        self.read_fd, self.write_fd = os.pipe()

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"x")
        except OSError as exc:  # closed meanwhile: nobody waits any more
            log.debug("kv nixl inbox wake-up: %s", exc)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class _Notifications:
    """Drives the receiver's agent while a transfer is granted (and ``LINGER_S`` after) and hands
    each notification ``tag:layer`` to the transfer that ``tag`` names."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._lock = threading.Lock()
        self._inboxes: dict[str, _Inbox] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def open(self, tag: str) -> _Inbox:
        inbox = _Inbox()
        with self._lock:
            self._inboxes[tag] = inbox
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-nixl-notifs",
                                                daemon=True)
                self._thread.start()
        return inbox

    def forget(self, tag: str) -> None:
        with self._lock:
            inbox = self._inboxes.pop(tag, None)
        if inbox is not None:
            inbox.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(5.0)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                if self._inboxes:
                    idle_since = time.monotonic()
                elif self._closed or time.monotonic() - idle_since > LINGER_S:
                    self._thread = None
                    return
            try:
                notifs = self._agent.get_new_notifs()
            except Exception as exc:  # noqa: BLE001 - keep serving; handlers time out
                log.warning("kv nixl: reading notifications failed: %s", exc)
                notifs = {}
            if not notifs:
                time.sleep(POLL_S if self._inboxes else 0.01)
                continue
            self._dispatch(notifs)

    def _dispatch(self, notifs: dict[str, list[bytes]]) -> None:
        with self._lock:
            for messages in notifs.values():
                for message in messages:
                    tag, _, layer = bytes(message).decode(errors="replace").rpartition(":")
                    inbox = self._inboxes.get(tag)
                    if inbox is not None and layer.isdigit():
                        inbox.layers.add(int(layer))
                        inbox.wake()


class NixlSource(GrantedSource):
    """Receiver side of one transfer: grants the blocks, waits for every layer's notification
    after the last note, and on failure waits until the sender stopped writing."""

    def __init__(self, receiver: SocketReceiver, registration: CacheRegistration,
                 hello: dict[str, Any], nbytes: int) -> None:
        peer = hello.get("nixl")
        if not isinstance(peer, dict) or not isinstance(peer.get("agent"), str):
            raise TransferError(FailureReason.PROTOCOL_ERROR, "HELLO lacks nixl {agent}")
        super().__init__(peer)
        self._receiver = receiver
        self._registration = registration
        self._num_layers = receiver.spec.num_layers
        self._tag = uuid.uuid4().hex
        self._inbox: _Inbox | None = None
        self._aborted: TransferError | None = None

    def accepted(self, sock: socket.socket, writer: PagedWriter) -> None:
        rx = self._receiver
        if rx.kv_cache.is_cuda:  # our own kernels on these blocks finish before the WRITEs
            torch.cuda.current_stream(rx.kv_cache.device).synchronize()
        self._inbox = self._registration.notifications.open(self._tag)
        self.grant(sock, {"nixl": {**self._registration.grant_fields, "tag": self._tag},
                          "blocks": writer.blocks, "block_size": rx.spec.block_size,
                          "num_blocks": rx.kv_cache.shape[2]})

    def read_into(
        self, sock: socket.socket, frame: Frame, layer: int, writer: PagedWriter
    ) -> None:
        if frame.payload_len:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "nixl LAYER frames carry no data")
        if layer == self._num_layers - 1:  # every note is in: wait for every WRITE's bytes
            self._await_layers(sock, time.monotonic() + self._receiver.io_timeout)

    def _await_layers(self, sock: socket.socket, deadline: float) -> None:
        """Until every layer's notification arrived; fail fast on an abort, the sender's ERROR
        or EOF (END may arrive first: then only the notifications are waited for)."""
        inbox = self._inbox
        watch = [sock, inbox.read_fd]
        while len(inbox.layers) < self._num_layers:
            if self._aborted is not None:
                raise self._aborted
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferError(FailureReason.TIMEOUT, "NIXL writes did not land in time")
            ready = select.select(watch, [], [], min(remaining, WATCH_PERIOD_S))[0]
            if inbox.read_fd in ready:
                os.read(inbox.read_fd, 4096)
            if sock in ready:
                head = sock.recv(HEADER.size, socket.MSG_PEEK)
                if not head or (len(head) > 5 and head[5] == FrameType.ERROR):
                    expect_frame(sock, FrameType.END)  # raises the peer's error or PeerClosed
                watch = [inbox.read_fd]  # END: the sender's WRITEs are complete

    def interrupt(self, sock: socket.socket, err: TransferError) -> None:
        self._aborted = err
        if self._inbox is not None:
            self._inbox.wake()
        super().interrupt(sock, err)  # the sender's EOF then wakes a handler in recv

    def settle(self) -> None:
        time.sleep(SETTLE_S)  # bytes already on this host land (the notifications thread runs)

    def close(self) -> None:
        super().close()
        if self._inbox is not None:
            self._registration.notifications.forget(self._tag)
            self._inbox = None


class NixlReceiver(SocketReceiver):
    """Decode side; the paged cache (host or GPU memory) is registered with NIXL once."""

    backend = "nixl"

    def __init__(self, spec: KVSpec, kv_cache: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        check_cache(spec, kv_cache)
        self.registration = CacheRegistration(kv_cache)
        super().__init__(spec, kv_cache, *args, **kwargs)

    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        return NixlSource(self, self.registration, hello, nbytes)

    def close(self) -> None:
        super().close()
        self.registration.close()


class CacheRegistration:
    """A receiver's paged cache registered with its own NIXL agent (once), what a grant tells
    senders about it, and the thread that reads the agent's notifications."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.agent = make_agent("rx")
        try:
            self._registered = self.agent.register_memory(kv_cache)
        except Exception as exc:  # noqa: BLE001 - NIXL's own errors: the backend cannot serve
            raise TransferError(FailureReason.BACKEND_UNAVAILABLE,
                                f"NIXL could not register the KV cache: {exc!r}") from exc
        mem, device = mem_type(kv_cache)
        self.grant_fields = {
            "agent": self.agent.name, "mem": mem, "device": device, "base": kv_cache.data_ptr(),
            "metadata": base64.b64encode(self.agent.get_agent_metadata()).decode("ascii"),
        }
        self.notifications = _Notifications(self.agent)

    def close(self) -> None:
        self.notifications.close()


# ----------------------------------------------------------------------------- sender side
def ring_slots(nbytes: int, num_layers: int) -> int:
    """Slots of a transfer's staging ring: each WRITE completes only after a round trip (the
    flush before its notification), so a ring of two layers leaves the link idle most of the
    time; as many layers as fit in ``RING_BYTES`` keep it busy."""
    return max(MIN_SLOTS, min(num_layers, RING_BYTES // max(nbytes, 1)))


class _Grant:
    """Where one transfer writes: the receiver (added to our agent) and, per layer, the remote
    and staging offsets of each run of consecutive blocks."""

    def __init__(self, meta: dict[str, Any], sender: NixlSender, num_tokens: int) -> None:
        info, blocks = meta.get("nixl"), meta.get("blocks")
        block_size, num_blocks = meta.get("block_size"), meta.get("num_blocks")
        if not isinstance(info, dict) or not isinstance(blocks, list) or not all(
            isinstance(v, int) and not isinstance(v, bool)
            for v in (block_size, num_blocks, info.get("base"), info.get("device"))
        ) or info.get("mem") not in ("DRAM", "VRAM") or not isinstance(info.get("tag"), str):
            raise TransferError(FailureReason.PROTOCOL_ERROR, "bad nixl grant")
        spec = sender.spec
        try:
            token_slots(blocks, num_tokens, block_size, num_blocks)  # validates the table
        except ValueError as exc:
            raise TransferError(FailureReason.PROTOCOL_ERROR, f"bad grant: {exc}") from exc
        row = spec.num_kv_heads * spec.head_dim * spec.element_size
        runs = np.array(_block_runs(blocks, num_tokens, block_size, num_blocks, row),
                        dtype=np.uint64).reshape(-1, 3)
        self.remote = sender.remote_agent(info)
        self.tag = info["tag"]
        self.mem = info["mem"]
        self.device = info["device"]
        self.layer_stride = 2 * num_blocks * block_size * row
        self.base = int(info["base"])
        self.cache_offsets, self.wire_offsets, self.lengths = runs[:, 0], runs[:, 1], runs[:, 2]

    def descs(self, layer: int, local: int, local_device: int) -> tuple[np.ndarray, np.ndarray]:
        """(local, remote) Nx3 descriptor arrays (address, length, device) of one layer."""
        n = len(self.lengths)
        remote = np.empty((n, 3), dtype=np.uint64)
        remote[:, 0] = self.base + layer * self.layer_stride + self.cache_offsets
        remote[:, 1], remote[:, 2] = self.lengths, self.device
        loc = np.empty((n, 3), dtype=np.uint64)
        loc[:, 0] = local + self.wire_offsets
        loc[:, 1], loc[:, 2] = self.lengths, local_device
        return loc, remote


class NixlSink(LayerSink):
    """Sender side of one transfer: stages each layer in a registered slot; a pump thread posts
    the WRITEs, drives them to completion, frees slots and watches for stop requests."""

    def __init__(self, sender: NixlSender, nbytes: int) -> None:
        self._sender = sender
        self._nbytes = nbytes
        self._num_tokens = nbytes // sender.spec.layer_nbytes(1)
        self._cond = threading.Condition()
        self._slots = ring_slots(nbytes, sender.spec.num_layers)
        self._free: list[int] = list(range(self._slots))
        self._queued: list[tuple[int, int, torch.cuda.Event | None]] = []  # layer, slot, ready
        self._inflight: list[tuple[int, Any]] = []  # slot, xfer handle
        self._error: TransferError | None = None  # a WRITE failed
        self._revoked: TransferError | None = None
        self._by_peer = False
        self._ack_due = False  # the receiver asked us to stop: half-close once drained
        self._notes = HeldFrames(nbytes)
        self._grant: _Grant | None = None
        self._buffer: tuple[torch.Tensor, Any] | None = None
        self._sock: socket.socket | None = None
        self._pump: threading.Thread | None = None
        self._closing = False

    def hello_fields(self) -> dict[str, Any]:
        return {"nixl": {"agent": self._sender.agent.name, "process": process_identity()}}

    def on_accept(self, sock: socket.socket) -> None:
        """Wait (I/O timeout) for the receiver's grant, stage, start the pump."""
        self._grant = _Grant(expect_frame(sock, FrameType.CREDIT).meta, self._sender,
                             self._num_tokens)
        self._sock = sock
        self._pump = threading.Thread(target=self._run, args=(sock,), daemon=True,
                                      name="kv-nixl-pump")
        self._pump.start()

    def write(self, sock: socket.socket, layer: int, tensor: torch.Tensor) -> None:
        if self._grant is None:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "no grant from the receiver")
        slot = self._take_slot(sock)
        if self._buffer is None:  # on the first layer: its device decides (unless pinned)
            device = self._sender.device or tensor.device
            self._buffer = self._sender.pool.take(self._slots * self._nbytes, device)
        staging = self._buffer[0]
        dst = staging[slot * self._nbytes : (slot + 1) * self._nbytes]
        dst.copy_(tensor.reshape(-1).view(torch.uint8), non_blocking=staging.is_cuda)
        ready = None
        if staging.is_cuda or tensor.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(staging.device if staging.is_cuda
                                                   else tensor.device))
        with self._cond:
            self._queued.append((layer, slot, ready))
            self._cond.notify_all()
        self._notes.send(sock, FrameType.LAYER, index=layer)

    def flush(self, sock: socket.socket) -> None:
        """The held notes go out; then every WRITE must have completed (END follows)."""
        self._notes.flush(sock)
        deadline = time.monotonic() + self._sender.io_timeout
        with self._cond:
            while self._queued or self._inflight:
                self._raise_if_stopped(sock)
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("NIXL writes did not complete")
            self._raise_if_stopped(sock)

    def drain(self) -> None:
        self.revoke(TransferError(FailureReason.ABORTED, "the sender stopped"))

    def revoke(self, err: TransferError, *, by_peer: bool = False) -> bool:
        """No WRITE is posted after this; True once those posted have completed."""
        deadline = time.monotonic() + STOP_WAIT_S
        with self._cond:
            if self._revoked is None:
                self._revoked, self._by_peer = err, by_peer
            self._queued.clear()
            self._cond.notify_all()
            if self._pump is None or threading.current_thread() is self._pump:
                return not self._inflight
            while self._inflight and time.monotonic() < deadline:
                self._cond.wait(0.05)
            if self._inflight:
                log.warning("kv nixl: %d WRITEs still in flight after %.1fs",
                            len(self._inflight), STOP_WAIT_S)
            return not self._inflight

    def close(self) -> None:
        drained = self.revoke(TransferError(FailureReason.CLOSED, "transfer closed"))
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._pump is not None:
            self._pump.join(5.0)
        if self._buffer is not None:
            if drained:  # else a WRITE may still read it: never reuse that memory
                self._sender.pool.give(self._buffer)
            self._buffer = None
        if self._grant is not None and (self._error is not None or not drained):
            self._sender.forget_agent(self._grant.remote)  # the receiver may be gone
        self._sender.forget_sink(self)

    # ---------------------------------------------------------------- internals
    def _take_slot(self, sock: socket.socket) -> int:
        deadline = time.monotonic() + self._sender.io_timeout
        with self._cond:
            while True:
                self._raise_if_stopped(sock)
                if self._free:
                    return self._free.pop()
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("no staging slot freed (receiver stalled)")

    def _raise_if_stopped(self, sock: socket.socket) -> None:
        if self._by_peer:  # the receiver's ERROR (or EOF) is on the socket: raise it
            expect_frame(sock)
        if self._revoked is not None:
            raise self._revoked
        if self._error is not None:
            raise self._error

    def _run(self, sock: socket.socket) -> None:
        """The pump: post, complete, watch (see the class doc)."""
        agent = self._sender.agent
        watching = True
        while True:
            with self._cond:
                if self._closing and not self._inflight:
                    return
                busy = bool(self._queued or self._inflight)
                if self._ack_due and not self._inflight:
                    self._ack_due = False
                    _half_close(sock)
                ready = [item for item in self._queued if item[2] is None or item[2].query()]
                for item in ready:
                    self._queued.remove(item)
            for layer, slot, _ in ready:
                self._post(agent, layer, slot)
            if self._inflight:
                self._complete(agent)
            if watching:
                watching = self._watch(sock, 0 if busy else WATCH_PERIOD_S)
            elif not busy:
                with self._cond:
                    self._cond.wait(WATCH_PERIOD_S)
            if busy:
                time.sleep(POLL_S)

    def _post(self, agent: Any, layer: int, slot: int) -> None:
        grant, staging = self._grant, self._buffer[0]
        mem, device = mem_type(staging)
        local, remote = grant.descs(layer, staging.data_ptr() + slot * self._nbytes, device)
        try:
            xfer = agent.initialize_xfer(
                "WRITE", agent.get_xfer_descs(local, mem), agent.get_xfer_descs(remote, grant.mem),
                grant.remote, f"{grant.tag}:{layer}".encode(),
            )
            state = agent.transfer(xfer)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own types; fail the transfer
            self._fail(TransferError(FailureReason.CONNECTION_LOST, f"NIXL WRITE failed: {exc}"))
            return
        with self._cond:
            self._inflight.append((slot, xfer))
        if state == "ERR":
            self._fail(TransferError(FailureReason.CONNECTION_LOST, "NIXL WRITE failed"))

    def _complete(self, agent: Any) -> None:
        with self._cond:
            inflight = list(self._inflight)
        for slot, xfer in inflight:
            state = agent.check_xfer_state(xfer)
            if state == "PROC":
                continue
            agent.release_xfer_handle(xfer)
            with self._cond:
                self._inflight.remove((slot, xfer))
                self._free.append(slot)
                self._cond.notify_all()
            if state == "ERR":
                self._fail(TransferError(FailureReason.CONNECTION_LOST,
                                         "NIXL WRITE failed (receiver gone?)"))

    def _fail(self, err: TransferError) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._queued.clear()
            self._cond.notify_all()  # the sending thread raises it at its next layer or flush

    def _watch(self, sock: socket.socket, timeout: float) -> bool:
        """Peek (never consume: the sending thread reads) at what the receiver sent. ERROR is a
        stop request, EOF means it is gone: stop posting, and half-close once the WRITEs in
        flight completed. False once there is nothing more to watch for."""
        try:
            if not select.select([sock], [], [], timeout)[0]:
                return True
            head = sock.recv(HEADER.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, TimeoutError):
            return True
        except (OSError, ValueError):
            head = b""
        if 0 < len(head) < 6:
            return True  # the rest of the header is on its way
        if head and head[5] != FrameType.ERROR:
            return False  # DONE: the sending thread takes over
        self.revoke(TransferError(FailureReason.CONNECTION_LOST, "the receiver stopped it"),
                    by_peer=True)
        with self._cond:
            self._ack_due = bool(head)
        return False


class _BufferPool:
    """Registered staging buffers, kept for later transfers (registering costs a system call
    or a GPU IPC handle; a transfer should not pay it)."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._lock = threading.Lock()
        self._free: list[tuple[torch.Tensor, Any]] = []

    def take(self, nbytes: int, device: torch.device) -> tuple[torch.Tensor, Any]:
        with self._lock:
            fits = [i for i, (t, _) in enumerate(self._free)
                    if t.numel() >= nbytes and t.device == device]
            if fits:  # by index: list.remove would compare tensors with ==, element by element
                return self._free.pop(min(fits, key=lambda i: self._free[i][0].numel()))
        size = 1 << max(16, (nbytes - 1).bit_length())
        tensor = torch.empty(size, dtype=torch.uint8, device=device)
        return tensor, self._agent.register_memory(tensor)

    def give(self, buffer: tuple[torch.Tensor, Any]) -> None:
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: -b[0].numel())
            extra = self._free[POOL_BUFFERS:]
            del self._free[POOL_BUFFERS:]
        for _, reg in extra:
            self._agent.deregister_memory(reg)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for _, reg in free:
            self._agent.deregister_memory(reg)


class NixlSender(SocketSender):
    """Prefill side. ``device`` pins where the staging ring lives; by default it is where the
    layers are (a GPU prefill's layers go GPU to GPU, with no host copy)."""

    backend = "nixl"
    layer_device: ClassVar[str | None] = None

    def __init__(self, spec: KVSpec, *, device: torch.device | str | int | None = None,
                 **kwargs: Any) -> None:
        self.device = None if device is None else (
            torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # pool matches it
        self.agent = make_agent("tx")
        self.pool = _BufferPool(self.agent)
        self._agents_lock = threading.Lock()
        self._remotes: dict[str, float] = {}  # agent name -> last use
        self._sinks: set[NixlSink] = set()
        super().__init__(spec, **kwargs)

    def open_sink(self, nbytes: int) -> LayerSink:
        sink = NixlSink(self, nbytes)
        with self._agents_lock:
            self._sinks.add(sink)
        return sink

    def forget_sink(self, sink: NixlSink) -> None:
        with self._agents_lock:
            self._sinks.discard(sink)

    def remote_agent(self, info: dict[str, Any]) -> str:
        """The receiver's agent name, added to ours on first use (bounded, oldest removed)."""
        name = info.get("agent")
        if not isinstance(name, str):
            raise TransferError(FailureReason.PROTOCOL_ERROR, "grant lacks nixl agent")
        with self._agents_lock:
            if name in self._remotes:
                self._remotes[name] = time.monotonic()
                return name
        try:
            added = self.agent.add_remote_agent(base64.b64decode(info.get("metadata") or ""))
        except Exception as exc:  # noqa: BLE001 - bad metadata or unreachable peer
            raise TransferError(FailureReason.BACKEND_UNAVAILABLE,
                                f"cannot add the receiver's NIXL agent: {exc}") from exc
        added = added.decode() if isinstance(added, bytes) else str(added)
        if added != name:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "grant names another agent")
        with self._agents_lock:
            self._remotes[name] = time.monotonic()
            while len(self._remotes) > REMOTE_AGENTS:
                oldest = min(self._remotes, key=self._remotes.__getitem__)
                self._drop_remote_locked(oldest)
        return name

    def forget_agent(self, name: str) -> None:
        with self._agents_lock:
            self._drop_remote_locked(name)

    def _drop_remote_locked(self, name: str) -> None:
        if self._remotes.pop(name, None) is not None:
            try:
                self.agent.remove_remote_agent(name)
            except Exception as exc:  # noqa: BLE001 - already gone: nothing to release
                log.debug("kv nixl: remove_remote_agent(%s): %s", name, exc)

    def close(self) -> None:
        """Stop every transfer's WRITEs first (receivers read our disconnect as 'stopped'),
        then disconnect from every receiver and release the staging memory."""
        with self._agents_lock:
            sinks = list(self._sinks)
        for sink in sinks:
            sink.revoke(TransferError(FailureReason.CLOSED, "sender closed"))
        super().close()
        with self._agents_lock:
            for name in list(self._remotes):
                self._drop_remote_locked(name)
        self.pool.close()


def _half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        log.debug("kv nixl half-close: %s", exc)
