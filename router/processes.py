"""Running the router app: one process, or several that share the port through SO_REUSEPORT.

One Python process serves at most one core's worth of requests. With ``--workers N`` the parent
reserves the port (a bound, never-listening SO_REUSEPORT socket, which also resolves port 0),
then starts N processes that each bind their own listening socket to it; the kernel spreads new
connections evenly over them (unlike one shared accept queue, where the busiest process tends
to win). The parent only supervises: SIGTERM/SIGINT stop every process, and if one process dies
the others are stopped too and the parent exits with its status, so a supervisor (Kubernetes)
restarts the whole router rather than running it at part capacity unnoticed.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

from splitserve.router.config import RouterConfig

log = logging.getLogger("splitserve.router.processes")


def server_options(app: Any) -> dict[str, Any]:
    """uvicorn settings for the router ``app`` (create_app's): its connection limits (see
    connection_limits.py), refusals counted in its metrics."""
    from splitserve.router.connection_limits import limited_protocol

    state = app.state.router
    limits = state.config.limits

    def on_refuse(reason: str) -> None:
        state.metrics.child(state.metrics.refused, reason).inc()

    options = {"http": limited_protocol(limits, on_refuse), "timeout_keep_alive": limits.keep_alive_timeout_s}
    if state.config.tls_cert_file:  # HTTPS: the public endpoint's optional TLS
        options |= {"ssl_certfile": state.config.tls_cert_file, "ssl_keyfile": state.config.tls_key_file}
    return options


def _server(app: Any, **kwargs: Any) -> Any:
    import uvicorn

    _quiet_gc()
    # Per request, uvicorn would format an access-log line (even when the level hides it), run
    # its X-Forwarded-* middleware (the router does not use the client address) and add a
    # server header: all off. loop "auto" = uvloop when installed.
    config = uvicorn.Config(app, log_level="warning", access_log=False, proxy_headers=False,
                            server_header=False, loop="auto", timeout_graceful_shutdown=5,
                            backlog=4096, **server_options(app), **kwargs)
    return uvicorn.Server(config)


def _quiet_gc() -> None:
    """Fewer garbage collections: everything built at start-up is frozen out of the collector's
    view, and the youngest generation is collected every 20,000 allocations net instead of 700.
    Each request allocates hundreds of objects (futures, tasks, dicts), so at the default a
    collection ran every few requests; measured here about 15% of the router's CPU time."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def serve(app: Any, host: str, port: int) -> None:
    """Serve ``app`` in this process until SIGTERM/SIGINT."""
    _server(app, host=host, port=port).run()


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT (not yet listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _child(config: RouterConfig, port: int, log_level: int) -> None:
    from splitserve.router.app import create_app

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = reuseport_socket(config.host, port)
    sock.listen(4096)
    sock.set_inheritable(True)
    _server(create_app(config)).run(sockets=[sock])


def serve_processes(config: RouterConfig, workers: int) -> int:
    """Run ``workers`` router processes on one port; returns the exit status."""
    reserve = reuseport_socket(config.host, config.port)
    port = reserve.getsockname()[1]
    # Metrics of all processes in one directory, so any process answers a scrape with totals
    # (router/metrics.py). The children are spawned, so they import prometheus_client afresh
    # and see the variable.
    metrics_dir = tempfile.mkdtemp(prefix="splitserve-router-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    log.info("router: %d processes on %s:%d", workers, config.host, port)
    ctx = mp.get_context("spawn")  # a clean interpreter each: no inherited event loop or threads
    level = logging.getLogger().level
    procs = [ctx.Process(target=_child, args=(config, port, level), name=f"router-{i}", daemon=False)
             for i in range(workers)]
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        status = 0
        while not stopping:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                status = dead[0].exitcode or 1
                log.error("router process %s exited with %s; stopping the others", dead[0].name, dead[0].exitcode)
                break
            time.sleep(0.2)
        return status
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn shuts down gracefully
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for s, handler in old.items():
            signal.signal(s, handler)
        reserve.close()
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(metrics_dir, ignore_errors=True)
        sys.stdout.flush()
