"""Where routers learn which workers exist, and how workers say they do.

- ``StaticRegistry``: the URLs given on the command line (single host, no Redis).
- ``RedisRegistry``: workers announce themselves with ``start_heartbeat``: a key
  ``<namespace>:worker:<role>:<url>`` holding their info as JSON, with a TTL a few times the
  heartbeat interval. A worker that stops heartbeating expires and leaves the candidate set
  within one TTL; several routers read the same keys. If Redis goes away the router keeps the
  last set it saw (and says so in the log) instead of failing requests, and picks up again when
  Redis is back; heartbeats re-create their keys after a Redis restart. A worker whose key
  vanished stays a candidate for ``grace_s`` (one TTL) after it was last seen, so a Redis that
  comes back empty does not empty the pool until the heartbeats have written it again.

With an internal secret, each entry carries ``mac``: an HMAC (the secret's ``registry`` key) over
its key and its content, so whoever can write to Redis but lacks the secret cannot announce a
fake decode worker (which would receive users' prompts) or move a real entry to another key. The
router ignores entries whose MAC fails, counts them, and logs each such key once.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from splitserve.trust import InternalSecret, read_secret

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerInfo:
    url: str
    role: str
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker role must be prefill or decode, got {self.role!r}")


class Registry(Protocol):
    async def workers(self) -> list[WorkerInfo]: ...

    async def aclose(self) -> None: ...


class StaticRegistry:
    def __init__(self, prefill_urls: tuple[str, ...] | list[str], decode_urls: tuple[str, ...] | list[str]) -> None:
        self._workers = [WorkerInfo(u.rstrip("/"), "prefill") for u in prefill_urls] + [
            WorkerInfo(u.rstrip("/"), "decode") for u in decode_urls
        ]

    async def workers(self) -> list[WorkerInfo]:
        return list(self._workers)

    async def aclose(self) -> None:
        return None


def worker_key(namespace: str, role: str, url: str) -> str:
    return f"{namespace}:worker:{role}:{url}"


MAC_PURPOSE = "registry"


def _entry_mac(secret: InternalSecret, key: str, info: dict[str, Any]) -> str:
    content = json.dumps({k: v for k, v in info.items() if k != "mac"}, sort_keys=True,
                         separators=(",", ":"))
    return secret.sign(MAC_PURPOSE, key, content)


def signed_entry(secret: InternalSecret | None, key: str, info: dict[str, Any]) -> dict[str, Any]:
    """``info`` as stored under ``key``: with its MAC when there is a secret."""
    return dict(info, mac=_entry_mac(secret, key, info)) if secret is not None else dict(info)


def entry_verified(secret: InternalSecret, key: str, info: dict[str, Any]) -> bool:
    """Whether the entry stored under ``key`` was written by a holder of ``secret``."""
    mac = info.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac.encode(), _entry_mac(secret, key, info).encode())


def redis_password(path: str | None = None) -> str | None:
    """The Redis password from ``path``, ``SPLITSERVE_REDIS_PASSWORD_FILE`` or
    ``SPLITSERVE_REDIS_PASSWORD`` (never a URL on the command line, where anyone can read it)."""
    return read_secret(path, file_env="SPLITSERVE_REDIS_PASSWORD_FILE",
                       value_env="SPLITSERVE_REDIS_PASSWORD", what="Redis password")


class RedisRegistry:
    """Reads worker keys from Redis; the static URLs (if any) are always included. With
    ``secret``, only entries whose MAC verifies; ``on_forged(key)`` counts the others."""

    def __init__(
        self, redis_url: str, namespace: str = "splitserve", static: StaticRegistry | None = None,
        *, secret: InternalSecret | None = None, password: str | None = None,
        on_forged: Callable[[str], None] | None = None, grace_s: float = 3.0,
    ) -> None:
        import redis.asyncio as aioredis

        extra = {"password": password} if password else {}
        self._redis = aioredis.from_url(
            redis_url, socket_connect_timeout=1.0, socket_timeout=1.0, decode_responses=True, **extra
        )
        self._secret = secret
        self._on_forged = on_forged
        self._forged_seen: set[str] = set()
        self._namespace = namespace
        self._static = static or StaticRegistry((), ())
        self._last: list[WorkerInfo] = []
        self._seen: dict[tuple[str, str], tuple[WorkerInfo, float]] = {}  # (role, url) -> last seen
        self.grace_s = grace_s
        self.redis_ok = False

    async def workers(self) -> list[WorkerInfo]:
        import redis.exceptions

        try:
            found = await self._scan()
        except (redis.exceptions.RedisError, OSError) as exc:
            if self.redis_ok:
                log.warning("Redis unavailable (%s); keeping the last %d known workers", exc, len(self._last))
            self.redis_ok = False
        else:
            if not self.redis_ok:
                log.info("Redis registry: %d workers", len(found))
            self.redis_ok, self._last = True, self._with_recent(found)
        static = await self._static.workers()
        seen = {(w.role, w.url) for w in static}
        return static + [w for w in self._last if (w.role, w.url) not in seen]

    def _with_recent(self, found: list[WorkerInfo]) -> list[WorkerInfo]:
        """``found`` plus the workers seen within one TTL (their entry's ``ttl_s``, else
        ``grace_s``) whose keys are missing now (a Redis restarted empty, before their next
        heartbeat): a worker that really stopped still leaves within two TTLs."""
        now = time.monotonic()
        for w in found:
            self._seen[(w.role, w.url)] = (w, now)
        self._seen = {k: (w, seen) for k, (w, seen) in self._seen.items()
                      if now - seen <= float(dict(w.extra).get("ttl_s", self.grace_s))}
        return sorted((w for w, _ in self._seen.values()), key=lambda w: (w.role, w.url))

    async def _scan(self) -> list[WorkerInfo]:
        keys = [k async for k in self._redis.scan_iter(match=f"{self._namespace}:worker:*", count=500)]
        if not keys:
            return []
        values = await self._redis.mget(keys)
        out = []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                info = json.loads(raw)
                if self._secret is not None and not entry_verified(self._secret, key, info):
                    self._forged(key)
                    continue
                info.pop("mac", None)
                out.append(
                    WorkerInfo(
                        info["url"].rstrip("/"),
                        info["role"],
                        tuple(sorted((k, v) for k, v in info.items() if k not in ("url", "role"))),
                    )
                )
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                log.warning("ignoring malformed registry entry %s: %s", key, exc)
        return sorted(out, key=lambda w: (w.role, w.url))

    def _forged(self, key: str) -> None:
        if self._on_forged is not None:
            self._on_forged(key)
        if key not in self._forged_seen:  # once per key: a forger must not flood the log
            self._forged_seen.add(key)
            log.warning("ignoring registry entry %s: its MAC does not verify (written without "
                        "this deployment's internal secret)", key)

    async def aclose(self) -> None:
        await self._redis.aclose()


class Heartbeat:
    """A daemon thread that keeps one worker's key alive in Redis."""

    def __init__(
        self, redis_url: str, info: dict[str, Any], interval: float, namespace: str,
        ttl: float | None, secret: InternalSecret | None = None, password: str | None = None,
    ) -> None:
        import redis

        if "url" not in info or info.get("role") not in ROLES:
            raise ValueError("heartbeat info needs 'url' and 'role' (prefill or decode)")
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, got {interval}")
        self.interval = interval
        self.ttl_ms = int(1000 * (ttl if ttl is not None else max(3 * interval, 1.0)))
        # the TTL travels with the entry: routers keep a vanished entry for that long at most
        self.info = dict(info, url=str(info["url"]).rstrip("/"), ttl_s=self.ttl_ms / 1000)
        self.key = worker_key(namespace, self.info["role"], self.info["url"])
        self._entry = json.dumps(signed_entry(secret, self.key, self.info))
        extra = {"password": password} if password else {}
        self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=1.0, **extra)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.key}", daemon=True)
        self.beats = 0
        self._thread.start()

    def _run(self) -> None:
        import redis.exceptions

        failing = False
        while not self._stop.is_set():
            try:
                self._redis.set(self.key, self._entry, px=self.ttl_ms)
                self.beats += 1
                if failing:
                    log.info("heartbeat %s: Redis is back", self.key)
                failing = False
            except (redis.exceptions.RedisError, OSError) as exc:
                if not failing:
                    log.warning("heartbeat %s failed (%s); retrying every %.1fs", self.key, exc, self.interval)
                failing = True
            self._stop.wait(self.interval)

    def stop(self, deregister: bool = True) -> None:
        """Stop beating; ``deregister`` deletes the key at once (a clean shutdown) instead of
        letting it expire."""
        import redis.exceptions

        self._stop.set()
        self._thread.join(timeout=self.interval + 2.0)
        if deregister:
            try:
                self._redis.delete(self.key)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("could not remove %s from Redis (%s); it expires by itself", self.key, exc)
        self._redis.close()


def start_heartbeat(
    redis_url: str,
    info: dict[str, Any],
    interval: float = 1.0,
    namespace: str = "splitserve",
    ttl: float | None = None,
    secret: InternalSecret | None = None,
    password: str | None = None,
) -> Heartbeat:
    """Register a worker in Redis and keep it registered until ``.stop()``.

    ``info`` needs ``url`` (how routers reach the worker) and ``role``; anything else (model,
    kv_endpoint, fingerprint) is passed along. The key's TTL defaults to 3 x interval (>= 1 s).
    With ``secret`` the entry carries its MAC; ``password`` authenticates to Redis.
    """
    return Heartbeat(redis_url, info, interval, namespace, ttl, secret, password)
