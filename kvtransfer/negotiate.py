"""Which KV backend two workers use: the fastest both ends support, chosen from their offers.

Each end says what it can do in an :class:`Offer`: the backends usable in its process, where it
runs (``host``: two ends with the same value can reach each other's shared memory and CUDA IPC
handles) and whether its KV lives on a GPU, plus what its operator asked for (``requested``,
"auto" or a backend name) and which instance of the end made it (``instance``, new for every
receiver: a sender that cached a choice names the instance in its HELLO, and a receiver that
restarted at the same address refuses it with ``field="instance"``, so the sender negotiates
again before a stale choice can fail a transfer; ``auto.py``). :func:`choose` is pure and
symmetric, so both ends reach the same answer from the two offers without a further round trip:

* nobody asked for a backend: the first usable one of :data:`PREFERENCE`, fastest first
  (cuda_ipc: same host, GPUs on both ends; shm: same host; nixl: installed on both ends, and
  neither end says it is *slow* there; tcp). An end calls nixl slow when UCX has nothing faster
  than TCP to use (no RDMA device it can open, or ``UCX_TLS`` naming no RDMA transport): UCX over TCP
  moved KV at 0.25-0.4x our own tcp backend on the CPU and 0.1x on an H200 whose UCX could not
  reach GPU memory (bench/RESULTS.md), so there tcp is the faster choice;
* one end asked for one (the other said "auto"): that one if usable, else tcp as a *fallback*;
* both ends asked for different ones: tcp as a fallback (neither request can be honoured).

A fallback is never silent: the caller logs it as a warning (``Choice.fallback``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

AUTO = "auto"
FALLBACK = "tcp"  # every end can do it: one TCP connection to any host
PREFERENCE = ("cuda_ipc", "shm", "nixl", "tcp")  # fastest first
_WHY = {
    "cuda_ipc": "same host, both on GPU",
    "nixl": "nixl installed on both ends, with a transport faster than TCP",
    "shm": "same host, no GPU path on both ends",
    "tcp": "no faster backend that both ends support",
}


@dataclasses.dataclass(frozen=True)
class Offer:
    """What one end of a KV transfer can do (module doc); travels as a dict in OFFER frames."""

    backends: tuple[str, ...]
    host: str
    gpu: bool
    requested: str = AUTO
    slow: tuple[str, ...] = ()  # usable here, but not worth choosing over tcp unless asked for
    instance: str = ""  # this end's instance (``new_instance``); "" from a peer that sends none

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", tuple(str(b) for b in self.backends))
        object.__setattr__(self, "slow", tuple(str(b) for b in self.slow))
        if not isinstance(self.host, str) or not isinstance(self.requested, str) or not self.requested:
            raise ValueError("Offer.host and Offer.requested must be strings")
        if not isinstance(self.instance, str):
            raise ValueError("Offer.instance must be a string")

    def without(self, backend: str) -> Offer:
        """This offer less ``backend`` (it failed to set up here); tcp is never withdrawn."""
        if backend == FALLBACK:
            return self
        return dataclasses.replace(self, backends=tuple(b for b in self.backends if b != backend),
                                   slow=tuple(b for b in self.slow if b != backend))

    def to_dict(self) -> dict[str, Any]:
        return {"backends": list(self.backends), "host": self.host, "gpu": self.gpu,
                "requested": self.requested, "slow": list(self.slow), "instance": self.instance}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Offer:
        """Parse a peer's offer; a malformed one is a ValueError (the peer is refused)."""
        backends, slow = data.get("backends"), data.get("slow", [])
        if not isinstance(backends, list) or not isinstance(slow, list) or not isinstance(data.get("gpu"), bool):
            raise ValueError(f"malformed KV offer: {dict(data)!r}")
        return cls(tuple(backends), data.get("host"), data["gpu"], data.get("requested", AUTO), tuple(slow),
                   data.get("instance", ""))


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    fallback: bool = False  # the requested backend could not be used: log a warning


def unusable(backend: str, mine: Offer, peer: Offer) -> str | None:
    """Why ``backend`` cannot carry KV between these two ends (None: it can)."""
    if backend == FALLBACK:
        return None
    if backend not in mine.backends:
        return "it is not available on this end"
    if backend not in peer.backends:
        return "the peer lacks it"
    if backend in ("cuda_ipc", "shm") and mine.host != peer.host:
        return "the two ends are on different hosts"
    if backend == "cuda_ipc" and not (mine.gpu and peer.gpu):
        return "not both ends are on a GPU"
    return None


def choose(mine: Offer, peer: Offer) -> Choice:
    """The backend for transfers between these two ends, and why (module doc for the rule).
    Symmetric: ``choose(a, b).backend == choose(b, a).backend``."""
    requests = sorted({r for r in (mine.requested, peer.requested) if r != AUTO})
    if len(requests) > 1:
        return Choice(FALLBACK, f"the ends ask for different backends ({mine.requested} here, "
                                f"{peer.requested} on the peer)", fallback=True)
    if requests:
        wanted = requests[0]
        why_not = unusable(wanted, mine, peer)
        if why_not is None:
            return Choice(wanted, f"{wanted} was requested")
        return Choice(FALLBACK, f"{wanted} was requested but {why_not}", fallback=True)
    for backend in PREFERENCE:
        if backend in mine.slow or backend in peer.slow:
            continue
        if unusable(backend, mine, peer) is None:
            return Choice(backend, _WHY[backend])
    raise AssertionError("tcp is always usable")


def offered(requested: str, usable: Iterable[str]) -> tuple[str, ...]:
    """The backends an end offers: those usable here, in preference order, tcp always."""
    have = set(usable) | {FALLBACK}
    return tuple(b for b in PREFERENCE if b in have)


def new_instance() -> str:
    """A fresh instance id for one end (``Offer.instance``): unique per receiver made, so one
    restarted at the same address is told apart from the one before."""
    return secrets.token_hex(8)


@functools.cache
def host_identity() -> str:
    """Equal for two processes that share a kernel (boot id), IPC and mount namespaces: the
    ones whose /dev/shm segments and CUDA IPC handles reach each other. Two pods on one node
    differ (their own /dev/shm), so they use nixl or tcp, never shm."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/ipc", "/proc/self/ns/mnt"):
        try:
            parts.append(os.readlink(path) if "/ns/" in path else Path(path).read_text().strip())
        except OSError:
            parts.append(socket.gethostname())
    return "/".join(parts)


# UCX transports faster than TCP between hosts (RDMA verbs, GPUDirect copy), by UCX_TLS name;
# cuda_ipc/cuda_copy move GPU memory within a host only, where cuda_ipc and shm are ours already
_FAST_UCX = ("rc", "ud", "dc", "ib", "mlx5", "gdr", "efa")


def nixl_has_fast_path(env: Mapping[str, str] | None = None, rdma_dev: str = "/dev/infiniband") -> bool:
    """Whether NIXL's UCX can use a transport faster than TCP here: an RDMA device this process
    can open (``uverbs*`` under /dev/infiniband: a pod without the RDMA device plugin sees the
    host's /sys/class/infiniband but not these), and ``UCX_TLS`` unset, ``all``, an exclusion
    list, or naming an RDMA transport."""
    try:
        devices = [d for d in Path(rdma_dev).glob("uverbs*") if os.access(d, os.R_OK | os.W_OK)]
    except OSError:
        devices = []
    if not devices:
        return False
    tls = (os.environ if env is None else env).get("UCX_TLS", "").strip()
    if tls and tls != "all" and not tls.startswith("^"):
        return any(part.strip().startswith(_FAST_UCX) for part in tls.split(","))
    return True
