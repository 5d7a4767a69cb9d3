"""One sender's connection to the decode side, from its first frame to its last.

A connection opens with one of three frames: OFFER (a negotiating sender's question: answered,
then closed), HELLO (a transfer's first connection), JOIN (an extra connection of a multi-stream
transfer: a lane). Life cycle of a HELLO connection: check the spec -> wait (bounded) for
expect() of that request -> ACCEPT -> per layer: read, scatter into the blocks -> END -> every
lane done -> resolve the future -> DONE.

Fast, certain failure: a dropped connection ends the session's ``recv`` at once; cancel, timeout
and close shut the connection's read side, which wakes it the same way. The first connection's
session is the only one that resolves a transfer that is streaming, after its last write into
the blocks; a lane never resolves it, it aborts it.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from . import auth, metrics
from .base import FailureReason, KVSpec, TransferError, TransferResult, TransferState
from .metrics import report_choice
from .negotiate import Offer, choose
from .transfer_table import Transfer, TransferTable
from .wire import FrameType, error_meta, expect_frame, parse_end, send_frame, tune_socket

if TYPE_CHECKING:
    from .receiver import LayerSource, SocketReceiver

log = logging.getLogger(__name__)

MAX_STREAMS = 16


class ReceiveSession:
    """Serves one accepted connection for ``receiver`` (its spec, secret and backend hooks),
    changing transfers only through ``table``."""

    def __init__(self, receiver: SocketReceiver, table: TransferTable, conn: socket.socket) -> None:
        self.rx = receiver
        self.table = table
        self.conn = conn
        self.spec = receiver.spec

    def run(self) -> None:
        """Serve the connection until it ends; any failure fails the transfer, never the
        thread. Closes the connection."""
        conn = self.conn
        entry: Transfer | None = None
        request_id = "?"
        try:
            tune_socket(conn, self.rx.io_timeout)
            first = expect_frame(conn, FrameType.HELLO, FrameType.JOIN, FrameType.OFFER)
            hello = first.meta
            request_id = str(hello.get("request_id", "?"))
            self._authenticate(first, request_id)
            if first.type == FrameType.OFFER:  # a question, on behalf of request_id's transfer
                self._answer_offer(hello)
                return
            if first.type == FrameType.JOIN:
                self._serve_lane(hello)
                return
            entry = self._handshake(hello)
            self._receive(entry, hello)
        except Exception as exc:  # noqa: BLE001 - any failure fails the transfer, never the thread
            # OSError: PeerClosed, reset, shut down, stalled; TransferError; anything else (e.g.
            # out of GPU memory for a staging buffer) must still resolve the future with a reason
            err = transfer_error(exc).with_request(request_id)
            if entry is not None:  # this connection had claimed it
                err = self.table.fail(entry, err)
            _send_error(conn, err)
        finally:
            self.table.close_connection(conn, entry)
            conn.close()

    def _authenticate(self, first: Any, request_id: str) -> None:
        """The shared-secret proof, before the connection may touch any transfer. A receiver
        without a secret serves any sender, so one that wants proof may fail its transfer at
        once; with a secret, an unproven peer can neither fill nor fail a transfer."""
        try:
            auth.authenticate_sender(self.conn, self.rx.secret, first, self.rx.backend)
        except TransferError as err:
            if self.rx.secret is None and first.type in (FrameType.HELLO, FrameType.OFFER):
                self.rx.reject(request_id, err.reason, err.message)
            raise

    def _answer_offer(self, meta: dict[str, Any]) -> None:
        """A negotiating sender's question: answer with our offer; both ends then choose."""
        try:
            peer = Offer.from_dict(meta.get("offer") or {})
        except (TypeError, ValueError) as exc:
            raise TransferError(FailureReason.PROTOCOL_ERROR, str(exc)) from exc
        mine = self.rx.offer()
        choice = choose(mine, peer)
        while not self.rx.prepare(choice.backend):  # withdrawn: the rest of the offer
            mine = self.rx.offer()
            choice = choose(mine, peer)
        send_frame(self.conn, FrameType.OFFER, {"offer": mine.to_dict()})
        report_choice("receive", _peer_host(self.conn), choice, peer)

    def _handshake(self, hello: dict[str, Any]) -> Transfer:
        request_id = hello.get("request_id")
        num_tokens = hello.get("num_tokens")
        if not isinstance(request_id, str) or not isinstance(num_tokens, int):
            raise TransferError(FailureReason.PROTOCOL_ERROR, "HELLO needs request_id, num_tokens")
        self._check_negotiated(hello.get("negotiated_with"))
        if hello.get("spec") != self.rx._spec_dict:  # the same spec needs no parsing (~15 us)
            try:
                theirs = KVSpec.from_dict(hello.get("spec") or {})
            except (TypeError, ValueError) as exc:
                raise TransferError(
                    FailureReason.PROTOCOL_ERROR, f"bad spec in HELLO: {exc}"
                ) from exc
            try:
                self.rx.check_spec(theirs)
            except TransferError as err:
                self.rx.reject(request_id, err.reason, err.message)  # fail it now or when expected
                raise
        return self.table.claim(request_id, num_tokens, self.conn)

    def _check_negotiated(self, instance: Any) -> None:
        """A HELLO whose backend was negotiated with another instance of this receiver (it
        restarted at this address since; its offer may differ) is refused without failing the
        transfer: the sender negotiates again and retries it at once (``auto.py``). A mismatch
        found after a negotiation with this instance fails the transfer as any other."""
        if instance is not None and instance != self.rx.instance:
            raise TransferError(
                FailureReason.HANDSHAKE_MISMATCH,
                f"the sender negotiated with instance {instance!r} of this receiver, which has "
                f"restarted since (now {self.rx.instance!r}): negotiate again", field="instance")

    def _receive(self, entry: Transfer, hello: dict[str, Any]) -> None:
        conn = self.conn
        start = time.monotonic()
        nbytes = self.spec.layer_nbytes(entry.num_tokens)
        streams = hello.get("streams", 1)
        if not isinstance(streams, int) or not 1 <= streams <= min(MAX_STREAMS, self.spec.num_layers):
            raise TransferError(FailureReason.PROTOCOL_ERROR, f"bad streams {streams!r}")
        entry.backend = str(hello["spec"]["backend"])  # checked by the handshake
        source = self.rx.open_source(hello, nbytes)
        try:
            self.table.set_streams(entry, streams)
            send_frame(conn, FrameType.ACCEPT)
            source.accepted(conn, entry.writer)
            self.table.attach_source(entry, source)  # raises a cancel (etc.) of the handshake
            self._receive_layers(entry, source, range(0, self.spec.num_layers, streams))
            first = parse_end(expect_frame(conn, FrameType.END).meta)
            self.table.wait_for_lanes(entry, self.rx.io_timeout)
        except BaseException as exc:
            source.stop(conn, entry.abort or transfer_error(exc))  # before the future fails
            raise
        finally:
            self.table.detach_source(entry)
            source.close()
            entry.writer.finish()
        seconds = time.monotonic() - start
        total = nbytes * self.spec.num_layers
        result = TransferResult(
            TransferState.DONE, entry.request_id, first.token_id, entry.num_tokens, total,
            seconds, meta=dict(hello.get("meta") or {}), first_logprobs=first.logprobs,
        )
        self.table.resolve(entry, result, seconds)
        send_frame(conn, FrameType.DONE, {"bytes": total})

    def _receive_layers(self, entry: Transfer, source: LayerSource, layers: range) -> None:
        conn = self.conn
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
                metrics.record_bytes("receive", entry.backend or self.rx.backend, nbytes * count)

    def _serve_lane(self, join: dict[str, Any]) -> None:
        """An extra connection of a multi-stream transfer: receive layers stream, stream+N, ...
        A lane never resolves the future; on failure it aborts the transfer, and the first
        connection's session resolves it once every lane stopped writing."""
        conn = self.conn
        entry: Transfer | None = None
        try:
            entry = self.table.join(join.get("request_id"), join.get("stream"), conn)
            stream = join["stream"]
            source = self.rx.open_source(join, self.spec.layer_nbytes(entry.num_tokens))
            try:
                send_frame(conn, FrameType.ACCEPT)
                self._receive_layers(
                    entry, source, range(stream, self.spec.num_layers, entry.streams)
                )
            finally:
                source.close()
            self.table.lane_done(entry)
        except Exception as exc:  # noqa: BLE001 - any lane failure fails its transfer now, not at a timeout
            err = exc if isinstance(exc, TransferError) else TransferError(
                FailureReason.TIMEOUT if isinstance(exc, TimeoutError)
                else FailureReason.CONNECTION_LOST, f"parallel stream failed: {exc!r}",
            )
            if entry is not None:
                err = self.table.abort(entry, err.with_request(entry.request_id))
            _send_error(conn, err)
        finally:
            if entry is not None:
                self.table.lane_closed(entry, conn)


def transfer_error(exc: BaseException) -> TransferError:
    """What a session's failure means for the transfer: a socket timeout is a stalled sender,
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
