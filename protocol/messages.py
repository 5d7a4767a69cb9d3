"""The messages between router, prefill and decode workers, one class each.

A request's messages, in order:

- router -> decode ``POST /generate``: :class:`GenerateRequest` (answered by an NDJSON stream of
  :class:`TokenLine`, the last one with a ``finish_reason``);
- router -> prefill ``POST /prefill``: :class:`PrefillRequest` (names the decode worker's KV
  endpoint), answered by :class:`PrefillResult`;
- prefill -> decode, in the KV transfer's HELLO: :class:`TransferMeta`; in its END (a frame of
  ``kvtransfer/wire.py``): the first token and its :class:`LogprobEntry`, which decode's first
  :class:`TokenLine` carries;
- router -> workers, between requests: ``GET /health`` (:class:`Health`, also the worker's entry
  in the registry), ``GET /load`` (:class:`LoadReport`), ``POST /drain`` (:class:`DrainReply`);
- any refusal: :class:`ErrorReply` with its HTTP status.

``to_json`` gives the JSON object (encoders are the caller's: orjson on the router, the standard
library on workers), ``from_json`` reads one back and raises ValueError for a message that is not
one. Token lines are the only per-token message: :meth:`TokenLine.encode` writes the common line
without a general-purpose encoder, and :meth:`TokenLine.from_json` is a plain constructor call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypedDict

from splitserve.protocol.sampling import SamplingParams

ERROR_FINISH = "error"  # the finish_reason of a line that reports a failure


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _request_id(data: dict[str, Any]) -> str:
    rid = data.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"request_id: must be a non-empty string, got {rid!r}")
    return rid


def _token_ids(data: dict[str, Any]) -> list[int]:
    ids = data.get("token_ids")
    if not isinstance(ids, list) or not ids or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise ValueError("token_ids: must be a non-empty list of integers")
    return ids


def _milliseconds(value: Any) -> float | None:
    return None if value is None else float(value)


class LogprobEntry(TypedDict):
    """One token's logprobs, as the engine computes them and token lines carry them: the chosen
    token's, and the request's top alternatives (most likely first). A TypedDict, not a class:
    it goes on the wire as it is, with no conversion per token."""

    token_id: int
    logprob: float
    top: list[list[float]]  # [token id, logprob] pairs


class InvalidMessage(ValueError):
    """A worker request that cannot be served; ``request_id`` when it was readable (the worker
    then tells the other side of the transfer too)."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class WorkerRequest:
    """What the router sends both workers for one sequence."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "token_ids": self.token_ids, "sampling": self.sampling.to_json()}

    @classmethod
    def _fields(cls, data: Any) -> tuple[str, list[int], SamplingParams]:
        """The three fields, or InvalidMessage (with the request id once it was read)."""
        try:
            data = _object(data, "the request body")
            rid = _request_id(data)
            ids = _token_ids(data)
        except ValueError as exc:
            raise InvalidMessage(f"invalid request: {exc}") from None
        try:
            return rid, ids, SamplingParams.from_json(data.get("sampling", {}))
        except ValueError as exc:
            raise InvalidMessage(str(exc), rid) from None


@dataclass(frozen=True)
class GenerateRequest(WorkerRequest):
    """router -> decode ``POST /generate``; ``recompute``: no prefill worker sends KV, decode
    computes the prompt itself."""

    recompute: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "recompute": self.recompute}

    @classmethod
    def from_json(cls, data: Any) -> GenerateRequest:
        rid, ids, sampling = cls._fields(data)
        recompute = data.get("recompute", False)
        if not isinstance(recompute, bool):
            raise InvalidMessage(f"invalid request: recompute: must be true or false, got {recompute!r}", rid)
        return cls(rid, ids, sampling, recompute)


@dataclass(frozen=True)
class PrefillRequest(WorkerRequest):
    """router -> prefill ``POST /prefill``: prefill, then send the KV to ``decode_kv_endpoint``."""

    decode_kv_endpoint: str = ""  # host:port of the decode worker's KV receiver

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "decode_kv_endpoint": self.decode_kv_endpoint}

    @classmethod
    def from_json(cls, data: Any) -> PrefillRequest:
        rid, ids, sampling = cls._fields(data)
        endpoint = data.get("decode_kv_endpoint")
        if not isinstance(endpoint, str) or len(endpoint) < 3:
            raise InvalidMessage(f"invalid request: decode_kv_endpoint: must be host:port, got {endpoint!r}", rid)
        return cls(rid, ids, sampling, endpoint)


@dataclass(slots=True, eq=False)
class TokenLine:
    """One line of decode's ``/generate`` stream: the tokens of one step, the finish on the last
    line (with the stop string that ended it, if one did), one logprobs entry per token when the
    request asked, or an error (``finish_reason`` "error"). The router merges the lines that
    arrive together into one, of the same class."""

    token_ids: list[int]
    finish_reason: str | None = None
    stop_string: str | None = None
    logprobs: list[LogprobEntry | None] | None = None
    error: str | None = None

    @classmethod
    def failure(cls, message: str) -> TokenLine:
        return cls([], ERROR_FINISH, error=message)

    @property
    def failed(self) -> bool:
        return self.error is not None or self.finish_reason == ERROR_FINISH

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_ids": self.token_ids, "finish_reason": self.finish_reason,
                               "stop_string": self.stop_string}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.error is not None:
            out["error"] = self.error
        return out

    def encode(self) -> bytes:
        """The NDJSON line. The common line (tokens, maybe a finish, nothing else) is written
        directly: it goes out once per token of every sequence."""
        if self.stop_string is None and self.logprobs is None and self.error is None:
            finish = "null" if self.finish_reason is None else json.dumps(self.finish_reason)
            ids = ",".join(map(str, self.token_ids))
            return f'{{"token_ids":[{ids}],"finish_reason":{finish},"stop_string":null}}\n'.encode()
        return (json.dumps(self.to_json()) + "\n").encode()

    @classmethod
    def from_json(cls, data: Any) -> TokenLine:
        if type(data) is not dict:
            raise ValueError(f"a token line must be a JSON object, got {type(data).__name__}")
        get = data.get
        return cls(get("token_ids") or [], get("finish_reason"), get("stop_string"), get("logprobs"), get("error"))


@dataclass(frozen=True)
class PrefillResult:
    """prefill -> router, the answer to ``/prefill`` once the KV has been sent. The first token
    and its logprobs went to decode in the transfer's END: decode's first token line has them.
    (A reply's ``first_logprobs``, from an older prefill worker, is ignored.)"""

    request_id: str
    first_token: int
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    prefill_ms: float | None = None  # None: the worker did not say
    transfer_ms: float | None = None  # the KV transfer, past the compute

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "first_token": self.first_token,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_cached_tokens": self.num_cached_tokens,
            "prefill_ms": self.prefill_ms,
            "transfer_ms": self.transfer_ms,
        }

    @classmethod
    def from_json(cls, data: Any) -> PrefillResult:
        data = _object(data, "a prefill result")
        try:
            return cls(
                _request_id(data), int(data["first_token"]), int(data["num_prompt_tokens"]),
                int(data.get("num_cached_tokens", 0)),
                _milliseconds(data.get("prefill_ms")), _milliseconds(data.get("transfer_ms")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a prefill result lacks or garbles {exc}") from None


@dataclass(frozen=True)
class TransferMeta:
    """prefill -> decode, in the KV transfer's HELLO: what the decode side may log or check."""

    num_prompt_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"num_prompt_tokens": self.num_prompt_tokens}


@dataclass(frozen=True)
class LoadReport:
    """A worker's ``GET /load``: its queue, batch and KV cache right now. The engine fills the
    counts; the worker adds its role, whether it is draining (its pod is terminating: nothing
    new for it) and its KV peers (the backend negotiated with each, bytes/s: kvtransfer's
    report, passed through as it is)."""

    waiting: int = 0
    running: int = 0
    queued_prompt_tokens: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 16
    max_model_len: int = 0
    draining: bool = False
    role: str | None = None
    kv_peers: tuple[dict[str, Any], ...] = ()

    _COUNTS = ("waiting", "running", "queued_prompt_tokens", "free_blocks", "total_blocks", "block_size",
               "max_model_len")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.role is None else {"role": self.role}
        out.update((k, getattr(self, k)) for k in self._COUNTS)
        out["draining"] = self.draining
        out["kv_peers"] = list(self.kv_peers)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadReport:
        """Counts missing from ``data`` take their defaults; ``draining`` only from a real true."""
        counts = {k: int(data.get(k, getattr(cls, k))) for k in cls._COUNTS}
        role, peers = data.get("role"), data.get("kv_peers")
        return cls(**counts, draining=data.get("draining") is True, role=role if isinstance(role, str) else None,
                   kv_peers=tuple(peers) if isinstance(peers, list) else ())

    @property
    def used_tokens(self) -> int:
        return (self.total_blocks - self.free_blocks) * self.block_size

    @property
    def free_fraction(self) -> float:
        return self.free_blocks / self.total_blocks if self.total_blocks else 0.0


@dataclass(frozen=True)
class Health:
    """A worker's ``GET /health``; without ``status`` and with its URL, also its entry in the
    registry (``announcement``). ``kv_endpoint``: decode's KV receiver (host:port)."""

    role: str | None
    model: str | None = None
    kv_endpoint: str | None = None
    fingerprint: str | None = None
    status: str = "ok"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "role": self.role, "model": self.model, "kv_endpoint": self.kv_endpoint,
                "fingerprint": self.fingerprint}

    def announcement(self, url: str) -> dict[str, Any]:
        """The registry entry: who the worker is and where to reach it."""
        return {"url": url, "role": self.role, "model": self.model, "kv_endpoint": self.kv_endpoint,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, data: Any) -> Health:
        data = _object(data, "a health answer")
        return cls(data.get("role"), data.get("model"), data.get("kv_endpoint"), data.get("fingerprint"),
                   str(data.get("status", "ok")))


@dataclass(frozen=True)
class DrainReply:
    """A worker's answer to ``POST /drain``."""

    draining: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"draining": self.draining}


@dataclass(frozen=True)
class ErrorReply:
    """A worker's refusal: the body of any non-200 answer. ``reason``: a short machine-readable
    cause where there is one (a KV transfer's failure)."""

    message: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def parse(cls, raw: bytes, status: int) -> ErrorReply:
        """From an error answer's body: a worker's JSON error, an OpenAI-shaped one, or text."""
        text = raw.decode(errors="replace")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return cls(text[:500] or f"HTTP {status}")
        if not isinstance(data, dict):
            return cls(str(data))
        err = data.get("error", data)
        if isinstance(err, dict):
            return cls(str(err.get("message", err)), err.get("reason"))
        return cls(str(err), data.get("reason"))
