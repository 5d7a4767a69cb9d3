"""The decode-side engine shared by the socket backends (TCP, shared memory, CUDA IPC, NIXL).

One listening socket; each arriving sender gets its own connection (one connection per
transfer, or several for a multi-stream one). A backend only says where a layer's bytes come
from (:class:`LayerSource`): inline on the socket (TCP), from shared memory (shm), written by the
sender into the blocks (CUDA IPC, NIXL).

:class:`SocketReceiver` is the public side (``expect``, ``reject``, ``close``, the backend hooks)
and wires three parts, each with one job:

- ``transfer_table.py``: the transfers expected, claimed, failed and resolved, under one lock;
- ``connection_threads.py``: the threads that accept and serve connections (leader/followers),
  and the watchdog that expires timed-out transfers every ``WATCHDOG_PERIOD_S``;
- ``receive_session.py``: one connection's life, from HELLO (or JOIN, OFFER) to DONE.
"""

from __future__ import annotations

import concurrent.futures
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from splitserve.trust import InternalSecret

from .base import FailureReason, KVReceiver, KVSpec, TransferError, TransferResult
from .connection_threads import ConnectionThreads
from .layout import PagedWriter, check_cache
from .negotiate import Offer, host_identity, new_instance
from .receive_session import ReceiveSession
from .transfer_table import TransferTable, shutdown
from .wire import Frame, FrameType, send_frame

WATCHDOG_PERIOD_S = 0.05
IDLE_THREAD_S = 1.0  # a parked connection thread exits after this long without a connection
CLOSE_WAIT_S = 10.0  # close() waits this long for any handler's wind-down (cuda_ipc: STOP_WAIT_S)


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
        shutdown(sock, socket.SHUT_RD)

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
        self.instance = new_instance()  # in every offer; a HELLO negotiated with another is refused
        self.kv_cache = kv_cache
        self.registration_wait = registration_wait
        self.io_timeout = io_timeout
        self.staged = staged
        self.secret = secret
        self._table = TransferTable(self.backend, registration_wait)
        listener = socket.create_server((host, port), backlog=backlog)
        bound_port = listener.getsockname()[1]
        self._endpoint = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        self._threads = ConnectionThreads(
            listener, f"kv-{self.backend}-recv-{bound_port}", self._serve_connection,
            self._table.expire, idle_s=IDLE_THREAD_S, watchdog_period_s=WATCHDOG_PERIOD_S,
        )

    # ----------------------------------------------------------------- backend hook
    @abstractmethod
    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        """The layer source for one connection, from the sender's HELLO (raise TransferError)."""

    def check_spec(self, theirs: KVSpec) -> None:
        """Refuse a sender whose spec does not match ours (TransferError naming the fields)."""
        self.spec.check_compatible(theirs)

    def offer(self) -> Offer:
        """What this receiver can do, for a negotiating sender: its own backend only."""
        return Offer((self.backend,), host_identity(), bool(self.kv_cache.is_cuda), self.backend,
                     instance=self.instance)

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
        return self._table.expect(request_id, num_tokens, writer, timeout)

    def cancel(self, request_id: str) -> bool:
        return self.reject(request_id, FailureReason.CANCELLED, "cancelled by the receiver")

    def reject(self, request_id: str, reason: FailureReason | str, message: str = "") -> bool:
        return self._table.reject(request_id, TransferError(reason, message, request_id=request_id))

    def close(self) -> None:
        if self._table.close(TransferError(FailureReason.CLOSED, "receiver closed")):
            self._threads.close(CLOSE_WAIT_S)

    def stats(self) -> dict[str, int]:
        return self._table.stats()

    def _serve_connection(self, conn: socket.socket) -> None:
        """One accepted connection, on the thread that accepted it."""
        if not self._table.open_connection(conn):  # closed meanwhile
            conn.close()
            return
        ReceiveSession(self, self._table, conn).run()

