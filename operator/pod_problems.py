"""Why a pool's pods are not serving, in the pods' own words (pure: pod dicts in, a summary out).

A Deployment's status says only how many replicas are ready; the reason a pod is not lives on
the pod, where the scheduler and the kubelet write it. Per pod, the first of these that holds,
most severe first (a pod that cannot be scheduled never pulls its image):

- ``PodsUnschedulable``: condition ``PodScheduled`` False with reason ``Unschedulable``; the
  scheduler's message (``0/3 nodes are available: persistentvolumeclaim "weights" not found``);
- ``ImagePullFailing``: a container waiting in ``ErrImagePull``, ``ImagePullBackOff``, ...;
- ``CrashLooping``: a container waiting in ``CrashLoopBackOff``, with the exit code, reason and
  message of its last termination (``lastState.terminated``);
- ``ContainerFailing``: a container the kubelet cannot create or start
  (``CreateContainerConfigError``: a missing Secret or ConfigMap key, ...);
- ``ReadinessFailing``: Running, every container started, but not Ready for at least
  ``not_ready_after`` seconds (a pod that just started or a blip is not a problem), with the
  kubelet's last probe failure (its ``Unhealthy`` Event) when there is one, else the Ready
  condition's own message.

A pool's summary names its most severe reason, how many of its pods have it, and one pod's
detail: ``decode: 1/1 pods Pending: 0/1 nodes are available: ...``. Terminating pods are left
out (they are going anyway). ``status.compute`` renders the summaries into the conditions and
``status.problems``; ``transitions`` says which Events a change deserves, so an Event is posted
when a pool's reason changes, not on every status refresh.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NOT_READY_AFTER_S = 60.0  # default of settings.NOT_READY_SECONDS
MAX_DETAIL = 400  # characters of one pod's detail kept in a message (Events cap at 1 KiB)

IMAGE_PULL_WAITING = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "RegistryUnavailable", "SignatureValidationFailed",
})  # fmt: skip
CONTAINER_ERROR_WAITING = frozenset({
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
    "PreCreateHookError", "PostStartHookError", "PreStartHookError",
})  # fmt: skip


class Reason(enum.Enum):
    """Why a pod does not serve; the value is the condition and Event reason. Declared from
    the most severe to the least: a pool reports its most severe one."""

    UNSCHEDULABLE = "PodsUnschedulable"
    IMAGE_PULL = "ImagePullFailing"
    CRASH_LOOP = "CrashLooping"
    CONTAINER_ERROR = "ContainerFailing"
    NOT_READY = "ReadinessFailing"

    @property
    def rank(self) -> int:
        return list(Reason).index(self)


@dataclass(frozen=True)
class PodProblem:
    """One pod's reason: ``state`` is what kubectl would show (Pending, ImagePullBackOff,
    CrashLoopBackOff, not Ready), ``detail`` the scheduler's or kubelet's words."""

    pod: str
    reason: Reason
    state: str
    detail: str


@dataclass(frozen=True)
class PoolProblem:
    """A pool's most severe reason, how many of its (non-terminating) pods have it, and the
    first such pod's problem."""

    pool: str
    reason: Reason
    affected: int
    total: int
    example: PodProblem

    @property
    def message(self) -> str:
        return (
            f"{self.pool}: {self.affected}/{self.total} pods {self.example.state}: "
            f"{self.example.detail}"
        )

    def to_status(self) -> dict[str, Any]:
        """One entry of ``status.problems``."""
        return {
            "pool": self.pool,
            "reason": self.reason.value,
            "pods": f"{self.affected}/{self.total}",
            "message": self.message,
        }


def api_seconds(stamp: str | None) -> float | None:
    """Unix seconds of an RFC 3339 time as the API writes it, or None."""
    if not stamp:
        return None
    try:
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _condition(pod: Mapping[str, Any], ctype: str) -> Mapping[str, Any]:
    conds = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == ctype), {})


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def _last_exit(container: Mapping[str, Any]) -> str:
    """``container decode last exited with code 1 (Error): <its message>``."""
    term = (container.get("lastState") or {}).get("terminated") or {}
    name = container.get("name", "?")
    if not term:
        return f"container {name} keeps exiting"
    text = f"container {name} last exited with code {term.get('exitCode', '?')}"
    if term.get("reason"):
        text += f" ({term['reason']})"
    if term.get("message"):
        text += f": {term['message']}"
    return text


def _waiting_problem(name: str, container: Mapping[str, Any]) -> PodProblem | None:
    waiting = (container.get("state") or {}).get("waiting") or {}
    why = waiting.get("reason") or ""
    said = waiting.get("message") or ""
    cname = container.get("name", "?")
    if why in IMAGE_PULL_WAITING:
        return PodProblem(name, Reason.IMAGE_PULL, why,
                          _clip(said or f"container {cname} cannot pull its image"))
    if why == "CrashLoopBackOff":
        return PodProblem(name, Reason.CRASH_LOOP, why, _clip(_last_exit(container)))
    if why in CONTAINER_ERROR_WAITING:
        return PodProblem(name, Reason.CONTAINER_ERROR, why,
                          _clip(said or f"container {cname} cannot start"))
    return None  # ContainerCreating, PodInitializing: on its way


def _not_ready_since(pod: Mapping[str, Any]) -> float | None:
    """When a Running pod whose containers have all started was last seen becoming not Ready
    (or its newest container started, if later); None if it is Ready, not Running or still
    starting (a startup probe has not passed yet)."""
    st = pod.get("status") or {}
    ready = _condition(pod, "Ready")
    if st.get("phase") != "Running" or ready.get("status") == "True":
        return None
    containers = list(st.get("containerStatuses") or [])
    if not containers:
        return None
    starts = []
    for c in containers:
        running = (c.get("state") or {}).get("running")
        if running is None or c.get("started") is False:
            return None
        starts.append(api_seconds(running.get("startedAt")))
    known = [t for t in [api_seconds(ready.get("lastTransitionTime")), *starts] if t is not None]
    return max(known) if known else None


def pod_problem(
    pod: Mapping[str, Any],
    now: float,
    not_ready_after: float = NOT_READY_AFTER_S,
    probe_messages: Mapping[str, str] | None = None,
) -> PodProblem | None:
    """This pod's most severe problem, or None. ``now`` is Unix seconds; ``probe_messages``
    maps a pod uid to the kubelet's last probe failure (``probe_messages`` below)."""
    meta = pod.get("metadata") or {}
    name = meta.get("name", "?")
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        detail = scheduled.get("message") or "no node fits the pod"
        return PodProblem(name, Reason.UNSCHEDULABLE, "Pending", _clip(detail))
    found = [p for c in _containers(pod) if (p := _waiting_problem(name, c))]
    if found:
        return min(found, key=lambda p: p.reason.rank)
    since = _not_ready_since(pod)
    if since is None or now - since < not_ready_after:
        return None
    probe = (probe_messages or {}).get(meta.get("uid", ""))
    detail = probe or _condition(pod, "Ready").get("message") or "readiness probe failing"
    return PodProblem(name, Reason.NOT_READY, f"Running but not Ready for {now - since:.0f}s",
                      _clip(detail))  # fmt: skip


def _live(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods that count: not terminating, not finished (Succeeded/Failed)."""
    return [
        p for p in pods
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]  # fmt: skip


def pool_problem(
    pool: str,
    pods: Iterable[Mapping[str, Any]],
    now: float,
    not_ready_after: float = NOT_READY_AFTER_S,
    probe_messages: Mapping[str, str] | None = None,
) -> PoolProblem | None:
    """The pool's most severe problem over its live pods (sorted by name, so the example pod
    is stable between refreshes), or None when none has one."""
    live = sorted(_live(pods), key=lambda p: (p.get("metadata") or {}).get("name", ""))
    problems = [pr for p in live if (pr := pod_problem(p, now, not_ready_after, probe_messages))]
    if not problems:
        return None
    worst = min(problems, key=lambda p: p.reason.rank)
    same = [p for p in problems if p.reason is worst.reason]
    return PoolProblem(pool, worst.reason, len(same), len(live), same[0])


def needs_probe_messages(pods: Iterable[Mapping[str, Any]], now: float,
                         not_ready_after: float = NOT_READY_AFTER_S) -> bool:
    """Whether any pod is Running but not Ready for long, so its probe Events are worth a read."""
    return any((s := _not_ready_since(p)) is not None and now - s >= not_ready_after
               for p in _live(pods))  # fmt: skip


def probe_messages(events: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Pod uid -> the message of the kubelet's newest readiness-probe failure, from Events
    (reason ``Unhealthy``, ``Readiness probe failed: ...``) about pods."""
    newest: dict[str, tuple[float, str]] = {}
    for ev in events:
        obj = ev.get("involvedObject") or ev.get("regarding") or {}
        message = ev.get("message") or ev.get("note") or ""
        if obj.get("kind") != "Pod" or ev.get("reason") != "Unhealthy":
            continue
        if not message.startswith("Readiness probe"):
            continue
        meta = ev.get("metadata") or {}
        series = ev.get("series") or {}
        when = max((t for t in (api_seconds(ev.get("lastTimestamp")), api_seconds(ev.get("eventTime")),
                                api_seconds(series.get("lastObservedTime")),
                                api_seconds(meta.get("creationTimestamp"))) if t is not None),
                   default=0.0)  # fmt: skip
        uid = obj.get("uid", "")
        if uid not in newest or when >= newest[uid][0]:
            newest[uid] = (when, message)
    return {uid: message for uid, (_, message) in newest.items()}


def by_severity(problems: Iterable[PoolProblem], pools: tuple[str, ...]) -> list[PoolProblem]:
    """Most severe first, then in ``pools`` order (the order conditions name them)."""
    order = {p: i for i, p in enumerate(pools)}
    return sorted(problems, key=lambda p: (p.reason.rank, order.get(p.pool, len(order)), p.pool))


@dataclass(frozen=True)
class Transition:
    """An Event to post on the InferenceService: ``warning`` for a new reason, Normal when a
    pool's problem is gone."""

    warning: bool
    reason: str
    message: str


RECOVERED = "PodsRecovered"


def transitions(previous: Iterable[Mapping[str, Any]] | None,
                current: Iterable[Mapping[str, Any]]) -> list[Transition]:
    """The Events a change of ``status.problems`` (entries of ``PoolProblem.to_status``)
    deserves: one per pool whose reason changed (a new or different reason: Warning, with the
    problem's message; gone: Normal). A pool whose reason stayed the same posts nothing, even
    if its message moved (``2/2`` pods, another scheduler message)."""
    before = {p.get("pool"): p.get("reason") for p in previous or []}
    after = {p.get("pool"): p for p in current}
    out = [Transition(True, str(p["reason"]), str(p["message"]))
           for pool, p in after.items() if before.get(pool) != p["reason"]]  # fmt: skip
    out += [Transition(False, RECOVERED, f"{pool}: no longer {reason}")
            for pool, reason in before.items() if pool not in after]  # fmt: skip
    return out
