"""The decode side's table of transfers: what ``expect()`` announced, who streams into it, how
it ends.

One lock (a condition) guards every transfer, the refusals remembered for senders that come
late (tombstones) and the connections being served; a connection's session and the receiver's
public calls change a transfer only through this table. A transfer is ``PENDING`` from expect()
until a sender's HELLO claims it, then ``TRANSFERRING``; it ends when its future resolves.

Who resolves a future: a transfer nobody streams into yet fails here at once (cancel, timeout,
close); one that is streaming only gets ``abort`` set and its connections interrupted, and the
session of its first connection resolves it, after its last write into the blocks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

from . import metrics
from .base import FailureReason, TransferError, TransferResult, TransferState
from .layout import PagedWriter

if TYPE_CHECKING:
    from .receiver import LayerSource

log = logging.getLogger(__name__)

MAX_TOMBSTONES = 10_000
LANES_STOP_S = 5.0  # how long a failing transfer waits for its lanes to stop writing


@dataclasses.dataclass(eq=False)
class Transfer:
    """One expected transfer (guarded by the table's lock)."""

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


class TransferTable:
    """Transfers by request id, refusals remembered, connections being served."""

    def __init__(self, backend: str, registration_wait: float) -> None:
        """``backend``: the receiver's, for metrics; ``registration_wait``: how long an early
        sender waits for expect() (a refusal is remembered about twice as long)."""
        self.backend = backend
        self.registration_wait = registration_wait
        self.cond = threading.Condition()
        self._entries: dict[str, Transfer] = {}
        self._tombstones: collections.OrderedDict[str, tuple[float, TransferError]] = (
            collections.OrderedDict()
        )
        self._conns: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()  # threads serving a connection now
        self.closed = False

    # ----------------------------------------------------------------- the receiver's calls
    def expect(
        self, request_id: str, num_tokens: int, writer: PagedWriter, timeout: float
    ) -> concurrent.futures.Future[TransferResult]:
        future: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # only the receiver resolves it
        with self.cond:
            if request_id in self._entries:
                raise ValueError(f"request {request_id!r} is already expected")
            tomb = self._tombstones.pop(request_id, None)
            if self.closed or tomb is not None:
                err = TransferError(FailureReason.CLOSED, "receiver is closed")
                self.fail_future(future, (tomb[1] if tomb else err).with_request(request_id))
                return future
            self._entries[request_id] = Transfer(
                request_id, num_tokens, writer, future, time.monotonic() + timeout
            )
            self.cond.notify_all()
        return future

    def reject(self, request_id: str, err: TransferError) -> bool:
        """Fail ``request_id``'s transfer, or remember the refusal for a sender (or expect) to
        come. True when a transfer was expected."""
        with self.cond:
            entry = self._entries.get(request_id)
            if entry is None:
                self._add_tombstone(request_id, err)
                self.cond.notify_all()
                return False
            self._abort_locked(entry, err)
            return True

    def close(self, err: TransferError) -> bool:
        """Fail every transfer and stop the connections still in their handshake. False when
        already closed."""
        with self.cond:
            if self.closed:
                return False
            self.closed = True
            for entry in list(self._entries.values()):
                self._abort_locked(entry, err.with_request(entry.request_id))
            claimed = {entry.conn for entry in self._entries.values()}
            for conn in self._conns - claimed:  # senders still in the handshake
                shutdown(conn, socket.SHUT_RD)  # (claimed ones were stopped by _abort_locked)
            self.cond.notify_all()
        return True

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {
                "pending": len(self._entries),
                "connections": len(self._conns),
                "handlers": len(self._handlers),
                "tombstones": len(self._tombstones),
            }

    def expire(self) -> None:
        """Fail the transfers past their deadline; forget the refusals past theirs."""
        now = time.monotonic()
        with self.cond:
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

    # ----------------------------------------------------------------- connections
    def open_connection(self, conn: socket.socket) -> bool:
        """Count ``conn`` (and this thread) as served; False once the table is closed."""
        with self.cond:
            if self.closed:
                return False
            self._conns.add(conn)
            self._handlers.add(threading.current_thread())
            return True

    def close_connection(self, conn: socket.socket, entry: Transfer | None) -> None:
        with self.cond:
            if entry is not None:
                self._release_locked(entry)
            self._conns.discard(conn)
            self._handlers.discard(threading.current_thread())

    # ----------------------------------------------------------------- a session's calls
    def claim(self, request_id: str, num_tokens: int, conn: socket.socket) -> Transfer:
        """Wait (bounded) for expect(request_id), then mark the transfer as streaming."""
        deadline = time.monotonic() + self.registration_wait
        with self.cond:
            while True:
                if self.closed:
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
                self.cond.wait(remaining)
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

    def set_streams(self, entry: Transfer, streams: int) -> None:
        with self.cond:
            entry.streams = streams

    def attach_source(self, entry: Transfer, source: LayerSource) -> None:
        """The first connection's source, once ACCEPT went out; raises the abort that came
        during the handshake (a handler then had no source to interrupt)."""
        with self.cond:
            entry.source = source
            if entry.abort is not None:
                raise entry.abort

    def detach_source(self, entry: Transfer) -> None:
        with self.cond:
            entry.source = None

    def resolve(self, entry: Transfer, result: TransferResult, seconds: float) -> None:
        """Done: resolve under the lock, so a racing timeout cannot fail it; raise the abort
        that came first."""
        with self.cond:
            abort = entry.abort
            if abort is None:
                entry.state = TransferState.DONE
                self._release_locked(entry)
                metrics.record_success("receive", entry.backend, seconds)
                entry.future.set_result(result)
        if abort is not None:
            raise abort

    def join(self, request_id: object, stream: object, conn: socket.socket) -> Transfer:
        """An extra connection of a streaming transfer (stream ``stream``)."""
        with self.cond:
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
            return entry

    def lane_done(self, entry: Transfer) -> None:
        with self.cond:
            entry.lanes_done += 1
            self.cond.notify_all()

    def lane_closed(self, entry: Transfer, conn: socket.socket) -> None:
        with self.cond:
            entry.lanes_open -= 1
            entry.lanes.remove(conn)
            self.cond.notify_all()

    def wait_for_lanes(self, entry: Transfer, timeout: float) -> None:
        """After END: every extra connection must have delivered its layers."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while entry.lanes_done < entry.streams - 1:
                if entry.abort is not None:
                    raise entry.abort
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferError(FailureReason.TIMEOUT, "parallel streams did not finish")
                self.cond.wait(remaining)

    def abort(self, entry: Transfer, err: TransferError) -> TransferError:
        """Fail a streaming transfer (its sessions resolve it); the reason it failed for."""
        with self.cond:
            self._abort_locked(entry, err)
            return entry.abort or err

    def fail(self, entry: Transfer, err: TransferError) -> TransferError:
        """Its first connection failed: abort, wait until its lanes write no more, fail the
        future. The reason it failed for (cancel, timeout or close caused the socket error)."""
        with self.cond:
            self._abort_locked(entry, err)  # stops the other lanes, if any
            err = entry.abort or err
            deadline = time.monotonic() + LANES_STOP_S
            while entry.lanes_open and time.monotonic() < deadline:  # they write no more
                self.cond.wait(0.05)
            self._release_locked(entry)
            self.fail_future(entry.future, err)
        return err

    def fail_future(self, future: concurrent.futures.Future, err: TransferError) -> None:
        if not future.done():
            metrics.record_failure("receive", self.backend, err.reason)
            future.set_exception(err)

    # ----------------------------------------------------------------- under the lock
    def _add_tombstone(self, request_id: str, err: TransferError) -> None:
        """Remember a refusal so a sender (or expect) arriving later fails at once."""
        self._tombstones[request_id] = (time.monotonic() + 2 * self.registration_wait + 1, err)
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _abort_locked(self, entry: Transfer, err: TransferError) -> None:
        """Fail ``entry``: at once if no sender streams into it, else via its handler."""
        if entry.state == TransferState.PENDING:
            del self._entries[entry.request_id]
            self._add_tombstone(entry.request_id, err)
            self.fail_future(entry.future, err)
            self.cond.notify_all()
        elif entry.abort is None:
            entry.abort = err
            # a handler still in the handshake (no source yet) checks entry.abort after ACCEPT
            if entry.source is not None and entry.conn is not None:
                entry.source.interrupt(entry.conn, err)
            for conn in entry.lanes:
                shutdown(conn, socket.SHUT_RD)  # wakes the lane handlers' recv
            self.cond.notify_all()

    def _release_locked(self, entry: Transfer) -> None:
        """Forget a claimed entry (before its future resolves, so stats() never lag behind)."""
        entry.conn = None
        if self._entries.get(entry.request_id) is entry:
            del self._entries[entry.request_id]


def shutdown(conn: socket.socket, how: int) -> None:
    """Shut a connection's side down, which wakes a thread blocked on it; quiet when its
    handler already closed it (nothing left to wake)."""
    try:
        conn.shutdown(how)
    except OSError as exc:
        log.debug("shutdown of kv connection failed: %s", exc)
