"""Noticing a decode worker that hangs mid-stream: stopped (SIGSTOP), wedged, or cut off while
its TCP connection stays open, so the stream neither breaks nor sends anything.

A stream is given up when two signals agree:

- the worker no longer answers the router's polls: the pool marked it unhealthy (its ``/load``
  did not answer within the poll timeout, or a request could not reach it), and
- this stream has been silent for ``stall_s``: nothing arrived, nothing waits to be read.

Neither alone is enough. A worker that is slow under load (long steps, a long prompt computed in
its batch) keeps answering ``/load`` from its HTTP loop, so it is never marked, and its streams
are left alone however slow they are; a worker whose poll failed once while its tokens still flow
is serving, and its streams are not silent. Both together mean the worker's process has stopped
making progress, and the stream's tokens so far are all the client will get from it: the
dispatcher resumes the sequence elsewhere from those tokens (dispatch.py). Without this the
stream would wait the idle timeout (``stream_idle_timeout_s``), a minute by default.

Timing: a worker stopped just after a poll is marked one poll interval plus one poll timeout
later; its streams are then given up at once if they have been silent for ``stall_s`` already,
else when they reach it (each failed poll checks again, so a watch never waits on stale news).
"""

from __future__ import annotations

import asyncio

from splitserve.router.workers import GenerateStream, WorkerState


class StallWatch:
    """Watches one decode stream from its first token to its end; ``stalled`` says why it was
    given up (None while it was not). ``close`` once the stream ends, however it ends."""

    def __init__(self, worker: WorkerState, stream: GenerateStream, stall_s: float) -> None:
        self.worker, self.stream, self.stall_s = worker, stream, stall_s
        self.stalled: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        worker.on_unhealthy.add(self.check)

    def check(self) -> None:
        """Called when the worker is marked unhealthy (and again when a timer set here fires)."""
        if self.stalled is not None or self.worker.healthy:
            return
        silent = self.stream.silent_s()
        if silent < self.stall_s:  # tokens came lately: look again when the silence would be long enough
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.stall_s - silent, self._again)
            return
        self.stalled = (f"decode worker {self.worker.url} stalled: nothing on the stream for {silent:.1f} s "
                        f"and it does not answer polls ({self.worker.last_error})")
        self.stream.stall(self.stalled)

    def _again(self) -> None:
        self._timer = None
        self.check()

    def close(self) -> None:
        self.worker.on_unhealthy.discard(self.check)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
