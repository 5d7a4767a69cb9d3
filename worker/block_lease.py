"""Who owns a request's KV blocks, in every state of the request: one small state machine that
the decode worker, the KV receiver and the engine share, and the prefill worker too.

The rule it enforces: a request's blocks are freed exactly once, by one ``release`` call, however
the request ends (finished, cancelled at any await, failed, retried elsewhere by the router), and
never while something may still write them. Ending is synchronous and never awaits, so it can run
in a ``finally`` under cancellation (an anyio cancel scope cancels every later await too: an
``await`` in cleanup code is a cleanup that may never run).

Decode worker::

    NEW -> RESERVING -> RESERVED -> RECEIVING -> RUNNING -> FINISHED   (the engine freed them)
    NEW -> QUEUED (recompute: the engine prefills) -> RUNNING -> FINISHED

Prefill worker::

    NEW -> QUEUED (queued or prefilling in the engine) -> SENDING (first token out, KV on the
    wire) -> FINISHED (release)

A router retry is, on the worker it leaves, a cancellation (it closes the stream or the prefill
call); the retry is a new request with its own lease. Any stage that is not terminal ->
``end(CANCELLED | FAILED)``: released now, except RECEIVING,
where a receiver may still be writing the blocks: that goes through DRAINING, the receiver is told
to stop, and the release happens once it reports that nothing writes any more.

What ``release`` must be: a command queued to the engine thread, in order after every command
that may have given the sequence blocks (so a reserve that was still queued or running when its
caller was cancelled is undone after it has run), and idempotent in the engine (aborting a
sequence that already finished does nothing). Thread-safe: the receiver reports from its thread.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable


class Stage(str, enum.Enum):
    NEW = "new"  # holds nothing yet
    RESERVING = "reserving"  # a reserve is queued in the engine: blocks may appear at any time
    RESERVED = "reserved"  # holds blocks for a KV transfer; nothing writes them
    RECEIVING = "receiving"  # the KV receiver (or a sender writing our memory) may write them
    QUEUED = "queued"  # in the engine's queue or its prefill: the engine allocates and frees
    RUNNING = "running"  # in the engine's decode batch
    SENDING = "sending"  # prefill: first token sampled, blocks kept until the KV is sent
    DRAINING = "draining"  # ended while receiving: released once the receiver has stopped
    FINISHED = "finished"  # terminal: ran to its end, blocks freed
    CANCELLED = "cancelled"  # terminal: the client left, or the router gave up on this attempt
    FAILED = "failed"  # terminal: an error ended it

    @property
    def terminal(self) -> bool:
        return self in (Stage.FINISHED, Stage.CANCELLED, Stage.FAILED)


# Forward moves; every stage that is not terminal may also end (``end``).
_NEXT: dict[Stage, frozenset[Stage]] = {
    Stage.NEW: frozenset({Stage.RESERVING, Stage.QUEUED}),
    Stage.RESERVING: frozenset({Stage.RESERVED}),
    Stage.RESERVED: frozenset({Stage.RECEIVING}),
    Stage.RECEIVING: frozenset({Stage.RUNNING}),
    Stage.QUEUED: frozenset({Stage.RUNNING, Stage.SENDING, Stage.FINISHED}),
    Stage.RUNNING: frozenset({Stage.FINISHED}),
    Stage.SENDING: frozenset({Stage.FINISHED}),
    Stage.DRAINING: frozenset(),
}

# Stages where the engine frees the blocks itself when the sequence finishes (the scheduler's
# ``finish``): reaching FINISHED from them needs no release.
_ENGINE_FREES_ON_FINISH = frozenset({Stage.QUEUED, Stage.RUNNING})
# Stages that hold blocks (or may: RESERVING, QUEUED) and so release when they end.
_HOLDS = frozenset({Stage.RESERVING, Stage.RESERVED, Stage.RECEIVING, Stage.QUEUED, Stage.RUNNING, Stage.SENDING})


class LeaseError(RuntimeError):
    """A move the state machine does not allow: a bug in the caller, never a client's fault."""


class BlockLease:
    """One request's blocks on one worker (see the module docstring for the stages).

    ``release``: frees the blocks (queued to the engine thread; see the module docstring).
    ``stop_receiver``: asks the KV receiver to stop writing (decode only); it must eventually
    lead to :meth:`receiver_stopped`, from any thread.
    """

    def __init__(
        self, request_id: str, release: Callable[[], None], stop_receiver: Callable[[], None] | None = None
    ) -> None:
        self.request_id = request_id
        self._release = release
        self._stop_receiver = stop_receiver
        self._lock = threading.Lock()
        self.stage = Stage.NEW
        self.outcome: Stage | None = None  # the terminal stage a DRAINING lease will reach
        self.released = False  # release() has been called (at most once)
        self._receiver_done = False

    def __repr__(self) -> str:
        return f"BlockLease({self.request_id!r}, {self.stage.value}, released={self.released})"

    def advance(self, stage: Stage) -> None:
        """Move forward (``_NEXT``); moving into RUNNING from RECEIVING needs the receiver to have
        stopped (its future resolved). Raises LeaseError for any other move, including one made
        after the request ended (a caller that lost a race with cancellation must stop)."""
        release = False
        with self._lock:
            if stage not in _NEXT.get(self.stage, ()):
                raise LeaseError(f"request {self.request_id}: {self.stage.value} -> {stage.value} is not a move")
            if self.stage == Stage.RECEIVING and not self._receiver_done:
                raise LeaseError(f"request {self.request_id}: running before the receiver stopped")
            if stage == Stage.FINISHED and self.stage not in _ENGINE_FREES_ON_FINISH:
                release = self._take_release()
            elif stage == Stage.FINISHED:
                self.released = True  # the engine freed them when the sequence finished
            self.stage = stage
        if release:
            self._release()

    def finish(self) -> None:
        """The request reached its normal end."""
        self.advance(Stage.FINISHED)

    def end(self, outcome: Stage) -> bool:
        """End the request as CANCELLED or FAILED, from whatever stage it is in; a no-op once it
        has ended (so every ``finally`` may call it). Returns whether this call ended it."""
        if outcome not in (Stage.CANCELLED, Stage.FAILED):
            raise ValueError(f"end() takes CANCELLED or FAILED, not {outcome.value}")
        release = stop = False
        with self._lock:
            if self.stage.terminal or self.stage == Stage.DRAINING:
                return False
            if self.stage == Stage.RECEIVING and not self._receiver_done:
                self.stage, self.outcome, stop = Stage.DRAINING, outcome, True
            else:
                release = self.stage in _HOLDS and self._take_release()
                self.stage = outcome
        if stop and self._stop_receiver is not None:
            self._stop_receiver()
        if release:
            self._release()
        return True

    def receiver_stopped(self) -> None:
        """The receiver resolved its future: nothing writes the blocks any more. Releases them
        now if the request ended while receiving (DRAINING)."""
        release = False
        with self._lock:
            self._receiver_done = True
            if self.stage == Stage.DRAINING:
                release = self._take_release()
                self.stage = self.outcome or Stage.CANCELLED
        if release:
            self._release()

    def _take_release(self) -> bool:
        """Claim the one release (under the lock)."""
        if self.released:
            return False
        self.released = True
        return True
