"""The decode-side engine shared by the socket backends (TCP, shared memory, CUDA IPC).

One listening socket; each arriving sender gets its own connection (one connection per
transfer) and its own thread for the connection's whole life. A backend only says where a layer's
bytes come from (:class:`LayerSource`): inline on the socket (TCP) or from shared memory (shm).

Threads take turns (leader/followers): one thread, the leader, accepts; when a connection
arrives it hands the leadership to a parked thread (or starts one, when none is parked) and
serves the connection itself, then leads again or parks. So the thread the kernel woke with the
connection handles it: no thread start (~0.1-0.15 ms on a busy 2-core machine) and no hand-over
on a transfer's path; a parked thread exits after ``IDLE_THREAD_S`` without work, except the
last one, kept as a spare so that a sender after a quiet spell pays no thread start either. The
leader also expires timed-out transfers every ``WATCHDOG_PERIOD_S``.

Life cycle of one connection: read HELLO -> check the spec -> wait (bounded) for expect() of that
request -> ACCEPT -> per layer: read, scatter into the blocks -> END -> resolve the future -> DONE.

Fast, certain failure: a dropped connection ends the handler's ``recv`` at once; cancel, timeout
and close shut the connection's read side, which wakes the handler the same way. The handler is
the only one that resolves a transfer that is streaming, after its last write into the blocks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from splitserve.trust import InternalSecret

from . import auth, metrics
from .base import FailureReason, KVReceiver, KVSpec, TransferError, TransferResult, TransferState
from .layout import PagedWriter, check_cache
from .metrics import report_choice
from .negotiate import Offer, choose, host_identity
from .wire import (
    Frame,
    FrameType,
    error_meta,
    expect_frame,
    send_frame,
    tune_socket,
)

log = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 0.05
IDLE_THREAD_S = 1.0  # a parked connection thread exits after this long without a connection
MAX_TOMBSTONES = 10_000


class LayerSource(ABC):
    """Where one connection's layer bytes come from (backend-specific)."""

    @abstractmethod
    def read_into(
        self, sock: socket.socket, frame: Frame, layer: int, writer: PagedWriter
    ) -> None:
        """Move the layer announced by ``frame`` into the blocks through ``writer``."""

    def release(self, sock: socket.socket, frame: Frame) -> None:
        """Called after the layer was scattered (shm: hand the slot back)."""
        return None

    def accepted(self, sock: socket.socket, writer: PagedWriter) -> None:
        """Called right after ACCEPT went out (cuda_ipc: grant the sender its destination)."""
        return None

    def interrupt(self, sock: socket.socket, err: TransferError) -> None:
        """Another thread (cancel, timeout, close) stops this streaming connection. Default: shut
        its read side, which wakes the handler at once (the handler is the only writer)."""
        _shutdown(sock, socket.SHUT_RD)

    def stop(self, sock: socket.socket, err: TransferError) -> None:
        """The transfer failed: return only once nothing can land in the blocks any more (the
        future is failed right after, and the decode side then frees the blocks). Default:
        nothing to wait for, the handler thread did every write itself."""
        return None

    def close(self) -> None:
        """Drop buffers / mappings."""
        return None


class SlotSource(LayerSource):
    """Reads layers from the slots of a :class:`~.sender.SlotSink`; hands each slot back with a
    CREDIT once it has been scattered."""

    def release(self, sock: socket.socket, frame: Frame) -> None:
        send_frame(sock, FrameType.CREDIT, {"slot": frame.meta["slot"]})


@dataclasses.dataclass(eq=False)
class _Entry:
    request_id: str
    num_tokens: int
    writer: PagedWriter
    future: concurrent.futures.Future
    deadline: float
    state: TransferState = TransferState.PENDING
    conn: socket.socket | None = None
    abort: TransferError | None = None
    streams: int = 1  # connections the sender uses (HELLO's + JOINs)
    lanes: list[socket.socket] = dataclasses.field(default_factory=list)  # joined, still open
    joined: set[int] = dataclasses.field(default_factory=set)
    lanes_open: int = 0  # lane handlers that may still write into the blocks
    lanes_done: int = 0  # lanes that delivered all their layers
    source: LayerSource | None = None  # the first connection's, once ACCEPT went out
    backend: str = ""  # the sender's (a negotiating receiver serves several): metrics' label


class SocketReceiver(KVReceiver):
    """Receiver over one TCP listening socket; subclasses provide :meth:`open_source`."""

    backend: ClassVar[str]

    def __init__(
        self,
        spec: KVSpec,
        kv_cache: torch.Tensor,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registration_wait: float = 10.0,
        io_timeout: float = 30.0,
        backlog: int = 256,
        staged: bool = False,
        secret: InternalSecret | None = None,
    ) -> None:
        """``registration_wait``: how long an early sender waits for expect(); ``io_timeout``:
        the longest stall of a connection; ``staged``: land every layer in a host buffer and
        index_copy_ it into the cache, as a non-CPU cache does (lets CPU tests cover that path);
        ``secret``: only senders that prove they hold it are served (``auth.py``).
        """
        if spec.backend != self.backend:
            raise ValueError(f"spec.backend is {spec.backend!r}, this receiver is {self.backend!r}")
        check_cache(spec, kv_cache)
        if registration_wait < 0 or io_timeout <= 0:
            raise ValueError("registration_wait must be >= 0 and io_timeout > 0")
        self.spec = spec
        self._spec_dict = spec.to_dict()
        self.kv_cache = kv_cache
        self.registration_wait = registration_wait
        self.io_timeout = io_timeout
        self.staged = staged
        self.secret = secret
        self._num_blocks = kv_cache.shape[2]
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._tombstones: collections.OrderedDict[str, tuple[float, TransferError]] = (
            collections.OrderedDict()
        )
        self._conns: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()  # threads serving a connection now
        self._closed = False
        self._next_expiry = 0.0  # the leader's only: when _expire runs next
        # the connection threads (module doc); their own lock, so that expect()'s notify_all
        # on self._cond never wakes a parked thread
        self._pool = threading.Condition()
        self._threads: set[threading.Thread] = set()  # every connection thread, alive
        self._parked = 0  # threads waiting in _follow() for the leadership
        self._leader = True  # some thread accepts (or is about to): the first one, below
        self._listener = socket.create_server((host, port), backlog=backlog)
        self._listener.settimeout(WATCHDOG_PERIOD_S)
        bound_port = self._listener.getsockname()[1]
        self._endpoint = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        self._thread_name = f"kv-{self.backend}-recv-{bound_port}"
        self._start_thread()

    # ----------------------------------------------------------------- backend hook
    @abstractmethod
    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        """The layer source for one connection, from the sender's HELLO (raise TransferError)."""

    def check_spec(self, theirs: KVSpec) -> None:
        """Refuse a sender whose spec does not match ours (TransferError naming the fields)."""
        self.spec.check_compatible(theirs)

    def offer(self) -> Offer:
        """What this receiver can do, for a negotiating sender: its own backend only."""
        return Offer((self.backend,), host_identity(), bool(self.kv_cache.is_cuda), self.backend)

    def prepare(self, backend: str) -> bool:
        """Called when a peer's offer picked ``backend``, before the answer goes out; False:
        it could not be set up and is no longer in :meth:`offer` (choose again)."""
        return True

    # ----------------------------------------------------------------- public API
    @property
    def endpoint(self) -> str:
        return self._endpoint

    def expect(
        self,
        request_id: str,
        num_tokens: int,
        block_table: Sequence[int],
        timeout: float = 30.0,
    ) -> concurrent.futures.Future[TransferResult]:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        # validates the table
        writer = PagedWriter(self.kv_cache, block_table, num_tokens, staged=self.staged)
        future: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # only the receiver resolves it
        with self._cond:
            if request_id in self._entries:
                raise ValueError(f"request {request_id!r} is already expected")
            tomb = self._tombstones.pop(request_id, None)
            if self._closed or tomb is not None:
                err = TransferError(FailureReason.CLOSED, "receiver is closed")
                self._fail_future(future, (tomb[1] if tomb else err).with_request(request_id))
                return future
            self._entries[request_id] = _Entry(
                request_id, num_tokens, writer, future, time.monotonic() + timeout
            )
            self._cond.notify_all()
        return future

    def cancel(self, request_id: str) -> bool:
        return self.reject(request_id, FailureReason.CANCELLED, "cancelled by the receiver")

    def reject(self, request_id: str, reason: FailureReason | str, message: str = "") -> bool:
        err = TransferError(reason, message, request_id=request_id)
        with self._cond:
            entry = self._entries.get(request_id)
            if entry is None:
                self._add_tombstone(request_id, err)
                self._cond.notify_all()
                return False
            self._abort_locked(entry, err)
            return True

    def close(self) -> None:
        err = TransferError(FailureReason.CLOSED, "receiver closed")
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for entry in list(self._entries.values()):
                self._abort_locked(entry, err.with_request(entry.request_id))
            claimed = {entry.conn for entry in self._entries.values()}
            for conn in self._conns - claimed:  # senders still in the handshake
                _shutdown(conn, socket.SHUT_RD)  # (claimed ones were stopped by _abort_locked)
            self._cond.notify_all()
        # New senders are refused at once (not left in the backlog while handlers wind down);
        # the leader's accept fails and, seeing _closed, it leaves.
        self._listener.close()
        with self._pool:
            self._pool.notify_all()  # parked threads exit
        deadline = time.monotonic() + 10.0  # any handler's wind-down (cuda_ipc: STOP_WAIT_S)
        while (threads := self._live_threads()) and time.monotonic() < deadline:
            for thread in threads:
                try:
                    thread.join(timeout=max(0.0, deadline - time.monotonic()))
                except RuntimeError:  # registered but not started yet: look again
                    time.sleep(0.001)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "pending": len(self._entries),
                "connections": len(self._conns),
                "handlers": len(self._handlers),
                "tombstones": len(self._tombstones),
            }

    # ----------------------------------------------------------------- bookkeeping
    def _add_tombstone(self, request_id: str, err: TransferError) -> None:
        """Remember a refusal so a sender (or expect) arriving later fails at once."""
        self._tombstones[request_id] = (time.monotonic() + 2 * self.registration_wait + 1, err)
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _abort_locked(self, entry: _Entry, err: TransferError) -> None:
        """Fail ``entry``: at once if no sender streams into it, else via its handler."""
        if entry.state == TransferState.PENDING:
            del self._entries[entry.request_id]
            self._add_tombstone(entry.request_id, err)
            self._fail_future(entry.future, err)
            self._cond.notify_all()
        elif entry.abort is None:
            entry.abort = err
            # a handler still in the handshake (no source yet) checks entry.abort after ACCEPT
            if entry.source is not None and entry.conn is not None:
                entry.source.interrupt(entry.conn, err)
            for conn in entry.lanes:
                _shutdown(conn, socket.SHUT_RD)  # wakes the lane handlers' recv
            self._cond.notify_all()

    def _release_locked(self, entry: _Entry) -> None:
        """Forget a claimed entry (before its future resolves, so stats() never lag behind)."""
        entry.conn = None
        if self._entries.get(entry.request_id) is entry:
            del self._entries[entry.request_id]

    def _fail_future(self, future: concurrent.futures.Future, err: TransferError) -> None:
        if not future.done():
            metrics.record_failure("receive", self.backend, err.reason)
            future.set_exception(err)

    # ----------------------------------------------------------------- threads
    def _start_thread(self) -> None:
        """Start a connection thread that begins as the leader (``self._leader`` is already
        set for it)."""
        thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        with self._pool:
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to spare: the caller leads again after its connection
            with self._pool:
                self._threads.discard(thread)
                self._leader = False
                self._pool.notify()  # a thread that parked meanwhile leads instead
            raise

    def _live_threads(self) -> list[threading.Thread]:
        with self._pool:
            return [t for t in self._threads if t is not threading.current_thread()]

    def _run(self) -> None:
        """A connection thread: lead (accept), serve what it accepted, then lead or park."""
        try:
            while True:
                conn = self._lead()
                if conn is None:
                    return
                self._serve_connection(conn)
                if not self._follow():
                    return
        finally:
            with self._pool:
                self._threads.discard(threading.current_thread())

    def _lead(self) -> socket.socket | None:
        """As the leader: accept the next connection and pass the leadership on before
        returning it; expire timed-out entries meanwhile. None once the receiver closed."""
        while not self._closed:
            self._expire_due()  # before accept: never between a connection and its handler
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed:
                    break
                log.warning("kv receiver accept failed: %s", exc)
                time.sleep(WATCHDOG_PERIOD_S)
                continue
            self._pass_lead()
            return conn
        with self._pool:
            self._leader = False
        return None

    def _pass_lead(self) -> None:
        """Make another thread the leader, so the next sender is accepted while this thread
        serves its connection (a parked one; else a new one)."""
        with self._pool:
            if self._parked:
                self._leader = False
                self._pool.notify()
                return
        try:
            self._start_thread()  # keeps self._leader set: the new thread leads
        except RuntimeError as exc:
            log.warning("kv receiver could not start a connection thread: %s", exc)

    def _follow(self) -> bool:
        """After a connection: lead if nobody does, else park until asked to lead. False when
        this thread should exit (closed, or parked for ``IDLE_THREAD_S``)."""
        with self._pool:
            deadline = time.monotonic() + IDLE_THREAD_S
            while not self._closed:
                if not self._leader:
                    self._leader = True
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not self._parked:  # stay as the one spare: a later sender then pays
                        deadline = time.monotonic() + IDLE_THREAD_S  # no thread start
                        continue
                    return False
                self._parked += 1
                try:
                    self._pool.wait(remaining)
                finally:
                    self._parked -= 1
            return False

    def _serve_connection(self, conn: socket.socket) -> None:
        with self._cond:
            if self._closed:
                conn.close()
                return
            self._conns.add(conn)
            self._handlers.add(threading.current_thread())
        self._handle(conn)

    def _expire_due(self) -> None:
        """Run :meth:`_expire` at most every WATCHDOG_PERIOD_S (the leader's, between accepts)."""
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + WATCHDOG_PERIOD_S
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            for entry in list(self._entries.values()):
                if entry.deadline <= now:
                    self._abort_locked(
                        entry,
                        TransferError(
                            FailureReason.TIMEOUT,
                            f"transfer not complete within its timeout ({entry.state.value})",
                            request_id=entry.request_id,
                        ),
                    )
            while self._tombstones:
                rid, (expiry, _) = next(iter(self._tombstones.items()))
                if expiry > now:
                    break
                del self._tombstones[rid]

    def _handle(self, conn: socket.socket) -> None:
        entry: _Entry | None = None
        request_id = "?"
        try:
            tune_socket(conn, self.io_timeout)
            first = expect_frame(conn, FrameType.HELLO, FrameType.JOIN, FrameType.OFFER)
            hello = first.meta
            request_id = str(hello.get("request_id", "?"))
            self._authenticate(conn, first, request_id)
            if first.type == FrameType.OFFER:  # a question, on behalf of request_id's transfer
                self._answer_offer(conn, hello)
                return
            if first.type == FrameType.JOIN:
                self._serve_lane(conn, hello)
                return
            entry = self._handshake(conn, hello)
            self._receive(conn, entry, hello)
        except Exception as exc:  # noqa: BLE001 - any failure fails the transfer, never the thread
            # OSError: PeerClosed, reset, shut down, stalled; TransferError; anything else (e.g.
            # out of GPU memory for a staging buffer) must still resolve the future with a reason
            self._finish_failed(conn, entry, _transfer_error(exc).with_request(request_id))
        finally:
            with self._cond:
                if entry is not None:
                    self._release_locked(entry)
                self._conns.discard(conn)
                self._handlers.discard(threading.current_thread())
            conn.close()

    def _authenticate(self, conn: socket.socket, first: Frame, request_id: str) -> None:
        """The shared-secret proof, before the connection may touch any transfer. A receiver
        without a secret serves any sender, so one that wants proof may fail its transfer at
        once; with a secret, an unproven peer can neither fill nor fail a transfer."""
        try:
            auth.authenticate_sender(conn, self.secret, first, self.backend)
        except TransferError as err:
            if self.secret is None and first.type in (FrameType.HELLO, FrameType.OFFER):
                self.reject(request_id, err.reason, err.message)
            raise

    def _answer_offer(self, conn: socket.socket, meta: dict[str, Any]) -> None:
        """A negotiating sender's question: answer with our offer; both ends then choose."""
        try:
            peer = Offer.from_dict(meta.get("offer") or {})
        except (TypeError, ValueError) as exc:
            raise TransferError(FailureReason.PROTOCOL_ERROR, str(exc)) from exc
        mine = self.offer()
        choice = choose(mine, peer)
        while not self.prepare(choice.backend):  # withdrawn: the rest of the offer
            mine = self.offer()
            choice = choose(mine, peer)
        send_frame(conn, FrameType.OFFER, {"offer": mine.to_dict()})
        report_choice("receive", _peer_host(conn), choice, peer)

    def _handshake(self, conn: socket.socket, hello: dict[str, Any]) -> _Entry:
        request_id = hello.get("request_id")
        num_tokens = hello.get("num_tokens")
        if not isinstance(request_id, str) or not isinstance(num_tokens, int):
            raise TransferError(FailureReason.PROTOCOL_ERROR, "HELLO needs request_id, num_tokens")
        if hello.get("spec") != self._spec_dict:  # the same spec needs no parsing (~15 us)
            try:
                theirs = KVSpec.from_dict(hello.get("spec") or {})
            except (TypeError, ValueError) as exc:
                raise TransferError(
                    FailureReason.PROTOCOL_ERROR, f"bad spec in HELLO: {exc}"
                ) from exc
            try:
                self.check_spec(theirs)
            except TransferError as err:
                self.reject(request_id, err.reason, err.message)  # fail it now or when expected
                raise
        return self._claim(request_id, num_tokens, conn)

    def _claim(self, request_id: str, num_tokens: int, conn: socket.socket) -> _Entry:
        """Wait (bounded) for expect(request_id), then mark the entry as streaming."""
        deadline = time.monotonic() + self.registration_wait
        with self._cond:
            while True:
                if self._closed:
                    raise TransferError(FailureReason.CLOSED, "receiver closed")
                tomb = self._tombstones.pop(request_id, None)
                if tomb is not None:
                    raise tomb[1]
                entry = self._entries.get(request_id)
                if entry is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferError(
                        FailureReason.UNKNOWN_REQUEST,
                        f"no expect() for this request within {self.registration_wait:g}s",
                    )
                self._cond.wait(remaining)
            if entry.state != TransferState.PENDING:
                raise TransferError(FailureReason.PROTOCOL_ERROR, "another sender is streaming it")
            if entry.num_tokens != num_tokens:
                err = TransferError(
                    FailureReason.HANDSHAKE_MISMATCH,
                    f"num_tokens: receiver expects {entry.num_tokens}, sender has {num_tokens}",
                    field="num_tokens", request_id=request_id,
                )
                self._abort_locked(entry, err)
                raise err
            entry.state = TransferState.TRANSFERRING
            entry.conn = conn
            return entry

    def _receive(self, conn: socket.socket, entry: _Entry, hello: dict[str, Any]) -> None:
        start = time.monotonic()
        nbytes = self.spec.layer_nbytes(entry.num_tokens)
        streams = hello.get("streams", 1)
        if not isinstance(streams, int) or not 1 <= streams <= min(16, self.spec.num_layers):
            raise TransferError(FailureReason.PROTOCOL_ERROR, f"bad streams {streams!r}")
        entry.backend = str(hello["spec"]["backend"])  # checked by the handshake
        source = self.open_source(hello, nbytes)
        try:
            with self._cond:
                entry.streams = streams
            send_frame(conn, FrameType.ACCEPT)
            source.accepted(conn, entry.writer)
            with self._cond:
                entry.source = source
                if entry.abort is not None:  # cancelled (etc.) during the handshake
                    raise entry.abort
            self._receive_layers(conn, entry, source, range(0, self.spec.num_layers, streams))
            end = expect_frame(conn, FrameType.END).meta
            self._wait_for_lanes(entry)
        except BaseException as exc:
            source.stop(conn, entry.abort or _transfer_error(exc))  # before the future fails
            raise
        finally:
            with self._cond:
                entry.source = None
            source.close()
            entry.writer.finish()
        first_token = end.get("first_token")
        seconds = time.monotonic() - start
        total = nbytes * self.spec.num_layers
        result = TransferResult(
            TransferState.DONE, entry.request_id, first_token, entry.num_tokens, total, seconds,
            meta=dict(hello.get("meta") or {}),
        )
        with self._cond:  # resolve under the lock so a racing timeout cannot fail it
            abort = entry.abort
            if abort is None:
                entry.state = TransferState.DONE
                self._release_locked(entry)
                metrics.record_success("receive", entry.backend, seconds)
                entry.future.set_result(result)
        if abort is not None:
            raise abort
        send_frame(conn, FrameType.DONE, {"bytes": total})

    def _receive_layers(
        self, conn: socket.socket, entry: _Entry, source: LayerSource, layers: range
    ) -> None:
        nbytes = self.spec.layer_nbytes(entry.num_tokens)
        count = 0
        try:
            for layer in layers:
                frame = expect_frame(conn, FrameType.LAYER)
                if frame.index != layer:
                    raise TransferError(
                        FailureReason.PROTOCOL_ERROR, f"expected layer {layer}, got {frame.index}"
                    )
                if entry.abort is not None:
                    raise entry.abort
                source.read_into(conn, frame, layer, entry.writer)
                count += 1
                source.release(conn, frame)
        finally:  # once per transfer (see SocketSender._stream_layers)
            if count:
                metrics.record_bytes("receive", entry.backend or self.backend, nbytes * count)

    def _wait_for_lanes(self, entry: _Entry) -> None:
        """After END: every extra connection must have delivered its layers."""
        deadline = time.monotonic() + self.io_timeout
        with self._cond:
            while entry.lanes_done < entry.streams - 1:
                if entry.abort is not None:
                    raise entry.abort
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferError(FailureReason.TIMEOUT, "parallel streams did not finish")
                self._cond.wait(remaining)

    def _serve_lane(self, conn: socket.socket, join: dict[str, Any]) -> None:
        """An extra connection of a multi-stream transfer: receive layers stream, stream+N, ...
        A lane never resolves the future; on failure it aborts the transfer, and the first
        connection's handler resolves it once every lane stopped writing."""
        entry: _Entry | None = None
        try:
            entry, stream = self._join(conn, join)
            source = self.open_source(join, self.spec.layer_nbytes(entry.num_tokens))
            try:
                send_frame(conn, FrameType.ACCEPT)
                self._receive_layers(
                    conn, entry, source, range(stream, self.spec.num_layers, entry.streams)
                )
            finally:
                source.close()
            with self._cond:
                entry.lanes_done += 1
                self._cond.notify_all()
        except (TransferError, OSError) as exc:
            err = exc if isinstance(exc, TransferError) else TransferError(
                FailureReason.TIMEOUT if isinstance(exc, TimeoutError)
                else FailureReason.CONNECTION_LOST, f"parallel stream failed: {exc}",
            )
            if entry is not None:
                with self._cond:
                    self._abort_locked(entry, err.with_request(entry.request_id))
                    err = entry.abort
            _send_error(conn, err)
        finally:
            if entry is not None:
                with self._cond:
                    entry.lanes_open -= 1
                    entry.lanes.remove(conn)
                    self._cond.notify_all()

    def _join(self, conn: socket.socket, join: dict[str, Any]) -> tuple[_Entry, int]:
        request_id, stream = join.get("request_id"), join.get("stream")
        with self._cond:
            entry = self._entries.get(request_id) if isinstance(request_id, str) else None
            if entry is None or entry.state != TransferState.TRANSFERRING:
                raise TransferError(FailureReason.PROTOCOL_ERROR, "no transfer to join")
            if entry.abort is not None:
                raise entry.abort
            if not isinstance(stream, int) or not 1 <= stream < entry.streams or (
                stream in entry.joined
            ):
                raise TransferError(FailureReason.PROTOCOL_ERROR, f"bad stream {stream!r}")
            entry.joined.add(stream)
            entry.lanes.append(conn)
            entry.lanes_open += 1
            return entry, stream

    def _finish_failed(
        self, conn: socket.socket, entry: _Entry | None, err: TransferError
    ) -> None:
        """Fail the entry (if this connection had claimed one) and tell the sender why."""
        if entry is not None:
            with self._cond:
                self._abort_locked(entry, err)  # stops the other lanes, if any
                err = entry.abort or err  # cancel / timeout / close caused the socket error
                deadline = time.monotonic() + 5.0
                while entry.lanes_open and time.monotonic() < deadline:  # they write no more
                    self._cond.wait(0.05)
                self._release_locked(entry)
                self._fail_future(entry.future, err)
        _send_error(conn, err)


def _transfer_error(exc: BaseException) -> TransferError:
    """What a handler's failure means for the transfer: a socket timeout is a stalled sender,
    any other socket error (EOF, reset, our own shutdown) a lost connection."""
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, TimeoutError):
        return TransferError(FailureReason.TIMEOUT, "sender stalled")
    if isinstance(exc, OSError):
        return TransferError(FailureReason.CONNECTION_LOST, f"sender connection lost: {exc}")
    return TransferError(FailureReason.PROTOCOL_ERROR, f"receiver failed: {exc!r}")


def _send_error(conn: socket.socket, err: TransferError) -> None:
    try:
        send_frame(conn, FrameType.ERROR, error_meta(err))
    except OSError as exc:  # the sender is gone; nobody left to tell
        log.debug("could not send ERROR to sender of %s: %s", err.request_id, exc)


def _peer_host(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return "?"


def _shutdown(conn: socket.socket, how: int) -> None:
    try:
        conn.shutdown(how)
    except OSError as exc:  # already closed by its handler: nothing left to wake
        log.debug("shutdown of kv connection failed: %s", exc)

