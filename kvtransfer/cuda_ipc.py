"""CUDA IPC backend (processes on one host, GPU to GPU): the sender writes straight into the
receiver's paged cache; bulk bytes never leave the GPUs and nothing is staged or copied twice.

Control uses the TCP connection, handshake and faults of the other socket backends; the data path:

* The receiver shares its paged cache once, when it is made: the fields of
  ``UntypedStorage._share_cuda_()`` as JSON (bytes base64, never pickle) plus the GPU's UUID, so
  a sender finds the same physical GPU under any ``CUDA_VISIBLE_DEVICES``.
* HELLO {cuda_ipc: {nonce, uuid, process}} -> ACCEPT -> the receiver makes sure its own earlier
  work on the blocks is done (one stream sync), then grants the destination: CREDIT {cuda_ipc:
  the cache's handle and shape, blocks, block_size, num_blocks} in the *receiver's* layout; the
  sender turns it into flat slots with ``layout.token_slots`` (block sizes may differ).
* The sender opens the handle once per receiver (a bounded LRU, dropped after ``MAPPING_IDLE_S``
  unused or when a transfer to it failed) and, per layer, enqueues one ``index_copy_`` from the
  layer tensor into the receiver's cache on the sending thread's current stream (where prefill
  computed the layer, so no cross-stream sync and no CPU sync) and re-records one CUDA event.
  LAYER {layer} frames carry no payload: they are progress notes, sent in batches (at most
  ``NOTE_PERIOD_S`` late) because a send per layer cost as much CPU as the scatter itself.
  After the last layer the sender waits for the event, then sends the notes left and END: when
  the receiver reads END every byte has landed, so DONE means what it means for every backend.
* A CPU cache cannot be shared over CUDA IPC: its receiver grants a GPU staging buffer of the
  whole transfer instead, the sender syncs per layer, and the receiver copies each layer out of
  the buffer when its LAYER arrives (a test and fallback configuration, not a fast path).
* Same process (tests, a colocated worker; a handle cannot be opened by the process that made
  it): the grant's nonce says so and the sender uses the receiver's tensor directly.

Block ownership. The sender writes memory the decode side owns, asynchronously, so the receiver
resolves a transfer only once nothing can land in its blocks any more:

* success: END is sent after the sender waited for its last scatter;
* the sender fails: it waits for every scatter it enqueued (``drain``) before it sends ERROR or
  closes its connection, on every path (``SocketSender`` drains a sink before it tells the
  receiver, ``CudaIpcSink.close`` before the socket closes, ``CudaIpcSender.close`` before it
  shuts its sockets);
* the receiver fails it (cancel, timeout, close, no space, a bad frame): it sends ERROR as a stop
  request and keeps the transfer open. A watcher thread of the sender sees the request even
  while the sending thread is busy elsewhere (computing the next layer), revokes the grant
  (no write starts after it), waits for the scatters already enqueued and half-closes the
  connection: that EOF is the sender's acknowledgement, and only then does the future fail;
* the sender process dies: the kernel closes its socket and the driver tears down its CUDA
  context, which stops its queued work, but in no guaranteed order. After an EOF the receiver
  therefore checks the sender process (pid, PID namespace and start time from HELLO) in
  ``/proc`` and waits while any of its threads is still exiting; a zombie or reaped process has
  released its GPU context. Where the sender lives in another PID namespace the receiver cannot
  look and waits ``UNSEEN_EXIT_GRACE_S`` instead (a heuristic: run both in one pod, or share
  the process namespace, for the guarantee);
* a sender that neither acknowledges nor disconnects within ``STOP_WAIT_S`` of the stop request
  (a wedged process) is given up on with a warning: writes still queued on its GPU could then
  land late. Keep the decode side's own wait for the future longer than that.

A sender dying mid-transfer still ends its connection, so the receiver fails at once (plus the
exit check); the mapping of the receiver's cache is dropped from the sender's LRU on failure.
"""

from __future__ import annotations

import base64
import collections
import logging
import math
import os
import select
import socket
import threading
import time
import uuid
import weakref
from typing import Any, ClassVar

import torch

from .base import FailureReason, KVSpec, TransferError
from .layout import PagedWriter, check_cache, token_slots
from .receiver import LayerSource, SocketReceiver
from .sender import LayerSink, SocketSender
from .wire import HEADER, Frame, FrameType, error_meta, expect_frame, send_frame

log = logging.getLogger(__name__)

MAPPING_CACHE = 16  # receivers' caches a process keeps open
MAPPING_IDLE_S = 60.0
STOP_WAIT_S = 4.0  # how long a failing receiver waits for the sender to stop writing
UNSEEN_EXIT_GRACE_S = 0.2  # after an EOF from a sender whose process we cannot see
WATCH_PERIOD_S = 0.5  # the watcher's select timeout (it is woken explicitly when done)
NOTE_PERIOD_S = 0.005  # longest a LAYER note is held back to share one send with later ones
PF_EXITING = 0x4  # task flag in /proc/<pid>/stat: the task is inside do_exit
_PROCESS_NONCE = uuid.uuid4().hex  # tells "same process" apart even across PID namespaces
_LOCAL_LOCK = threading.Lock()
_LOCAL_TARGETS: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
# (receiver nonce, token) -> (storage, last use): the receivers' tensors this process opened
_MAPPINGS: collections.OrderedDict[tuple[str, str], tuple[torch.UntypedStorage, float]] = (
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
    """Drop the IPC reference that ``_share_cuda_()`` took for its consumer: the shared tensor
    lives as long as its owner keeps it (a receiver's cache: the worker's life), not as long as
    some sender process still has it mapped."""
    if len(fields) < 6:
        return
    counter, offset = fields[4], fields[5]
    if isinstance(counter, bytes) and isinstance(offset, int):
        torch.UntypedStorage._release_ipc_counter_cuda(counter, offset)


def local_device(want_uuid: Any, fallback: int | None) -> int:
    """This process's index of the GPU with UUID ``want_uuid`` (``fallback`` when unknown)."""
    count = torch.cuda.device_count()
    if want_uuid is None:
        if fallback is None or not 0 <= fallback < count:
            raise TransferError(FailureReason.BACKEND_UNAVAILABLE, "the peer's GPU is not visible")
        return fallback
    for index in range(count):
        if gpu_uuid(index) == want_uuid:
            return index
    raise TransferError(
        FailureReason.BACKEND_UNAVAILABLE,
        f"the peer's GPU {want_uuid} is not visible here (peer on another host, or hidden by "
        "CUDA_VISIBLE_DEVICES)",
    )


# ----------------------------------------------------------------------------- sender process
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _read_stat(path: str) -> tuple[str, int, int]:
    """(state, flags, start time) of a task from its ``stat`` file (the name may hold spaces)."""
    with open(path) as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return rest[0], int(rest[6]), int(rest[19])


def process_identity() -> dict[str, Any]:
    """Who is writing: enough for the receiver to watch this process exit (see module doc)."""
    try:
        start: int | None = _read_stat("/proc/self/stat")[2]
    except (OSError, ValueError, IndexError):
        start = None
    return {"pid": os.getpid(), "ns": _pid_namespace(), "start": start}


def exit_state(process: Any) -> str:
    """"running" (no thread exiting), "exiting", "gone" (zombie or reaped) or "unseen" (another
    PID namespace, or no /proc): the state of the process that :func:`process_identity` named."""
    if not isinstance(process, dict) or process.get("ns") is None:
        return "unseen"
    if process["ns"] != _pid_namespace():
        return "unseen"
    pid = process.get("pid")
    try:
        tasks = os.listdir(f"/proc/{int(pid)}/task")
        if _read_stat(f"/proc/{int(pid)}/stat")[2] != process.get("start"):
            return "gone"  # the pid was reused: ours has been reaped
    except (OSError, ValueError, TypeError, IndexError):
        return "gone"
    alive = False
    for tid in tasks:
        try:
            state, flags, _ = _read_stat(f"/proc/{int(pid)}/task/{tid}/stat")
        except (OSError, ValueError, IndexError):
            continue  # that thread finished meanwhile
        if state in ("Z", "X"):
            continue
        if flags & PF_EXITING:
            return "exiting"
        alive = True
    return "running" if alive else "gone"


def await_exit_settled(process: Any, deadline: float) -> None:
    """After an EOF from a sender: return once its process is not part-way through exiting
    (a live sender drained before it closed; an exited one has no GPU context left)."""
    while True:
        state = exit_state(process)
        if state != "exiting":
            break
        if time.monotonic() >= deadline:
            log.warning("kv sender process %s still exiting; giving up waiting", process)
            return
        time.sleep(0.002)
    if state == "unseen":
        time.sleep(max(0.0, min(UNSEEN_EXIT_GRACE_S, deadline - time.monotonic())))


# ----------------------------------------------------------------------------- receiver side
class _Target:
    """A receiver tensor senders may write: registered for same-process senders, shared over
    CUDA IPC (JSON fields, never pickle) for the others when ``share``."""

    def __init__(self, tensor: torch.Tensor, *, share: bool) -> None:
        self.tensor = tensor
        self.token = uuid.uuid4().hex
        self.handle: list[Any] | None = None
        if share:
            try:
                fields = tensor.untyped_storage()._share_cuda_()
            except RuntimeError as exc:
                raise TransferError(
                    FailureReason.BACKEND_UNAVAILABLE, f"cannot share the KV cache: {exc}"
                ) from exc
            release_share(fields)
            self.handle = encode_handle(fields)
        self.uuid = gpu_uuid(tensor.device.index)
        with _LOCAL_LOCK:
            _LOCAL_TARGETS[self.token] = tensor

    def fields(self, *, reuse: bool) -> dict[str, Any]:
        """The grant's description of this tensor (``reuse``: worth keeping mapped)."""
        return {"token": self.token, "nonce": _PROCESS_NONCE, "uuid": self.uuid,
                "handle": self.handle, "shape": list(self.tensor.shape),
                "offset": self.tensor.storage_offset(), "reuse": reuse}


def staging_buffer(shape: tuple[int, ...], dtype: torch.dtype, peer_uuid: Any) -> torch.Tensor:
    """A whole transfer's landing buffer on the sender's GPU (for a receiver's CPU cache)."""
    index = local_device(peer_uuid, torch.cuda.current_device())
    return torch.empty(shape, dtype=dtype, device=torch.device("cuda", index))


class GrantedSource(LayerSource):
    """A layer source whose sender writes the receiver's memory itself once granted (cuda_ipc,
    nixl). So a failed transfer ends only when nothing can land any more: the receiver sends a
    stop request (ERROR) and waits for the sender's acknowledgement, its EOF, at most
    ``STOP_WAIT_S``; then for its process not to be part-way through exiting."""

    def __init__(self, peer: dict[str, Any]) -> None:
        self._peer = peer  # the HELLO's backend fields, with the sender's process identity
        self._lock = threading.Lock()  # the handler and interrupt() both send on the socket
        self._granted = self._stop_sent = False
        self._give_up: threading.Timer | None = None

    def grant(self, sock: socket.socket, grant: dict[str, Any]) -> None:
        """Send the grant (CREDIT): from now on the sender may write."""
        with self._lock:
            send_frame(sock, FrameType.CREDIT, grant)
            self._granted = True

    def interrupt(self, sock: socket.socket, err: TransferError) -> None:
        self._request_stop(sock, err)  # the sender's EOF then wakes the handler

    def stop(self, sock: socket.socket, err: TransferError) -> None:
        if not self._granted:
            return  # no grant, no writes
        self._request_stop(sock, err)
        deadline = time.monotonic() + STOP_WAIT_S
        if not _await_eof(sock, deadline):
            log.warning("kv sender of %s did not confirm it stopped writing within %.1fs",
                        err.request_id or "a transfer", STOP_WAIT_S)
            return
        await_exit_settled(self._peer.get("process"), deadline)
        self.settle()

    def settle(self) -> None:
        """After the sender stopped: wait for bytes already on their way (default: none)."""
        return None

    def close(self) -> None:
        with self._lock:
            if self._give_up is not None:
                self._give_up.cancel()

    def _request_stop(self, sock: socket.socket, err: TransferError) -> None:
        with self._lock:
            if self._stop_sent or not self._granted:
                return  # before the grant the handler notices the abort itself
            self._stop_sent = True
            try:
                send_frame(sock, FrameType.ERROR, error_meta(err))
            except OSError as exc:  # the sender is gone already: its EOF is what we wait for
                log.debug("could not ask the kv sender to stop: %s", exc)
            # a wedged sender never answers: wake the handler (blocked in recv) after the bound
            self._give_up = threading.Timer(STOP_WAIT_S, _give_up, (sock, err))
            self._give_up.daemon = True
            self._give_up.start()


class CudaIpcSource(GrantedSource):
    """Receiver side of one transfer: grants the destination, copies out of staging (CPU cache
    only), and on failure waits until the sender can no longer write (module doc)."""

    def __init__(self, receiver: CudaIpcReceiver, hello: dict[str, Any], nbytes: int) -> None:
        peer = hello.get("cuda_ipc")
        if not isinstance(peer, dict):
            raise TransferError(FailureReason.PROTOCOL_ERROR, "HELLO lacks cuda_ipc")
        super().__init__(peer)
        self._num_tokens = nbytes // receiver.spec.layer_nbytes(1)
        self._staging: torch.Tensor | None = None
        if receiver.shared_cache is not None:
            self._target = receiver.shared_cache
        else:  # a CPU cache: the sender fills a GPU buffer on its own GPU, we copy it out
            spec = receiver.spec
            self._staging = staging_buffer(
                (spec.num_layers, 2, 1, self._num_tokens, spec.num_kv_heads, spec.head_dim),
                receiver.kv_cache.dtype, peer.get("uuid"),
            )
            self._target = _Target(self._staging, share=peer.get("nonce") != _PROCESS_NONCE)

    def accepted(self, sock: socket.socket, writer: PagedWriter) -> None:
        target = self._target.tensor
        # our own earlier kernels on these blocks finish before another context writes them
        torch.cuda.current_stream(target.device).synchronize()
        if self._staging is None:
            layout = {"blocks": writer.blocks, "block_size": target.shape[3],
                      "num_blocks": target.shape[2]}
        else:
            layout = {"blocks": [0], "block_size": self._num_tokens, "num_blocks": 1}
        self.grant(sock, {"cuda_ipc": self._target.fields(reuse=self._staging is None),
                          "sync_each": self._staging is not None, **layout})

    def read_into(
        self, sock: socket.socket, frame: Frame, layer: int, writer: PagedWriter
    ) -> None:
        if frame.payload_len:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "cuda_ipc LAYER frames carry no data")
        if self._staging is not None:  # the sender synced before this LAYER: the bytes are here
            writer.from_tensor(layer, self._staging[layer].reshape(-1).view(torch.uint8))

    def close(self) -> None:
        super().close()
        self._staging = None


def _give_up(sock: socket.socket, err: TransferError) -> None:
    """The sender did not acknowledge a stop request in time: stop waiting for it."""
    log.warning("kv sender of %s did not acknowledge the stop within %.1fs; releasing the "
                "blocks anyway (writes still queued on its GPU could land late)",
                err.request_id or "a transfer", STOP_WAIT_S)
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError as exc:  # the handler closed it meanwhile
        log.debug("kv receiver give-up: %s", exc)


def _await_eof(sock: socket.socket, deadline: float) -> bool:
    """Read and drop whatever the sender still sends until it half-closes; False on timeout."""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            sock.settimeout(remaining)
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:  # reset: the connection is gone as well
            return True
    return False


class CudaIpcReceiver(SocketReceiver):
    """Decode side; the cache may be on any GPU of this host (or, staged, on the CPU)."""

    backend = "cuda_ipc"

    def __init__(self, spec: KVSpec, kv_cache: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        require_cuda("receiver")
        check_cache(spec, kv_cache)
        # shared once, before senders can arrive: every grant names it, senders keep it mapped
        self.shared_cache = _Target(kv_cache, share=True) if kv_cache.is_cuda else None
        super().__init__(spec, kv_cache, *args, **kwargs)

    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        return CudaIpcSource(self, hello, nbytes)


# ----------------------------------------------------------------------------- sender side
def _mapped(info: dict[str, Any], reuse: bool) -> torch.UntypedStorage:
    """The storage of another process's tensor: from the mapping cache, else opened now."""
    key = (str(info.get("nonce")), str(info.get("token")))
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
    storage = _open_handle(info)
    if reuse:
        with _LOCAL_LOCK:
            _MAPPINGS[key] = (storage, now)
            while len(_MAPPINGS) > MAPPING_CACHE:
                _MAPPINGS.popitem(last=False)
    return storage


def forget_mapping(info: dict[str, Any]) -> None:
    """Drop a cached mapping (its transfer failed: the receiver may be gone, and a mapping keeps
    a dead process's GPU memory allocated)."""
    with _LOCAL_LOCK:
        _MAPPINGS.pop((str(info.get("nonce")), str(info.get("token"))), None)


def _open_handle(info: dict[str, Any]) -> torch.UntypedStorage:
    """Open the receiver's CUDA IPC handle (never pickle: JSON fields of ``_share_cuda_()``)."""
    fields = info.get("handle")
    if not isinstance(fields, list) or len(fields) < 2 or not isinstance(fields[0], int):
        raise TransferError(FailureReason.PROTOCOL_ERROR, "bad cuda_ipc handle in the grant")
    fields = decode_handle(fields)
    fields[0] = local_device(info.get("uuid"), fields[0])
    try:
        return torch.UntypedStorage._new_shared_cuda(*fields)
    except RuntimeError as exc:  # e.g. another host's handle, or IPC not permitted
        raise TransferError(
            FailureReason.BACKEND_UNAVAILABLE, f"cannot open the receiver's CUDA IPC handle: {exc}"
        ) from exc


class _Grant:
    """Where one transfer writes: the receiver's tensor (mapped here) and the flat slots."""

    def __init__(self, meta: dict[str, Any], spec: KVSpec, num_tokens: int) -> None:
        info, blocks = meta.get("cuda_ipc"), meta.get("blocks")
        block_size, num_blocks = meta.get("block_size"), meta.get("num_blocks")
        if not isinstance(info, dict) or not isinstance(blocks, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (block_size, num_blocks)
        ):
            raise TransferError(FailureReason.PROTOCOL_ERROR, "bad cuda_ipc grant")
        self.info = info
        self.reuse = bool(info.get("reuse"))
        self.sync_each = bool(meta.get("sync_each"))
        shape = (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        if info.get("shape") != list(shape):
            raise TransferError(FailureReason.PROTOCOL_ERROR, f"grant shape {info.get('shape')}")
        self.target = self._open(info, shape, getattr(torch, spec.dtype))
        self.device = self.target.device
        # per layer (2, slots, H, D): one index_copy_ along dim 1 writes a layer's tokens
        self.flat = self.target.view(spec.num_layers, 2, num_blocks * block_size,
                                     spec.num_kv_heads, spec.head_dim)
        try:
            slots = token_slots(blocks, num_tokens, block_size, num_blocks)
        except ValueError as exc:
            raise TransferError(FailureReason.PROTOCOL_ERROR, f"bad grant: {exc}") from exc
        if self.target.is_cuda:  # a pageable copy would sync the stream, queued prefill and all
            slots = slots.pin_memory()
        self.slots = slots.to(self.target.device, non_blocking=True)

    def _open(self, info: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype
              ) -> torch.Tensor:
        if info.get("nonce") == _PROCESS_NONCE:  # same process: the receiver's own tensor
            with _LOCAL_LOCK:
                tensor = _LOCAL_TARGETS.get(str(info.get("token")))
            if tensor is None:
                raise TransferError(FailureReason.PROTOCOL_ERROR, "the receiver's cache is gone")
            return tensor
        storage = _mapped(info, self.reuse)
        offset = info.get("offset")
        end = (offset if isinstance(offset, int) else -1) + math.prod(shape)
        if not isinstance(offset, int) or offset < 0 or end * dtype.itemsize > storage.nbytes():
            raise TransferError(FailureReason.PROTOCOL_ERROR, "grant exceeds the shared memory")
        stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]  # contiguous
        return torch.empty(0, dtype=dtype, device=storage.device).set_(
            storage, offset, shape, stride)


def _scatter(grant: _Grant, layer: int, tensor: torch.Tensor, event: torch.cuda.Event) -> None:
    """Enqueue layer ``layer``'s scatter into the receiver's blocks on the current stream of the
    target's device (a layer elsewhere is copied over first: torch orders the two devices'
    streams) and re-record ``event`` after it: it completes once these bytes landed. The
    per-layer cost is CPU time (a few tens of microseconds), so nothing avoidable is done here."""
    if tensor.device != grant.device:
        tensor = tensor.to(grant.device)
    grant.flat[layer].index_copy_(1, grant.slots, tensor)
    event.record(torch.cuda.current_stream(grant.device))


class _Notes:
    """LAYER frames collected (``send_frame`` writes into it like a socket) for one send."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.since = time.monotonic()

    def sendall(self, data: bytes) -> None:
        self.parts.append(bytes(data))

    def flush(self, sock: socket.socket) -> None:
        if self.parts:
            sock.sendall(b"".join(self.parts))
            self.parts.clear()
        self.since = time.monotonic()


class CudaIpcSink(LayerSink):
    """Sender side of one transfer: scatters each layer into the receiver's cache, and stops
    (drains) promptly when the receiver asks, from a watcher thread (module doc)."""

    def __init__(self, sender: CudaIpcSender, nbytes: int) -> None:
        self._sender = sender
        self._num_layers = sender.spec.num_layers
        self._num_tokens = nbytes // sender.spec.layer_nbytes(1)
        self._lock = threading.Lock()  # a write is enqueued, or the grant revoked, not both
        self._revoked: TransferError | None = None
        self._by_peer = False  # revoked by the receiver: its ERROR (or EOF) is on the socket
        self._grant: _Grant | None = None
        self._event: torch.cuda.Event | None = None  # re-recorded after every scatter
        self._last: torch.cuda.Event | None = None  # set once something was recorded
        self._layers = 0
        self._notes = _Notes()
        self._sock: socket.socket | None = None
        self._watcher: threading.Thread | None = None
        self._closing = False

    def hello_fields(self) -> dict[str, Any]:
        return {"cuda_ipc": {"nonce": _PROCESS_NONCE, "uuid": gpu_uuid(self._sender.device.index),
                             "process": process_identity()}}

    def on_accept(self, sock: socket.socket) -> None:
        """Wait (I/O timeout) for the receiver's grant, open it, start watching for stops."""
        self._grant = _Grant(expect_frame(sock, FrameType.CREDIT).meta, self._sender.spec,
                             self._num_tokens)
        self._event = torch.cuda.Event()
        self._sock = sock
        self._watcher = threading.Thread(target=self._watch, args=(sock,), daemon=True,
                                         name="kv-cuda-ipc-watch")
        self._watcher.start()

    def write(self, sock: socket.socket, layer: int, tensor: torch.Tensor) -> None:
        grant = self._grant
        if grant is None:
            raise TransferError(FailureReason.PROTOCOL_ERROR, "no grant from the receiver")
        with self._lock:
            if self._by_peer:  # the receiver's ERROR is waiting on the socket: raise it
                expect_frame(sock)  # (or PeerClosed after a plain EOF)
            if self._revoked is not None:
                raise self._revoked
            _scatter(grant, layer, tensor, self._event)
            self._last = self._event
            self._layers += 1
            sync = grant.sync_each or layer == self._num_layers - 1
            if sync:
                self._event.synchronize()  # staging is read at LAYER; END needs every byte there
            send_frame(self._notes, FrameType.LAYER, index=layer)
            if sync or time.monotonic() - self._notes.since >= NOTE_PERIOD_S:
                self._notes.flush(sock)

    def drain(self) -> None:
        self.revoke(TransferError(FailureReason.ABORTED, "the sender stopped"))

    def revoke(self, err: TransferError, *, by_peer: bool = False) -> None:
        """No scatter starts after this; returns once those enqueued have landed."""
        with self._lock:
            if self._revoked is None:
                self._revoked, self._by_peer = err, by_peer
            last = self._last
        if last is not None:
            last.synchronize()

    def close(self) -> None:
        self.revoke(TransferError(FailureReason.CLOSED, "transfer closed"))
        self._closing = True
        if self._watcher is not None:
            try:
                self._sock.shutdown(socket.SHUT_RD)  # wakes the watcher's select at once
            except OSError as exc:
                log.debug("kv watcher wake-up: %s", exc)
            self._watcher.join(5.0)
        grant, self._grant = self._grant, None
        if grant is not None and (self._layers < self._num_layers or not grant.reuse):
            forget_mapping(grant.info)  # failed (the receiver may be gone) or single-use
        self._sender.forget_sink(self)

    def _watch(self, sock: socket.socket) -> None:
        """Peek (never consume: the sending thread reads) at what the receiver sends. ERROR is a
        stop request: revoke, drain, half-close (our acknowledgement). EOF: the receiver is
        gone, stop writing. DONE or anything else: the sending thread takes over."""
        while not self._closing:
            try:
                if not select.select([sock], [], [], WATCH_PERIOD_S)[0] or self._closing:
                    continue
                head = sock.recv(HEADER.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, TimeoutError):
                continue  # the sending thread read it first
            except (OSError, ValueError):
                head = b""
            if 0 < len(head) < 6:
                time.sleep(0.001)  # the rest of the header is on its way
                continue
            if head and head[5] != FrameType.ERROR:
                return
            self.revoke(TransferError(FailureReason.CONNECTION_LOST, "the receiver stopped it"),
                        by_peer=True)
            if head and not self._closing:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    log.debug("kv sender half-close: %s", exc)
            return


class CudaIpcSender(SocketSender):
    """Prefill side. Layers stay where they are (a GPU, or the CPU for tests); ``device`` is the
    GPU this sender runs on (default: current), announced to receivers by UUID."""

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
        self._sinks: set[CudaIpcSink] = set()
        self._sinks_lock = threading.Lock()
        super().__init__(spec, **kwargs)

    def open_sink(self, nbytes: int) -> LayerSink:
        sink = CudaIpcSink(self, nbytes)
        with self._sinks_lock:
            self._sinks.add(sink)
        return sink

    def forget_sink(self, sink: CudaIpcSink) -> None:
        with self._sinks_lock:
            self._sinks.discard(sink)

    def close(self) -> None:
        """Stop every transfer's writes first: receivers read our disconnect as 'stopped'."""
        with self._sinks_lock:
            sinks = list(self._sinks)
        for sink in sinks:
            sink.revoke(TransferError(FailureReason.CLOSED, "sender closed"))
        super().close()
