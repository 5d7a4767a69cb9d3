"""Router configuration: one frozen dataclass, validated when built.

Everything the router needs to know is here, so the app, the CLI and the tests build the same
object; a bad value fails at start-up with the field named, never later inside a request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from splitserve.router.policy.presets import POLICIES

if TYPE_CHECKING:
    from splitserve.router.policy.spec import PolicySpec


@dataclass(frozen=True)
class SLO:
    """Latency targets a request should meet (ms); per request they can come from headers."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            check_slo_ms(name, getattr(self, name))


MAX_SLO_MS = 3_600_000.0  # an hour: anything longer is not a latency target


def check_slo_ms(name: str, value: float) -> None:
    """A latency target must be a finite number of milliseconds in (0, MAX_SLO_MS]: NaN compares
    false with everything and would pass any later check, infinity would make every pair fit."""
    if not 0 < value <= MAX_SLO_MS:  # False for NaN too
        raise ValueError(f"{name} must be a number of milliseconds in (0, {MAX_SLO_MS:.0f}], got {value}")


@dataclass(frozen=True)
class Limits:
    """What one client can make a router process hold; each refusal is counted by reason
    (``splitserve_router_refused_total``). Connection limits are per process. What each field
    means, and how the CLI, ``splitserve up``, the CRD and the chart spell it: ``LIMIT_OPTIONS``."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_sequences: int = 64
    max_connections: int = 4096
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _check({option.field: getattr(self, option.field) for option in LIMIT_OPTIONS})


@dataclass(frozen=True)
class RouterOption:
    """One router setting that users outside the router process may set, and how each place
    spells it: the router's flag (``--max-body-bytes``), the key under an InferenceService's
    ``spec.router.<section>`` and the chart's ``router<Section>`` (``maxBodyBytes``; seconds
    end in ``Seconds``, milliseconds in ``Milliseconds``). Type and default are the field's own
    (of :class:`Limits` or :class:`RouterConfig`); an integer must be >= 1, a number of seconds
    or milliseconds > 0 and finite (>= 0 for an option where 0 means "none": ``allow_zero``)."""

    field: str  # the Limits or RouterConfig attribute; ``_s`` marks seconds, ``_ms`` milliseconds
    help: str
    allow_zero: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.removesuffix("_s").replace("_", "-")

    @property
    def key(self) -> str:
        words = self.field.split("_")
        words[-1] = {"s": "seconds", "ms": "milliseconds"}.get(words[-1], words[-1])
        return words[0] + "".join(w.capitalize() for w in words[1:])

    @property
    def default(self) -> int | float:
        return next(f.default for holder in (Limits, RouterConfig) for f in fields(holder) if f.name == self.field)

    @property
    def default_text(self) -> str:
        return f"{self.default:g}" if self.type is float else str(self.default)

    @property
    def type(self) -> type[int] | type[float]:
        return float if self.field.endswith(("_s", "_ms")) else int

    @property
    def minimum(self) -> int:
        """The least value: 0 where 0 means none, else 1 for an integer (a number: above 0)."""
        return 0 if self.allow_zero else 1

    def problem(self, value: object) -> str | None:
        """Why ``value`` cannot be this option (a phrase to follow its name), or None."""
        if self.type is int:
            if not isinstance(value, int) or isinstance(value, bool) or value < self.minimum:
                return f"must be an integer >= {self.minimum}, got {value!r}"
            return None
        unit = "milliseconds" if self.field.endswith("_ms") else "seconds"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and 0 <= value < math.inf and (value > 0 or self.allow_zero)):  # NaN fails 0 <= value
            return f"must be a number of {unit} {'>=' if self.allow_zero else '>'} 0 and finite, got {value!r}"
        return None


LIMIT_OPTIONS = (  # every field of Limits
    RouterOption("max_body_bytes", "request body size; 413 after this many bytes, the rest unread"),
    RouterOption("max_header_bytes", "request line and headers; 431 beyond"),
    RouterOption("max_sequences", "prompts x n in one request; 400 beyond"),
    RouterOption("max_connections", "open client connections per router process; more are answered 503 and closed"),
    RouterOption("header_timeout_s", "seconds from a request's first byte to the end of its headers; 408"),
    RouterOption("body_timeout_s", "seconds from the end of the headers to the end of the body; 408"),
    RouterOption("keep_alive_timeout_s",
                 "seconds an idle connection is kept, before its first request or between two"),
)
FAILOVER_OPTIONS = (  # RouterConfig fields: how soon a failing worker is given up, how often retried
    RouterOption("poll_interval_s", "seconds between two /load polls of each worker"),
    RouterOption("poll_timeout_s", "seconds a worker's /load (or /health) poll may take; no answer "
                 "marks the worker unhealthy; a worker busy computing still answers its polls"),
    RouterOption("stream_stall_timeout_s", "seconds a decode stream may be silent on a worker marked "
                 "unhealthy before it is resumed on another pair; a worker that answers its polls is "
                 "never given up, however slow its tokens"),
    RouterOption("stream_idle_timeout_s", "seconds a decode stream may be silent at all, the last resort "
                 "when polls still answer"),
    RouterOption("max_attempts", "tries per sequence on different worker pairs before a worker failure "
                 "is the client's error; only tries in a row that sent no token count: a sequence whose "
                 "decode worker fails after sending tokens is resumed on another pair from them"),
)
ADMISSION_OPTIONS = (  # RouterConfig fields: how long and how many requests wait for a pair
    RouterOption("max_queue_ms", "milliseconds a request may wait in admission for a pair that can meet "
                 "its targets (goodput) or a decode worker with KV room for its prompt, before 429; "
                 "0: never wait", allow_zero=True),
    RouterOption("max_queued_requests", "requests waiting in admission at once (per router process); "
                 "more are answered 429 at once; 0: none wait", allow_zero=True),
)
# section -> its options: ``spec.router.<section>``, the chart's ``router<Section>``
ROUTER_OPTIONS = {"limits": LIMIT_OPTIONS, "failover": FAILOVER_OPTIONS, "admission": ADMISSION_OPTIONS}
_BY_FIELD = {option.field: option for options in ROUTER_OPTIONS.values() for option in options}


def options_from_keys(section: str, given: Mapping[str, object], where: str) -> dict[str, int | float]:
    """A section's options as an InferenceService or the chart spells them (``maxBodyBytes:
    1024``) -> field -> value; a ValueError names ``where.key`` for an unknown key or a bad value."""
    by_key = {option.key: option for option in ROUTER_OPTIONS[section]}
    out = {}
    for key, value in given.items():
        option = by_key.get(key)
        if option is None:
            raise ValueError(f"{where}.{key}: unknown router {section} field (known: {', '.join(by_key)})")
        problem = option.problem(value)
        if problem:
            raise ValueError(f"{where}.{key} {problem}")
        out[option.field] = value  # type: ignore[assignment]  (checked just above)
    return out


def option_args(values: Mapping[str, int | float]) -> list[str]:
    """The router's command-line flags for ``values`` (field -> value, any section), in the
    tables' order; raises ValueError naming the field for an unknown name or a bad value."""
    _check(values)
    return [arg for option in _BY_FIELD.values() if option.field in values
            for arg in (option.flag, str(values[option.field]))]


def _check(values: Mapping[str, object]) -> None:
    """ValueError naming the first field of ``values`` (field -> value) that is no router
    option or whose value its option refuses."""
    unknown = set(values) - set(_BY_FIELD)
    if unknown:
        raise ValueError(f"unknown router option {', '.join(sorted(unknown))}")
    for name, value in values.items():
        problem = _BY_FIELD[name].problem(value)
        if problem:
            raise ValueError(f"{name} {problem}")


@dataclass(frozen=True)
class RouterConfig:
    served_model_name: str
    model_dir: str
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    policy: str = "round_robin"  # a preset's name, or the name of ``policy_config``
    policy_config: PolicySpec | None = None  # a policy as data (--policy-config), instead of a preset
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    internal_secret_file: str | None = None  # path; the secret may also come from the environment
    redis_password_file: str | None = None
    public_metrics: bool = False  # /metrics without the API key (a Prometheus admitted by policy)
    docs: bool = False  # serve /docs and /openapi.json (behind the API key when there is one)
    tls_cert_file: str | None = None  # HTTPS for the public endpoint (PEM), with tls_key_file
    tls_key_file: str | None = None
    redis_url: str | None = None
    redis_namespace: str = "splitserve"
    latency_model_path: str | None = None
    slo: SLO = field(default_factory=SLO)
    # Timeouts (seconds). Idle = longest silence allowed between two lines of a decode stream.
    connect_timeout_s: float = 2.0
    prefill_timeout_s: float = 120.0
    stream_idle_timeout_s: float = 60.0
    # A decode stream silent this long on a worker that misses its polls is resumed elsewhere (stall.py).
    stream_stall_timeout_s: float = 2.0
    # Worker polling: /load (and /health) every poll_interval_s; no answer within poll_timeout_s
    # marks the worker unhealthy.
    poll_interval_s: float = 0.5
    poll_timeout_s: float = 2.0
    # Admission: wait at most this long for a pair that can meet the SLO or has KV room, then shed (429).
    max_queue_ms: float = 500.0
    max_queued_requests: int = 256
    max_attempts: int = 2  # first try + one retry on another pair
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        self._check_policy()
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("connect_timeout_s", "prefill_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:  # False for NaN too
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        _check({option.field: getattr(self, option.field) for option in (*FAILOVER_OPTIONS, *ADMISSION_OPTIONS)})
        if not self.decode_urls and not self.redis_url:
            raise ValueError("need at least one decode worker URL or a redis_url to discover them")
        object.__setattr__(self, "prefill_urls", tuple(u.rstrip("/") for u in self.prefill_urls))
        object.__setattr__(self, "decode_urls", tuple(u.rstrip("/") for u in self.decode_urls))

    def _check_policy(self) -> None:
        if self.policy_config is None:
            if self.policy not in POLICIES:
                raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        elif self.policy_config.name in POLICIES:
            raise ValueError(f"policy configuration {self.policy_config.name!r} takes a preset's name: "
                             "give it its own (metrics and logs label decisions by it)")
        elif self.policy != self.policy_config.name:
            raise ValueError(f"policy {self.policy!r} is not the configuration's name {self.policy_config.name!r}")
