"""Run an engine in its own thread and drive it from asyncio.

The engine and its block manager are single-threaded by design; this wrapper is the only door
in. HTTP handlers send it commands (``run``), which execute in the engine thread between steps,
and receive each sequence's tokens through ``stream``. Commands run in the order they were sent,
so an ``abort`` sent after a ``reserve`` undoes it even if the reserve's caller stopped waiting.
A sequence that makes a step fail fails alone (``LLMEngine`` narrows the step down); should a
step still raise, the requests in the engine fail with the error, not the worker: nothing waits
forever on a dead thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from splitserve.engine.engine import LLMEngine, StepOutput
from splitserve.engine.sequence import Sequence

log = logging.getLogger(__name__)


class _Listener:
    """Where one sequence's outputs go: a queue that a coroutine on ``loop`` reads."""

    __slots__ = ("items", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, items: asyncio.Queue) -> None:
        self.loop, self.items = loop, items

    def send(self, item: StepOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)


def _put_all(batch: list[tuple[asyncio.Queue, StepOutput | Exception]]) -> None:
    for items, out in batch:
        items.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._listeners: dict[int, _Listener] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)
        for listener in self._listeners.values():
            listener.send(RuntimeError("the worker is shutting down"))
        self._listeners.clear()

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` in the engine thread before its next step."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, args, fut))
        self._wake.set()
        return fut

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.call(fn, *args))

    def _listen_and_submit(self, seq: Sequence, listener: _Listener, submit: Callable) -> None:
        self._listeners[seq.seq_id] = listener
        try:
            first = submit(seq)
        except BaseException:
            del self._listeners[seq.seq_id]
            raise
        if isinstance(first, StepOutput):
            self._deliver([first])

    async def stream(
        self, seq: Sequence, submit: Callable[[Sequence], Any]
    ) -> AsyncIterator[StepOutput]:
        """Submit ``seq`` (``submit`` runs in the engine thread, e.g. ``engine.add``) and yield its
        outputs until it finishes. Leaving early (client gone) aborts it and frees its blocks."""
        items: asyncio.Queue = asyncio.Queue()
        listener = _Listener(asyncio.get_running_loop(), items)
        finished = False
        try:
            # inside the try: cancelled while the submit runs, the sequence is aborted after it
            await self.run(self._listen_and_submit, seq, listener, submit)
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(seq)

    def abort(self, seq: Sequence) -> None:
        """Abort ``seq`` in the engine thread, after every command sent before: frees whatever it
        holds, wherever it is. Fire and forget, never awaited, so cancellation cannot skip it."""
        self.call(self._abort, seq)

    def _abort(self, seq: Sequence) -> None:
        self._listeners.pop(seq.seq_id, None)
        self.engine.abort(seq)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop per step, not
        one per sequence (each is a write to the loop's self-pipe, and a batch of 64 paid 64)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput | Exception]]] = {}
        for out in outputs:
            listener = self._listeners.get(out.seq.seq_id)
            if listener is None:
                continue
            batches.setdefault(listener.loop, []).append(
                (listener.items, out if out.error is None else out.error)
            )
            if out.finished:
                del self._listeners[out.seq.seq_id]
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who decides
                fut.set_exception(exc)

    def _fail_running(self, exc: BaseException) -> None:
        sched = self.engine.scheduler
        for seq in list(sched.running) + list(sched.waiting):
            self.engine.abort(seq)
            listener = self._listeners.pop(seq.seq_id, None)
            if listener is not None:
                listener.send(RuntimeError(f"engine step failed: {exc}"))

    def _loop(self) -> None:
        self.engine.runner.bind_thread()
        while not self._stopped.is_set():
            self._run_commands()
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing the requests in it")
                self._fail_running(exc)
                continue
            self._deliver(outputs)
