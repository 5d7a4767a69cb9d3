"""Wire format shared by every socket-based backend.

Every frame is a fixed header, a JSON metadata object and an optional raw payload::

    !4s B B H I Q  = magic b"SSKV", version, frame type, index, meta length, payload length

``index`` carries the layer number of LAYER frames, which then need no JSON at all (meta length
0 means ``{}``): a layer is the per-transfer hot path, and JSON plus the second ``recv`` for the
metadata cost about as much as moving a small layer's bytes.

Conversation (sender -> receiver unless marked <-)::

    HELLO {request_id, spec, num_tokens, meta, ...backend fields[, auth: {nonce}]}
    (with a shared secret: <- CHALLENGE {nonce, proof}, AUTH {proof}; see auth.py)
    <- ACCEPT {}            or  <- ERROR {reason, message, field}
    LAYER [index i] + payload (T*2*H*D elements, token-major), i = 0 .. num_layers-1
    (shm: LAYER [i] {slot} without payload, <- CREDIT {slot} when the slot may be reused)
    END {first_token, logprobs}   (logprobs: {token_id, logprob, top: [[id, logprob], ...]} or null)
    <- DONE {bytes}
    Either side may send ERROR at any point and close.

Before its first transfer to a receiver, a negotiating sender (``auto.py``) asks on a connection
of its own: OFFER {request_id, offer[, auth: {nonce}]} (for the transfer that needs the answer;
with a secret, proven like a HELLO) -> <- OFFER {offer}; both ends then pick the backend from the two offers
(``negotiate.choose``), and the HELLO's spec names it; its ``negotiated_with`` names the instance
of the receiver whose OFFER it used (one that restarted since refuses it: ``field="instance"``).

With ``streams: N`` in HELLO the sender opens N-1 more connections after ACCEPT, each starting
with JOIN {request_id, stream: k} (<- ACCEPT), and sends layer i on connection i % N; END and
DONE stay on the first connection.

Tensors never go through Python objects element by element: the sender hands the socket a
memoryview of the tensor's bytes, the receiver ``recv_into``\\s a preallocated buffer and views
it as the dtype (works for bfloat16, which numpy cannot represent).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import socket
import struct
from typing import Any

import torch

from .base import FailureReason, SampledToken, TransferError

MAGIC = b"SSKV"
VERSION = 2  # 2: LAYER frames carry the layer in the header's index field, not in JSON
HEADER = struct.Struct("!4sBBHIQ")
MAX_INDEX = 0xFFFF
MAX_META_BYTES = 1 << 20
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # built once, not per frame


class FrameType(enum.IntEnum):
    HELLO = 1
    ACCEPT = 2
    LAYER = 3
    END = 4
    DONE = 5
    ERROR = 6
    CREDIT = 7
    JOIN = 8
    CHALLENGE = 9  # receiver -> sender: its nonce and proof of the secret (auth.py)
    AUTH = 10  # sender -> receiver: its proof of the secret
    OFFER = 11  # either way, alone on a connection: what an end can do (negotiate.py)


class PeerClosed(ConnectionError):
    """The peer closed the connection (EOF) where more bytes were due."""


@dataclasses.dataclass(frozen=True)
class Frame:
    type: FrameType
    meta: dict[str, Any]
    payload_len: int
    index: int = 0  # LAYER: the layer number


def send_frame(
    sock: socket.socket,
    ftype: FrameType,
    meta: dict[str, Any] | None = None,
    payload: memoryview | None = None,
    *,
    index: int = 0,
) -> None:
    """Write one frame; the payload (if any) goes to the kernel without an extra copy, in the
    same ``sendmsg`` as the header when the kernel takes it all."""
    plen = 0 if payload is None else payload.nbytes
    head = encode_frame(ftype, meta, plen, index=index)
    if not plen:
        sock.sendall(head)
        return
    sent = sock.sendmsg([head, payload])  # header and payload in one syscall when they fit
    if sent < len(head):
        sock.sendall(head[sent:])
        sock.sendall(payload)
    elif sent < len(head) + plen:
        sock.sendall(payload[sent - len(head) :])


def encode_frame(
    ftype: FrameType, meta: dict[str, Any] | None = None, payload_len: int = 0, *, index: int = 0
) -> bytes:
    """A frame's header and metadata (``payload_len`` payload bytes must follow)."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index must be in [0, {MAX_INDEX}], got {index}")
    body = _ENCODE(meta).encode() if meta else b""
    return HEADER.pack(MAGIC, VERSION, ftype, index, len(body), payload_len) + body


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket or raise PeerClosed."""
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise PeerClosed("peer closed the connection")
        view = view[n:]


IOV_BATCH = 512  # buffers per recvmsg_into call (Linux IOV_MAX is 1024)


def recv_into_views(sock: socket.socket, views: list[memoryview]) -> None:
    """Fill every buffer of ``views`` in order (scatter read: one ``recvmsg_into`` call fills
    many buffers, so a layer spread over hundreds of blocks costs few syscalls). Mutates the
    list. Raises PeerClosed on EOF."""
    i = 0
    while i < len(views):
        n = sock.recvmsg_into(views[i : i + IOV_BATCH])[0]
        if n == 0:
            raise PeerClosed("peer closed the connection")
        while n:
            size = views[i].nbytes
            if n >= size:
                n -= size
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n)  # almost always the whole thing: one call, no extra buffer
    if len(data) == n:
        return data
    if not data:
        raise PeerClosed("peer closed the connection")
    buf = bytearray(n)
    buf[: len(data)] = data
    recv_into_exact(sock, memoryview(buf)[len(data) :])
    return bytes(buf)


def recv_frame(sock: socket.socket) -> Frame:
    """Read one frame's header and metadata (the caller reads ``payload_len`` bytes after)."""
    magic, version, ftype, index, meta_len, payload_len = HEADER.unpack(
        recv_exact(sock, HEADER.size)
    )
    if magic != MAGIC or version != VERSION:
        raise TransferError(
            FailureReason.PROTOCOL_ERROR, f"bad frame header (magic {magic!r}, version {version})"
        )
    if meta_len > MAX_META_BYTES:
        raise TransferError(FailureReason.PROTOCOL_ERROR, f"frame metadata too large: {meta_len}")
    try:
        kind = FrameType(ftype)
        meta = json.loads(recv_exact(sock, meta_len)) if meta_len else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # nesting past the parser's
        raise TransferError(FailureReason.PROTOCOL_ERROR, f"bad frame: {exc}") from exc
    if not isinstance(meta, dict):
        raise TransferError(FailureReason.PROTOCOL_ERROR, "frame metadata must be a JSON object")
    return Frame(kind, meta, payload_len, index)


def expect_frame(sock: socket.socket, *kinds: FrameType) -> Frame:
    """Read a frame of one of ``kinds``; an ERROR frame becomes the peer's TransferError."""
    frame = recv_frame(sock)
    if frame.type == FrameType.ERROR:
        raise error_from_meta(frame.meta)
    if frame.type not in kinds:
        raise TransferError(
            FailureReason.PROTOCOL_ERROR,
            f"expected {'/'.join(k.name for k in kinds)} frame, got {frame.type.name}",
        )
    return frame


def error_meta(err: TransferError) -> dict[str, Any]:
    return {"reason": err.reason.value, "message": err.message, "field": err.field}


def error_from_meta(meta: dict[str, Any]) -> TransferError:
    """Rebuild the peer's error; an unknown reason is kept readable as a protocol error."""
    message = str(meta.get("message", ""))
    try:
        reason = FailureReason(meta.get("reason"))
    except ValueError:
        reason, message = FailureReason.PROTOCOL_ERROR, f"{meta.get('reason')}: {message}"
    field = meta.get("field")
    return TransferError(reason, f"peer: {message}", field=field if isinstance(field, str) else None)


def end_meta(first: SampledToken) -> dict[str, Any]:
    """END's metadata: the first token and its logprobs (every backend's END is this one)."""
    return {"first_token": first.token_id, "logprobs": first.logprobs}


def parse_end(meta: dict[str, Any]) -> SampledToken:
    """The first token and its logprobs from END's metadata; a protocol error if either is not
    what :func:`end_meta` writes."""
    token, logprobs = meta.get("first_token"), meta.get("logprobs")
    if not _is_int(token):
        raise TransferError(FailureReason.PROTOCOL_ERROR, f"END: first_token must be an int, got {token!r}")
    if not valid_logprobs(logprobs):
        raise TransferError(FailureReason.PROTOCOL_ERROR, f"END: malformed logprobs {str(logprobs)[:200]}")
    return SampledToken(token, logprobs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def valid_logprobs(entry: Any) -> bool:
    """Whether ``entry`` is a first token's logprobs as END carries them (None: none asked)."""
    if entry is None:
        return True
    top = entry.get("top") if isinstance(entry, dict) else None
    return (isinstance(top, list) and _is_int(entry.get("token_id")) and _is_number(entry.get("logprob"))
            and all(isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _is_number(p[1]) for p in top))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def byte_buffer(nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """A preallocated receive buffer and a writable memoryview on it."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf, memoryview(buf.numpy())


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port"); raise ValueError on anything else."""
    host, sep, port = str(endpoint).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host.strip("[]"), int(port)


KEEPALIVE = (5, 1, 3)  # idle seconds, probe interval, probes: a silent dead host in ~8 s


def tune_socket(sock: socket.socket, timeout: float) -> None:
    """No Nagle delay on the small control frames; bounded blocking everywhere; TCP keepalive
    so a peer host that vanished without a FIN/RST is noticed in seconds, not on io_timeout."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the OS defaults apply
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.settimeout(timeout)
