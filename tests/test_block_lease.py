"""The KV block lease: every way a request can end, from every stage, frees its blocks exactly
once, and never while a receiver may still write them. Plain Python: no engine, no servers."""

from __future__ import annotations

import threading

import pytest
from splitserve.worker.block_lease import BlockLease, LeaseError, Stage

# How each worker walks a request forward (the stages before an end).
DECODE_PATH = [Stage.RESERVING, Stage.RESERVED, Stage.RECEIVING, Stage.RUNNING]
RECOMPUTE_PATH = [Stage.QUEUED, Stage.RUNNING]
PREFILL_PATH = [Stage.QUEUED, Stage.SENDING]


class Harness:
    """A lease whose release and receiver stop are recorded; the receiver stops when told."""

    def __init__(self, receiver_stops_at_once: bool = True) -> None:
        self.releases = 0
        self.stops = 0
        self.at_once = receiver_stops_at_once
        self.lease = BlockLease("r1", self._release, self._stop)

    def _release(self) -> None:
        self.releases += 1

    def _stop(self) -> None:
        self.stops += 1
        if self.at_once:  # a PENDING transfer's future fails inside cancel()
            self.lease.receiver_stopped()

    def walk(self, stages: list[Stage]) -> None:
        for stage in stages:
            if stage == Stage.RUNNING and self.lease.stage == Stage.RECEIVING:
                self.lease.receiver_stopped()  # the KV landed: the future resolved
            self.lease.advance(stage)


def prefixes(path: list[Stage]) -> list[list[Stage]]:
    return [path[:i] for i in range(len(path) + 1)]


@pytest.mark.parametrize("outcome", [Stage.CANCELLED, Stage.FAILED])
@pytest.mark.parametrize(
    "stages", prefixes(DECODE_PATH) + prefixes(RECOMPUTE_PATH)[1:] + prefixes(PREFILL_PATH)[1:],
    ids=lambda stages: "-".join(s.value for s in stages) or "new",
)
def test_ending_in_any_stage_releases_once_and_only_what_may_be_held(stages, outcome):
    h = Harness()
    h.walk(stages)
    assert h.lease.end(outcome) is True
    assert h.lease.stage == outcome
    assert h.releases == (0 if not stages else 1)  # NEW holds nothing
    for again in (Stage.CANCELLED, Stage.FAILED, Stage.CANCELLED):  # every finally may end it
        assert h.lease.end(again) is False
    h.lease.receiver_stopped()  # a late report changes nothing
    assert h.releases == (0 if not stages else 1)
    assert h.lease.stage == outcome


def test_finishing_a_decode_leaves_the_free_to_the_engine():
    h = Harness()
    h.walk(DECODE_PATH)
    h.lease.finish()
    assert h.lease.stage == Stage.FINISHED and h.lease.released
    assert h.releases == 0  # the scheduler freed them when the sequence finished
    assert h.lease.end(Stage.CANCELLED) is False and h.releases == 0


def test_finishing_a_recompute_straight_from_the_queue_needs_no_release():
    h = Harness()
    h.walk([Stage.QUEUED])
    h.lease.finish()
    assert h.releases == 0 and h.lease.stage == Stage.FINISHED


def test_finishing_a_prefill_releases_after_sending():
    h = Harness()
    h.walk(PREFILL_PATH)
    assert h.releases == 0  # held while the KV is on the wire
    h.lease.finish()
    assert h.releases == 1 and h.lease.stage == Stage.FINISHED
    assert h.lease.end(Stage.FAILED) is False and h.releases == 1


@pytest.mark.parametrize("outcome", [Stage.CANCELLED, Stage.FAILED])
def test_ending_while_a_sender_streams_waits_for_the_receiver_to_stop(outcome):
    h = Harness(receiver_stops_at_once=False)
    h.walk(DECODE_PATH[:3])
    assert h.lease.end(outcome) is True
    assert h.lease.stage == Stage.DRAINING and h.stops == 1
    assert h.releases == 0  # the receiver may still be writing the blocks
    assert h.lease.end(Stage.CANCELLED) is False and h.stops == 1
    h.lease.receiver_stopped()
    assert h.releases == 1 and h.lease.stage == outcome
    h.lease.receiver_stopped()
    assert h.releases == 1


def test_a_failed_transfer_reported_first_is_released_at_the_end():
    h = Harness(receiver_stops_at_once=False)
    h.walk(DECODE_PATH[:3])
    h.lease.receiver_stopped()  # the future failed (timeout, lost connection)
    assert h.releases == 0
    h.lease.end(Stage.FAILED)
    assert h.releases == 1 and h.stops == 0 and h.lease.stage == Stage.FAILED


def test_running_before_the_receiver_stopped_is_refused():
    h = Harness()
    h.walk(DECODE_PATH[:3])
    with pytest.raises(LeaseError, match="receiver"):
        h.lease.advance(Stage.RUNNING)


@pytest.mark.parametrize(
    "stages, bad",
    [
        ([], Stage.RUNNING),
        ([], Stage.RECEIVING),
        ([Stage.RESERVING], Stage.RECEIVING),
        ([Stage.RESERVING, Stage.RESERVED], Stage.FINISHED),
        ([Stage.QUEUED, Stage.SENDING], Stage.RUNNING),
    ],
)
def test_moves_outside_the_machine_are_refused(stages, bad):
    h = Harness()
    h.walk(stages)
    with pytest.raises(LeaseError):
        h.lease.advance(bad)
    assert h.releases == 0


@pytest.mark.parametrize("outcome", [Stage.CANCELLED, Stage.FAILED])
def test_a_request_ended_meanwhile_cannot_move_on(outcome):
    """A reserve that returns after its request was cancelled must not carry on with it."""
    h = Harness()
    h.walk([Stage.RESERVING])
    h.lease.end(outcome)
    with pytest.raises(LeaseError):
        h.lease.advance(Stage.RESERVED)
    with pytest.raises(LeaseError):
        h.lease.finish()
    assert h.releases == 1


def test_end_takes_only_an_end():
    with pytest.raises(ValueError):
        Harness().lease.end(Stage.FINISHED)


def test_racing_ends_from_many_threads_release_once():
    for _ in range(50):
        h = Harness(receiver_stops_at_once=False)
        h.walk(DECODE_PATH[:3])
        barrier = threading.Barrier(5)

        def end(h=h, barrier=barrier):
            barrier.wait()
            h.lease.end(Stage.CANCELLED)

        def stopped(h=h, barrier=barrier):
            barrier.wait()
            h.lease.receiver_stopped()

        threads = [threading.Thread(target=end) for _ in range(3)] + [threading.Thread(target=stopped) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert h.releases == 1 and h.lease.stage == Stage.CANCELLED
