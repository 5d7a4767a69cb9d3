"""``splitserve up``: a router, prefill workers and decode workers on this machine.

The plan (which processes, with which arguments and ports) is a pure function so tests can read
it without starting anything; ``run`` starts it, waits for readiness and tears it down.

Internal authentication is on even on a laptop: unless the environment already names a secret,
each run generates one, writes it to a file only this user can read, and hands its children the
path in ``SPLITSERVE_INTERNAL_SECRET_FILE``; never on their command lines, which every local
user can read.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.launcher.processes import Component, ProcessGroup
from splitserve.router.config import option_args
from splitserve.trust import ENV_FILE, generate_secret, load_internal_secret, write_secret_file

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path.home() / ".cache" / "splitserve" / "demo-model"


@dataclass(frozen=True)
class UpConfig:
    model: str
    served_model_name: str
    num_prefill: int = 1
    num_decode: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "round_robin"
    devices: tuple[str, ...] = ()  # assigned round robin: prefill workers first, then decode
    worker_args: tuple[str, ...] = ()  # passed to every worker (e.g. --dtype, --num-kv-blocks)
    router_args: tuple[str, ...] = ()
    router_options: Mapping[str, int | float] = field(default_factory=dict)  # limits, worker faults: field -> value
    log_dir: Path | None = None
    redis_url: str | None = None  # workers announce themselves there; the router discovers them
    worker_ports: tuple[int, ...] = field(default=())  # default: free ports
    # Of each device, shared by the workers placed on it (unless --worker-args sets a worker's own)
    gpu_memory_utilization: float = 0.85

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("need at least one decode worker (zero prefill workers = colocated: "
                             "decode workers prefill prompts themselves)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        option_args(self.router_options)  # a bad one fails here, before any process starts


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _device_key(device: str | None) -> str:
    """Workers without a device use the default one, which is cuda:0 when there is a GPU."""
    return "cuda:0" if device in (None, "cuda") else device


def memory_shares(devices: list[str | None], fraction: float) -> list[float | None]:
    """Each worker's ``--gpu-memory-utilization``: ``fraction`` of its device divided evenly
    among the workers placed there (None for a CPU worker: it has no share to set). Why: a
    worker sizes its KV cache from its share of the device's total memory, so workers sharing a
    device must have shares that sum to at most what the device may give."""
    keys = [_device_key(d) for d in devices]
    return [None if key.startswith("cpu") else fraction / keys.count(key) for key in keys]


def _sets_option(args: tuple[str, ...], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def plan(cfg: UpConfig) -> list[Component]:
    """Every process of the deployment, router last (it needs the workers' URLs)."""
    n = cfg.num_prefill + cfg.num_decode
    ports = list(cfg.worker_ports) or [free_port() for _ in range(n)]
    if len(ports) != n:
        raise ValueError(f"need {n} worker ports, got {len(ports)}")
    components, urls = [], {"prefill": [], "decode": []}
    devices = [cfg.devices[i % len(cfg.devices)] if cfg.devices else None for i in range(n)]
    shares = memory_shares(devices, cfg.gpu_memory_utilization)
    own_share = _sets_option(cfg.worker_args, "--gpu-memory-utilization")
    own_kv_port = _sets_option(cfg.worker_args, "--kv-port")
    for i in range(n):
        role = "prefill" if i < cfg.num_prefill else "decode"
        index = i if role == "prefill" else i - cfg.num_prefill
        url = f"http://127.0.0.1:{ports[i]}"
        args = [role, "--model", cfg.model, "--host", "127.0.0.1", "--port", str(ports[i]), *cfg.worker_args]
        if cfg.redis_url:
            args += ["--redis-url", cfg.redis_url]
        if role == "decode" and not own_kv_port:
            # a fixed KV port, so a restarted decode worker is where prefill workers expect it
            args += ["--kv-port", str(free_port())]
        if devices[i]:
            args += ["--device", devices[i]]
        if shares[i] is not None and not own_share:
            args += ["--gpu-memory-utilization", f"{shares[i]:.4g}"]
        components.append(Component(f"{role}-{index}", args, f"{url}/health"))
        urls[role].append(url)
    router = ["router", "--model", cfg.model, "--served-model-name", cfg.served_model_name,
              "--host", cfg.host, "--port", str(cfg.port), "--policy", cfg.policy]
    router += option_args(cfg.router_options)
    if cfg.redis_url:
        router += ["--redis-url", cfg.redis_url]
    else:
        for role in ("prefill", "decode"):
            for url in urls[role]:
                router += [f"--{role}", url]
    health_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    components.append(Component("router", [*router, *cfg.router_args], f"http://{health_host}:{cfg.port}/health"))
    return components


class Deployment:
    """A started deployment; a context manager that always stops what it started."""

    def __init__(self, cfg: UpConfig) -> None:
        self.cfg = cfg
        self._secret_dir: Path | None = None
        self.group = ProcessGroup(cfg.log_dir, self._secret_env())

    def _secret_env(self) -> dict[str, str]:
        """The environment that gives every child the run's internal secret: none to add when
        the environment already configures one (the children inherit it), else a fresh secret
        in a private file."""
        if load_internal_secret() is not None:
            return {}
        self._secret_dir = Path(tempfile.mkdtemp(prefix="splitserve-up-"))  # 0700
        path = write_secret_file(self._secret_dir / "internal-secret", generate_secret())
        return {ENV_FILE: str(path)}

    def internal_headers(self) -> dict[str, str]:
        """The headers that authenticate a request to this deployment's workers (their /load,
        /metrics: everything but /health needs the internal secret)."""
        from splitserve.trust.http import auth_headers

        return auth_headers(load_internal_secret(environ=self.group.env))

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        return f"http://{host}:{self.cfg.port}/v1"

    def start(self, timeout: float = 300.0) -> Deployment:
        components = plan(self.cfg)
        try:
            workers = [self.group.start(c) for c in components[:-1]]
            self.group.wait_ready(workers, timeout)
            router = self.group.start(components[-1])
            self.group.wait_ready([router], timeout)
        except BaseException:
            self.group.stop()
            raise
        return self

    def component(self, name: str) -> Component:
        return next(c for c in self.group.components if c.name == name)

    def stop(self) -> None:
        self.group.stop()
        if self._secret_dir is not None:
            shutil.rmtree(self._secret_dir, ignore_errors=True)
            self._secret_dir = None

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
