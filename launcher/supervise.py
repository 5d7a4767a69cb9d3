"""Keep a serving deployment's processes running: what exits is started again.

Life cycle of one component: running -> exited (logged with its exit code) -> waiting out its
backoff -> restarted with the same arguments (same ports, so the router's static registry, or
the worker's own Redis heartbeat, finds it where it was) -> back (``/health`` answers; logged).
While a worker is away the router serves through the pool that is left: its requests to the dead
worker fail to connect, mark it unhealthy and are retried on another pair; its polls see it
healthy again once it is back. The backoff doubles with each restart of the same component in
the window; a component that needs more than ``max_restarts`` restarts in ``window_s`` is
failing for a reason a restart will not fix, and the supervisor gives up loudly (``GaveUp``)
instead of restarting it forever.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from splitserve.launcher.processes import Component, ProcessGroup

log = logging.getLogger("splitserve.up")


class GaveUp(RuntimeError):
    """A component exited more often than the restart policy allows."""


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0  # before the first restart in a window; doubles with each one after
    max_backoff_s: float = 30.0
    max_restarts: int = 5  # restarts of one component within window_s; 0: never restart
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("need max_restarts >= 0 and window_s > 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based) within the window."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


def health_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


class Supervisor:
    """Call ``tick()`` every fraction of a second; it never blocks on a component."""

    def __init__(
        self,
        group: ProcessGroup,
        policy: RestartPolicy,
        clock: Callable[[], float] = time.monotonic,
        is_healthy: Callable[[str], bool] = health_ok,
    ) -> None:
        self.group, self.policy, self.clock, self.is_healthy = group, policy, clock, is_healthy
        self._restarts: dict[str, deque[float]] = {}  # name -> when it was restarted, in the window
        self._due: dict[str, float] = {}  # exited, to restart at this time
        self._coming_back: dict[str, float] = {}  # restarted at this time, /health not yet 200

    def tick(self) -> None:
        now = self.clock()
        for component in self.group.dead():
            if component.name not in self._due:
                self._exited(component, now)
        for component in self.group.components:
            due = self._due.get(component.name)
            if due is not None and now >= due:
                del self._due[component.name]
                self.group.restart(component)
                self._restarts[component.name].append(now)
                self._coming_back[component.name] = now
        self._check_back(now)

    def _exited(self, component: Component, now: float) -> None:
        code = component.process.returncode
        self._coming_back.pop(component.name, None)
        recent = self._restarts.setdefault(component.name, deque())
        while recent and now - recent[0] > self.policy.window_s:
            recent.popleft()
        if len(recent) >= self.policy.max_restarts:
            raise GaveUp(
                f"{component.name} exited with code {code} after {len(recent)} restarts in the last "
                f"{self.policy.window_s:.0f}s; giving up" + (f" (its log: {component.log_path})"
                                                           if component.log_path else "")
            )
        attempt = len(recent) + 1
        delay = self.policy.delay(attempt)
        log.warning("%s exited with code %s; restarting (attempt %d) in %.1fs", component.name, code, attempt, delay)
        self._due[component.name] = now + delay

    def _check_back(self, now: float) -> None:
        for component in self.group.components:
            started = self._coming_back.get(component.name)
            if started is not None and self.is_healthy(component.health_url):
                del self._coming_back[component.name]
                log.info("%s is back: ready %.1fs after its restart (pid %d)",
                         component.name, now - started, component.process.pid)
