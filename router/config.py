"""Router configuration: one frozen dataclass, validated when built.

Everything the router needs to know is here, so the app, the CLI and the tests build the same
object; a bad value fails at start-up with the field named, never later inside a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("round_robin", "least_loaded", "prefix_aware", "goodput")


@dataclass(frozen=True)
class SLO:
    """Latency targets a request should meet (ms); per request they can come from headers."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError(f"SLO targets must be > 0 ms, got ttft={self.ttft_ms} tpot={self.tpot_ms}")


@dataclass(frozen=True)
class RouterConfig:
    served_model_name: str
    model_dir: str
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    policy: str = "round_robin"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    internal_secret_file: str | None = None  # path; the secret may also come from the environment
    redis_password_file: str | None = None
    public_metrics: bool = False  # /metrics without the API key (a Prometheus admitted by policy)
    docs: bool = False  # serve /docs and /openapi.json (behind the API key when there is one)
    redis_url: str | None = None
    redis_namespace: str = "splitserve"
    latency_model_path: str | None = None
    slo: SLO = field(default_factory=SLO)
    # Timeouts (seconds). Idle = longest silence allowed between two lines of a decode stream.
    connect_timeout_s: float = 2.0
    prefill_timeout_s: float = 120.0
    stream_idle_timeout_s: float = 60.0
    # Worker polling: /load (and /health) every poll_interval_s.
    poll_interval_s: float = 0.5
    # Goodput admission: wait at most this long for a pair that can meet the SLO, then shed (429).
    max_queue_ms: float = 500.0
    max_queued_requests: int = 256
    max_attempts: int = 2  # first try + one retry on another pair

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("connect_timeout_s", "prefill_timeout_s", "stream_idle_timeout_s", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_queue_ms < 0 or self.max_queued_requests < 0:
            raise ValueError("max_queue_ms and max_queued_requests must be >= 0")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.decode_urls and not self.redis_url:
            raise ValueError("need at least one decode worker URL or a redis_url to discover them")
        object.__setattr__(self, "prefill_urls", tuple(u.rstrip("/") for u in self.prefill_urls))
        object.__setattr__(self, "decode_urls", tuple(u.rstrip("/") for u in self.decode_urls))
