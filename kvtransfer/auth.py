"""Mutual authentication of one KV connection by challenge-response on the shared secret.

Without it, anyone who can reach a decode worker's KV port can write KV and first tokens into
its cache, and a prefill worker sends a prompt's KV to whatever endpoint it is handed. With a
secret configured on both ends, every connection (HELLO and each JOIN) runs::

    HELLO/JOIN {..., auth: {nonce: Ns}}
    <- CHALLENGE {nonce: Nr, proof: MAC("receiver", Ns, Nr, request_id)}
    AUTH {proof: MAC("sender", Ns, Nr, request_id)}
    <- ACCEPT (or ERROR) as before

The receiver proves itself first, over the sender's fresh nonce, so no layer and no first token
ever leaves for a peer without the secret; the sender's proof covers the receiver's fresh nonce,
so a recorded exchange cannot be replayed. The role label keeps one side's proof from being
reflected as the other's. A receiver checks the proof before it looks at the request, so an
unauthenticated peer can neither claim nor reject a transfer. One end with a secret and the
other without is a refusal on both ends (``unauthenticated``), never a silent downgrade.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
from typing import Any

from splitserve.trust import InternalSecret

from . import metrics
from .base import FailureReason, TransferError
from .wire import Frame, FrameType, error_meta, expect_frame, send_frame

log = logging.getLogger(__name__)

PURPOSE = "kv"
_NONCE = re.compile(r"^[0-9a-f]{32}$")


def new_nonce() -> str:
    return secrets.token_hex(16)


def hello_fields(nonce: str) -> dict[str, Any]:
    """What a sender with a secret adds to its HELLO/JOIN."""
    return {"auth": {"nonce": nonce}}


def refused(side: str, backend: str, message: str, peer: str = "?") -> TransferError:
    """Count and log one refused connection; the error to raise."""
    metrics.record_auth_failure(side, backend)
    log.warning("KV connection %s %s refused: %s", "from" if side == "receive" else "to", peer, message)
    return TransferError(FailureReason.UNAUTHENTICATED, message)


def authenticate_sender(
    sock: socket.socket, secret: InternalSecret | None, first: Frame, backend: str
) -> None:
    """The receiver's half, right after the first frame (HELLO or JOIN); raises TransferError
    (``unauthenticated``) when the sender did not prove it holds ``secret``."""
    offered = first.meta.get("auth")
    peer = _peer(sock)
    if secret is None:
        if offered is not None:
            raise refused("receive", backend, "this decode worker has no internal secret "
                          "configured, the sender has one: configure the same secret on both", peer)
        return
    nonce = offered.get("nonce") if isinstance(offered, dict) else None
    if not isinstance(nonce, str) or not _NONCE.match(nonce):
        raise refused("receive", backend, "the sender did not authenticate (no internal secret "
                      "configured on the prefill worker?)", peer)
    request_id = str(first.meta.get("request_id"))
    ours = new_nonce()
    send_frame(sock, FrameType.CHALLENGE, {
        "nonce": ours, "proof": secret.sign(PURPOSE, "receiver", nonce, ours, request_id)})
    try:
        proof = expect_frame(sock, FrameType.AUTH).meta.get("proof")
    except TransferError as err:  # the sender refused our proof: it holds another secret
        raise refused("receive", backend, f"the sender refused this receiver: {err.message}",
                      peer) from err
    if not secret.verify(PURPOSE, proof, "sender", nonce, ours, request_id):
        raise refused("receive", backend, "the sender's proof of the internal secret is wrong", peer)


def authenticate_receiver(
    sock: socket.socket, secret: InternalSecret, nonce: str, request_id: str, backend: str
) -> None:
    """The sender's half, after its HELLO/JOIN went out with ``nonce``: check the receiver's
    proof, then prove ourselves. Raises TransferError (``unauthenticated``) before any KV is
    sent when the receiver does not hold ``secret``."""
    peer = _peer(sock)
    try:
        frame = expect_frame(sock, FrameType.CHALLENGE, FrameType.ACCEPT)
    except TransferError as err:
        if err.reason != FailureReason.UNAUTHENTICATED:
            raise
        raise refused("send", backend, err.message, peer) from err
    if frame.type == FrameType.ACCEPT:
        err = refused("send", backend, "the receiver accepted without proving that it holds the "
                      "internal secret (none configured there?); no KV sent", peer)
        _tell(sock, err)
        raise err
    theirs = frame.meta.get("nonce")
    if not isinstance(theirs, str) or not _NONCE.match(theirs) or not secret.verify(
        PURPOSE, frame.meta.get("proof"), "receiver", nonce, theirs, request_id
    ):
        err = refused("send", backend, "the receiver's proof of the internal secret is wrong: "
                      "it is not a decode worker of this deployment; no KV sent", peer)
        _tell(sock, err)
        raise err
    send_frame(sock, FrameType.AUTH, {"proof": secret.sign(PURPOSE, "sender", nonce, theirs, request_id)})


def _tell(sock: socket.socket, err: TransferError) -> None:
    """Best effort: let the peer's handler fail with our reason rather than a lost connection."""
    try:
        send_frame(sock, FrameType.ERROR, error_meta(err))
    except OSError as exc:
        log.debug("could not send ERROR to the KV peer: %s", exc)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
