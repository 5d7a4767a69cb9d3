"""Start, watch and stop the processes of a local deployment.

Each component is a real process running a ``splitserve`` subcommand; readiness is its HTTP
``/health`` answering. If any process dies while starting, the group says which and stops the
rest, rather than leaving a half-working system behind; once serving, ``supervise.Supervisor``
restarts what exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polling is not news


def python_command(*args: str) -> list[str]:
    """This interpreter in safe-path mode (``-P``), followed by ``args``.

    Why: ``python -m``/``-c`` otherwise put the working directory first on ``sys.path``, and run
    from the repository root, our top-level folders (``kernels``, ``router``, ``engine``, ...)
    shadow installed distributions of the same name (transformers imports Hugging Face's
    ``kernels``). Every process the project starts goes through here."""
    return [sys.executable, "-P", *args]


def wait_http_ok(url: str, timeout: float) -> None:
    """Block until ``url`` answers 200; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s")


@dataclass
class Component:
    name: str
    args: list[str]
    health_url: str
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def command(self) -> list[str]:
        return python_command("-m", "splitserve.cli", *self.args)


class ProcessGroup:
    def __init__(self, log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.components: list[Component] = []
        self.log_dir = log_dir
        self.env = {**os.environ, **(env or {})}

    def start(self, component: Component) -> Component:
        self._spawn(component)
        self.components.append(component)
        log.info("started %s (pid %d): %s", component.name, component.process.pid, " ".join(component.args))
        return component

    def restart(self, component: Component) -> None:
        """Start an exited component again with the same arguments (so the same ports: the
        router and the registry find it where it was), its output appended to the same log."""
        if component.process is not None and component.process.poll() is None:
            raise RuntimeError(f"{component.name} is still running (pid {component.process.pid})")
        self._spawn(component)
        log.info("restarted %s (pid %d)", component.name, component.process.pid)

    def _spawn(self, component: Component) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            component.log_path = self.log_dir / f"{component.name}.log"
            out = component.log_path.open("ab")
        component.process = subprocess.Popen(
            component.command, stdout=out, stderr=subprocess.STDOUT if out else None, env=self.env
        )
        if out is not None:
            out.close()

    def _tail(self, component: Component, lines: int = 20) -> str:
        if component.log_path is None or not component.log_path.exists():
            return ""
        return "\n".join(component.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, components: list[Component], timeout: float = 300.0) -> None:
        """Block until every component's /health answers 200; raise if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        pending = list(components)
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for c in list(pending):
                    if c.process.poll() is not None:
                        raise RuntimeError(
                            f"{c.name} exited with code {c.process.returncode} while starting\n{self._tail(c)}"
                        )
                    try:
                        if client.get(c.health_url).status_code == 200:
                            pending.remove(c)
                    except httpx.HTTPError:
                        pass
                if pending and time.monotonic() > deadline:
                    names = ", ".join(c.name for c in pending)
                    raise TimeoutError(f"not ready after {timeout:.0f}s: {names}")
                if pending:
                    time.sleep(0.2)

    def dead(self) -> list[Component]:
        return [c for c in self.components if c.process and c.process.poll() is not None]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM everyone (router first, so no new work arrives), then SIGKILL stragglers."""
        for c in reversed(self.components):
            if c.process and c.process.poll() is None:
                c.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in self.components:
            if c.process is None:
                continue
            try:
                c.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", c.name, timeout)
                c.process.kill()
                c.process.wait()
        self.components.clear()
