"""The live set of workers: registry membership plus health and load from polling.

A loop asks the registry who exists, then polls each worker's ``/load`` (and ``/health`` when the
worker is new, unhealthy, or its KV endpoint is unknown). A worker is healthy only while its
polls succeed; a request that cannot reach a worker marks it unhealthy at once, so the next
request avoids it without waiting for the next poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from splitserve.discovery.registry import Registry
from splitserve.router.workers import WorkerClient, WorkerRejected, WorkerState, WorkerUnreachable

log = logging.getLogger("splitserve.router.pool")


class WorkerPool:
    def __init__(self, registry: Registry, client: WorkerClient, poll_interval_s: float) -> None:
        self.registry = registry
        self.client = client
        self.poll_interval_s = poll_interval_s
        self.workers: dict[tuple[str, str], WorkerState] = {}
        self._by_role: dict[str, list[WorkerState]] = {}
        self._task: asyncio.Task | None = None
        # Called after each round (loads, health and membership may have changed): admission.
        self.on_change: set[Callable[[], None]] = set()

    def role(self, role: str) -> list[WorkerState]:
        """The workers of one role (a list kept between membership changes: every request asks,
        membership changes at most once per poll). Callers must not modify it."""
        found = self._by_role.get(role)
        if found is None:
            found = self._by_role[role] = [w for (r, _), w in self.workers.items() if r == role]
        return found

    def mark_unhealthy(self, worker: WorkerState, why: str) -> None:
        """Mark ``worker`` down; requests waiting on it for their first token fail over now
        (its ``on_unhealthy`` callbacks) rather than wait out their timeouts."""
        if worker.healthy:
            log.warning("%s worker %s marked unhealthy: %s", worker.role, worker.url, why)
        worker.healthy, worker.last_error = False, why
        for callback in list(worker.on_unhealthy):
            callback()

    async def refresh(self) -> None:
        """One round: membership, then every worker's health/load concurrently."""
        infos = await self.registry.workers()
        current = {(i.role, i.url): i for i in infos}
        for key in list(self.workers):
            if key not in current:
                log.info("%s worker %s left the registry", *key)
                del self.workers[key]
                self._by_role.clear()
        for key, info in current.items():
            if key not in self.workers:
                self.workers[key] = WorkerState(url=info.url, role=info.role, extra=dict(info.extra))
                self._by_role.clear()
        await asyncio.gather(*(self._probe(w) for w in list(self.workers.values())))
        for callback in list(self.on_change):
            try:  # one failing listener must not keep the others (admission's wake-up) from running
                callback()
            except Exception:  # noqa: BLE001 - logged with its traceback, the round goes on
                log.exception("a worker-pool listener failed")

    async def _probe(self, w: WorkerState) -> None:
        try:
            if not w.healthy or (w.role == "decode" and not w.kv_endpoint):
                health = await self.client.health(w.url)
                if health.role not in (None, w.role):
                    raise WorkerRejected(200, f"registered as {w.role} but reports role {health.role}")
                w.kv_endpoint, w.fingerprint = health.kv_endpoint, health.fingerprint
            w.set_load(await self.client.load(w.url))
        except (WorkerUnreachable, WorkerRejected, ValueError, TypeError, AttributeError) as exc:
            self.mark_unhealthy(w, str(exc))  # TypeError/AttributeError: a /load body of the wrong shape
            return
        if not w.healthy:
            log.info("%s worker %s is healthy", w.role, w.url)
        w.healthy, w.last_error = True, None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one round
                log.warning("worker poll round failed: %r", exc)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="worker-pool-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def max_model_len(self) -> int | None:
        lens = [w.load.max_model_len for w in self.workers.values() if w.load and w.load.max_model_len]
        return min(lens) if lens else None
