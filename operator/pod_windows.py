"""Scrape history per router pod, and the window a tick's scrapes close (pure: no I/O, no clock).

Each pod's counters are its own, so each pod keeps its own scrapes, keyed by pod uid:
- a pod seen for the first time starts a baseline (no delta from it yet);
- a pod whose counters went down (its container restarted) starts again from this scrape, and
  only it: the other pods' baselines stay;
- a pod that is gone (neither scraped nor failed this tick) drops out with its history;
- a pod that failed to scrape keeps its history but is left out of this tick (it is not "no
  load": its next good scrape reads the delta since its baseline).

A pod's delta is against its newest scrape at least ``window_s`` old, else (a pod that appeared
within the window) against its oldest one, over that shorter time: its traffic counts from its
first scrape on, so a new router pod does not make the load look lower while it builds a full
window. A tick yields a window only when at least one pod has a full one, then ``observe.merge``
adds all the pods' deltas.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from splitserve.operator import observe


@dataclass
class History:
    """The scrapes kept per pod key, oldest first (only those that can still be a baseline)."""

    pods: dict[str, list[observe.Snapshot]] = field(default_factory=dict)


def baseline(scrapes: list[observe.Snapshot], now: float, window_s: float) -> int | None:
    """Index of the newest scrape at least ``window_s`` old, or None while none is."""
    old = [i for i, s in enumerate(scrapes) if now - s.at >= window_s]
    return old[-1] if old else None


def _pod_delta(
    scrapes: list[observe.Snapshot], snap: observe.Snapshot, window_s: float
) -> tuple[list[observe.Snapshot], observe.Delta | None, bool]:
    """(the pod's scrapes to keep, its delta or None, whether that delta spans a full window)."""
    if not scrapes or observe.delta(scrapes[-1], snap) is None:
        return [snap], None, False  # new pod, or its counters went down: a fresh baseline
    i = baseline(scrapes, snap.at, window_s)
    base = scrapes[0] if i is None else scrapes[i]
    d = observe.delta(base, snap)
    if d is None:  # went down since the baseline but not since the last scrape: a restart too
        return [snap], None, False
    kept = scrapes if i is None else scrapes[i:]  # older ones can never be a baseline again
    return kept + [snap], d, i is not None


def update(
    history: History,
    scraped: Mapping[str, observe.Snapshot],
    failed: Collection[str],
    window_s: float,
) -> observe.Window | None:
    """Record one tick's scrapes (pod key -> snapshot; ``failed``: pods listed but not read) and
    return the merged window, or None while no pod has a full window."""
    for key in [k for k in history.pods if k not in scraped and k not in failed]:
        del history.pods[key]  # the pod is gone
    deltas: list[observe.Delta] = []
    full = False
    for key, snap in scraped.items():
        kept, d, pod_full = _pod_delta(history.pods.get(key, []), snap, window_s)
        history.pods[key] = kept
        if d is not None:
            deltas.append(d)
            full = full or pod_full
    return observe.merge(deltas) if full else None
