"""The KV connector interface: what a prefill worker and a decode worker may rely on.

A transfer moves one request's KV cache (all layers, ``num_tokens`` tokens) from the prefill
worker's paged cache into blocks the decode worker already allocated. The interface is split by
role, like vLLM's KV connector: a :class:`KVSender` lives in the prefill worker, a
:class:`KVReceiver` (which owns a listening endpoint) lives in the decode worker.

Life cycle of one transfer, seen from the decode side::

    expect() -> PENDING --sender arrives, handshake ok--> TRANSFERRING --last layer--> DONE
                   |                                           |
                   +-- timeout / cancel / close ---------------+--> FAILED (future raises)

Block ownership (one owner at a time, so nothing leaks and nothing is written after it is freed):

* the decode worker allocates the destination blocks *before* ``expect()`` and owns them
  throughout; if the future fails, the decode worker frees them. The receiver never frees blocks.
* the receiver resolves the future only once nothing will write into those blocks any more:
  neither the receiver nor, for backends where the sender writes the receiver's memory directly
  (cuda_ipc), the sender. Freeing them right after the future resolves, even with a failure, is
  safe; a caller that gives up waiting must defer the free until it does.
* the prefill worker owns its source blocks; it frees them after ``send()`` returns or raises.
* on the decode side this is the RECEIVING stage of the request's
  :class:`splitserve.worker.block_lease.BlockLease`: from ``expect()`` until the future resolves,
  a request that ends is DRAINING (``cancel()`` is called) and its blocks are released by the
  future's done callback, never earlier and never by an awaited cleanup.

The handshake compares :class:`KVSpec` fields; ``block_size`` may differ between the two sides
because the wire carries token-major data and each side translates to its own block layout.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
MAX_LAYERS = 0xFFFF  # the wire's LAYER frames number layers in 16 bits (wire.MAX_INDEX)

# Fields both sides must agree on; block_size is deliberately absent (the layout is translated).
HANDSHAKE_FIELDS = ("model_fingerprint", "dtype", "num_layers", "num_kv_heads", "head_dim", "backend")


class FailureReason(str, enum.Enum):
    """Why a transfer failed. A ``str`` enum, so ``err.reason == "timeout"`` also works."""

    HANDSHAKE_MISMATCH = "handshake_mismatch"  # the two KVSpecs disagree (field named in message)
    CONNECTION_LOST = "connection_lost"  # the peer closed or reset the connection mid-transfer
    TIMEOUT = "timeout"  # nothing arrived / the transfer did not finish in time
    CANCELLED = "cancelled"  # receiver.cancel() was called
    UNKNOWN_REQUEST = "unknown_request"  # sender arrived, no expect() for it within the wait
    NO_SPACE = "no_space"  # decode side has no blocks for it (receiver.reject())
    CLOSED = "closed"  # the receiver or sender was closed
    ABORTED = "aborted"  # the sender gave up (its kv_layers iterator raised)
    INVALID_INPUT = "invalid_input"  # wrong layer shape/dtype/count handed to send()
    PROTOCOL_ERROR = "protocol_error"  # garbled frames, duplicate sender, wrong frame order
    BACKEND_UNAVAILABLE = "backend_unavailable"  # e.g. shared memory not visible to the peer
    UNAUTHENTICATED = "unauthenticated"  # the peer did not prove it holds the internal secret


class TransferState(str, enum.Enum):
    """Where a transfer is in its life cycle (see the module docstring)."""

    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TransferError(Exception):
    """A transfer failed; ``reason`` says why (a :class:`FailureReason`), ``field`` names the
    mismatching handshake field(s) when ``reason`` is ``handshake_mismatch``."""

    def __init__(
        self,
        reason: FailureReason | str,
        message: str = "",
        *,
        request_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = FailureReason(reason)
        self.message = message or self.reason.value
        self.request_id = request_id
        self.field = field
        prefix = f"[{self.reason.value}]"
        if request_id:
            prefix += f" request {request_id!r}:"
        super().__init__(f"{prefix} {self.message}")

    def with_request(self, request_id: str) -> TransferError:
        """A copy naming ``request_id`` (errors are often made before the id is known)."""
        return TransferError(self.reason, self.message, request_id=request_id, field=self.field)


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """The KV layout one worker holds; both ends of a transfer exchange it in the handshake.

    ``model_fingerprint`` should cover the model, the KV layout and the serving generation
    (config hash), so pods of different rollouts never pair.
    """

    model_fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    backend: str = "tcp"

    def __post_init__(self) -> None:
        dtype = self.dtype
        if not isinstance(dtype, str):  # accept a torch.dtype and keep its name
            dtype = str(dtype).removeprefix("torch.")
            object.__setattr__(self, "dtype", dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"KVSpec.dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        if not isinstance(self.model_fingerprint, str) or not self.model_fingerprint:
            raise ValueError("KVSpec.model_fingerprint must be a non-empty string")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError("KVSpec.backend must be a non-empty string")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVSpec.{name} must be an int >= 1, got {value!r}")
        if self.num_layers > MAX_LAYERS:  # a LAYER frame carries its number in 16 bits
            raise ValueError(f"KVSpec.num_layers must be <= {MAX_LAYERS}, got {self.num_layers}")

    @property
    def element_size(self) -> int:
        """Bytes per element of ``dtype``."""
        return 4 if self.dtype == "float32" else 2

    def layer_nbytes(self, num_tokens: int) -> int:
        """Bytes of one layer's K and V for ``num_tokens`` tokens (the wire unit)."""
        return 2 * num_tokens * self.num_kv_heads * self.head_dim * self.element_size

    def layer_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        """Shape of one layer's KV on the wire: (2, num_tokens, num_kv_heads, head_dim)."""
        return (2, num_tokens, self.num_kv_heads, self.head_dim)

    def mismatches(self, other: KVSpec) -> list[str]:
        """Names of the handshake fields that differ (empty when compatible)."""
        return [f for f in HANDSHAKE_FIELDS if getattr(self, f) != getattr(other, f)]

    def check_compatible(self, other: KVSpec) -> None:
        """Raise ``TransferError(handshake_mismatch)`` naming every field that differs."""
        bad = self.mismatches(other)
        if bad:
            detail = ", ".join(f"{f}: {getattr(self, f)!r} != {getattr(other, f)!r}" for f in bad)
            raise TransferError(
                FailureReason.HANDSHAKE_MISMATCH,
                f"KV spec mismatch on {detail}",
                field=",".join(bad),
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVSpec:
        """Build from a dict; unknown or missing keys are an error, never ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown KVSpec field(s): {sorted(unknown)}")
        return cls(**data)


@dataclasses.dataclass
class TransferResult:
    """The outcome of one transfer (a failed future raises :class:`TransferError` instead)."""

    state: TransferState
    request_id: str
    first_token: int | None
    num_tokens: int
    bytes: int
    seconds: float
    error: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_logprobs: dict[str, Any] | None = None  # the first token's, when the sender sent them


@dataclasses.dataclass(frozen=True)
class SampledToken:
    """The first token as the prefill side sampled it, and its logprobs: a JSON object
    (``{"token_id", "logprob", "top": [[id, logprob], ...]}``, the protocol's LogprobEntry) or
    None when the request asked for none. Both travel in the transfer's END frame."""

    token_id: int
    logprobs: dict[str, Any] | None = None


FirstToken = int | SampledToken | Callable[[], int | SampledToken]


class KVSender(ABC):
    """Prefill side: pushes one request's KV, layer by layer, to a decode worker's receiver.

    Thread-safe: several requests may be sent concurrently from different threads.
    """

    @abstractmethod
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
        """Send ``kv_layers`` (``num_layers`` tensors, each ``(2, num_tokens, H, D)``) to the
        receiver at ``endpoint`` ("host:port") and block until the receiver acknowledged the
        last byte.

        ``kv_layers`` is consumed lazily, so a generator lets layer i go over the wire while
        layer i+1 is computed. ``first_token`` may be a callable, evaluated after the last layer
        (the token is sampled after the forward pass); a :class:`SampledToken` carries the
        token's logprobs too, and the receiver's result has them (``first_logprobs``). Pass
        ``num_tokens`` to handshake before the first layer exists. Raises :class:`TransferError`
        (with ``reason``) on any failure; the caller frees its own source blocks either way. Over
        one stream a layer's memory may be reused once the next layer is asked for; with several
        streams (big transfers), only after ``send`` returns: a lane may still be sending it.
        """

    def close(self) -> None:
        """Abort in-flight sends and refuse new ones. Default: nothing to release."""
        return None

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVReceiver(ABC):
    """Decode side: owns an endpoint and writes arriving KV into pre-allocated blocks."""

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """"host:port" that senders connect to (advertised in the decode worker's /health)."""

    @abstractmethod
    def expect(
        self,
        request_id: str,
        num_tokens: int,
        block_table: Sequence[int],
        timeout: float = 30.0,
    ) -> concurrent.futures.Future[TransferResult]:
        """Register a transfer into ``block_table`` (already allocated by the caller).

        The future resolves with a :class:`TransferResult` once every layer landed, or fails
        with :class:`TransferError` (timeout covers waiting for the sender *and* the transfer).
        It resolves only after the receiver stopped writing into the blocks, so the caller may
        free them as soon as it sees a failure. A sender that arrives before ``expect()`` waits
        a bounded time for it. Callbacks run on a receiver thread: keep them short (e.g.
        ``loop.call_soon_threadsafe``).
        """

    @abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Abort the transfer of ``request_id`` (its future fails with ``cancelled``); a sender
        that arrives later is refused at once. Returns whether a transfer was registered.

        Does not block: if a sender is streaming, its handler may still finish writing the
        current layer. Free the blocks only once the future is done (it resolves within
        milliseconds of the cancel), never right after ``cancel()`` returns."""

    def reject(self, request_id: str, reason: FailureReason | str, message: str = "") -> bool:
        """Refuse ``request_id`` with ``reason`` (e.g. ``no_space``), so its sender fails fast
        instead of waiting. Default: same as :meth:`cancel`."""
        return self.cancel(request_id)

    @abstractmethod
    def close(self) -> None:
        """Stop serving: fail every pending future with ``closed`` and release the endpoint."""

    def stats(self) -> dict[str, int]:
        """Counters for leak checks and /load (pending transfers, open connections...)."""
        return {}

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
