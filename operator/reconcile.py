"""Reconciliation as plain functions; ``handlers.py`` only wires kopf's decorators to these.

One pass: render every child from the spec, adopt it (owner reference -> garbage collection on
delete), server-side apply it, prune children the spec no longer asks for (e.g. the managed Redis
after switching to an external URL), then write the status. Every step is idempotent, so create,
update, resume after a restart and a repeated event all run the same code.

The status also says why pods do not serve (``pod_problems``): each write lists the pods and
posts an Event on the InferenceService when a pool's reason changes (``publish_status``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from splitserve.operator import crd, kube, manifests, pod_problems, scaling
from splitserve.operator import settings as operator_settings
from splitserve.operator import status as status_mod

log = logging.getLogger(__name__)
PRUNABLE_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "NetworkPolicy")
# the manifest, the spec or our RBAC is wrong: retrying the same thing cannot help
PERMANENT_STATUSES = (400, 403, 422)
Adopt = Callable[[dict[str, Any]], None]


def _owner_adopter(body: kopf.Body) -> Adopt:
    def adopt(manifest: dict[str, Any]) -> None:
        kopf.adopt(manifest, owner=body)

    return adopt


def _api_error(exc: ApiException, what: str) -> kopf.PermanentError | kopf.TemporaryError:
    """Map an API failure to kopf's retry semantics, with the server's own message."""
    message = exc.reason
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = json.loads(exc.body).get("message", message)
    text = f"{what}: {exc.status} {message}"
    if exc.status in PERMANENT_STATUSES:
        return kopf.PermanentError(text)
    return kopf.TemporaryError(text, delay=5)


def apply_children(
    name: str,
    namespace: str,
    spec: dict[str, Any],
    adopt: Adopt,
    replicas: dict[str, int] | None = None,
) -> list[kube.ApplyResult]:
    """Render, adopt and apply every child; delete labelled children no longer rendered.
    ``replicas`` overrides the worker pools' sizes (``scaling.effective_replicas``)."""
    try:
        existing = kube.get("Secret", namespace, manifests.child_name(name, "internal"))
    except ApiException as exc:
        raise _api_error(exc, "reading the internal Secret") from exc
    try:
        children = manifests.render_all(name, namespace, spec, replicas,
                                        manifests.secret_values(existing),
                                        operator_settings.metrics_peers(),
                                        operator_settings.ROUTER_DEFAULTS)
    except manifests.SpecError as exc:
        raise kopf.PermanentError(str(exc)) from exc
    results = []
    for child in children:
        adopt(child)
        try:
            results.append(kube.apply(child))
        except ApiException as exc:
            raise _api_error(exc, f"applying {child['kind']} {child['metadata']['name']}") from exc
    wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
    for kind in PRUNABLE_KINDS:
        try:
            for obj in kube.list_owned(kind, namespace, name):
                if (kind, obj["metadata"]["name"]) not in wanted:
                    kube.delete(kind, namespace, obj["metadata"]["name"])
                    results.append(kube.ApplyResult(kind, obj["metadata"]["name"], "deleted"))
        except ApiException as exc:
            raise _api_error(exc, f"pruning {kind}") from exc
    return results


def summarize(results: list[kube.ApplyResult]) -> str:
    changed = [f"{r.kind}/{r.name} {r.action}" for r in results if r.action != "unchanged"]
    unchanged = sum(1 for r in results if r.action == "unchanged")
    return (", ".join(changed) + "; " if changed else "") + f"{unchanged} unchanged"


_probe_events_unreadable: set[str] = set()  # namespaces already warned about


def _probe_messages(namespace: str) -> dict[str, str]:
    """The kubelet's last readiness-probe failure per pod uid. Only a detail of the message:
    if the Events cannot be read (RBAC without ``list events``), the Ready condition's own
    message stands in and the warning (once per namespace) names why."""
    try:
        return pod_problems.probe_messages(kube.list_pod_events(namespace, "Unhealthy"))
    except ApiException as exc:
        if namespace in _probe_events_unreadable:
            return {}
        _probe_events_unreadable.add(namespace)
        log.warning("cannot read the probe Events in %s (%s %s): readiness problems are "
                    "reported without the probe's message", namespace, exc.status, exc.reason)
        return {}


COMPONENTS = ("prefill", "decode", "router", "redis")  # the pools whose pods the status reads
PodsByPool = dict[str, list[dict[str, Any]]]


def pods_by_pool(name: str, namespace: str, pools: tuple[str, ...] = COMPONENTS) -> PodsByPool:
    """The pods of each pool of ``name``, from one list call."""
    labels = manifests.selector_labels(name, "")
    labels.pop(manifests.LABEL_COMPONENT)
    by_pool: PodsByPool = {pool: [] for pool in pools}
    for pod in kube.list_pods(labels, namespace):
        component = (pod["metadata"].get("labels") or {}).get(manifests.LABEL_COMPONENT)
        if component in by_pool:
            by_pool[component].append(pod)
    return by_pool


def pool_problems(by_pool: PodsByPool, namespace: str, now: float) -> list[pod_problems.PoolProblem]:
    """The pod problems of each pool of ``by_pool`` (``pods_by_pool``), with the kubelet's
    probe Events read only when some pod has been Running but not Ready for long."""
    after = operator_settings.NOT_READY_SECONDS
    every = [p for pods in by_pool.values() for p in pods]
    probes: dict[str, str] = {}
    if pod_problems.needs_probe_messages(every, now, after):
        probes = _probe_messages(namespace)
    found = [pod_problems.pool_problem(pool, pods, now, after, probes)
             for pool, pods in by_pool.items()]  # fmt: skip
    return [p for p in found if p is not None]


def current_status(
    name: str,
    namespace: str,
    spec: dict[str, Any],
    generation: int,
    previous_conditions: list[dict[str, Any]] | None,
    reconcile_error: str | None = None,
    current: dict[str, Any] | None = None,
    pods: PodsByPool | None = None,
) -> dict[str, Any]:
    """Status from the live Deployments (read now), plus endpoint and generation fields;
    ``current`` (the stored status) holds the autoscaler's replicas, if any. ``pods``: the
    service's pods by pool (``pods_by_pool``) when the caller has listed them, else listed here."""
    full = crd.defaulted_spec(spec)
    deployments = {
        c: kube.get("Deployment", namespace, manifests.child_name(name, c)) for c in COMPONENTS
    }
    problems = pool_problems(pods if pods is not None else pods_by_pool(name, namespace),
                             namespace, time.time())
    out = status_mod.compute(
        full, deployments, generation, previous_conditions, reconcile_error,
        scaling.effective_replicas(full, current), problems,
    )  # fmt: skip
    out["observedGeneration"] = generation
    out["endpoint"] = manifests.endpoint(name, namespace)
    out["servingGeneration"] = manifests.serving_generation(name, namespace, full)
    return out


# re-entrant: a reconcile holds it while applying, then publishes the status under it too
_locks: dict[tuple[str, str], threading.RLock] = {}
_locks_guard = threading.Lock()
_errors: dict[tuple[str, str], str] = {}  # last reconcile failure per object, this process
_listed: dict[tuple[str, str], float] = {}  # when the pods of each object's last status were listed


def lock_for(namespace: str, name: str) -> threading.RLock:
    """One lock per object around every read-decide-write of its status or children's sizes,
    so the SLO loop and a reconcile never apply replicas read before the other's write."""
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.RLock())


def publish_status(
    namespace: str, name: str, generation: int | None = None, pods: PodsByPool | None = None,
    listed_at: float | None = None,
) -> None:
    """Read the children and the object now, compute the status and write it if it differs.

    Read-compute-write runs under one lock per object, so a write is never older than the one
    before it; any change after it is a new Deployment event and a new call. ``generation`` is
    given by the reconcile that just handled it; Deployment events keep the stored one.
    A pool whose pod problem changed gets an Event (``pod_problems.transitions``): the stored
    ``status.problems`` is the memory, so an operator restart posts nothing twice. ``pods``:
    the service's pods by pool, when the caller has listed them (the SLO tick lists them once
    for the status, the scrape and the planner) at ``listed_at`` (``time.monotonic()``); a
    listing older than the one the last status was computed from is listed again here, so a
    pod event's newer status is never overwritten by a tick's older view (which would post a
    problem's Warning twice, with a recovery between).
    """
    key = (namespace, name)
    with lock_for(namespace, name):
        if pods is None or listed_at is None or listed_at < _listed.get(key, 0.0):
            pods, listed_at = None, time.monotonic()  # current_status lists them now
        _listed[key] = listed_at
        obj = kube.get_inference_service(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        st = obj.get("status") or {}
        gen = generation if generation is not None else int(st.get("observedGeneration") or 0)
        new = current_status(
            name, namespace, obj["spec"], gen, st.get("conditions"), _errors.get(key), st, pods
        )
        if not gen:  # not handled yet: the create handler will set observedGeneration
            new.pop("observedGeneration")
        if any(st.get(k) != v for k, v in new.items()):
            kube.patch_status(namespace, name, new)
        for t in pod_problems.transitions(st.get("problems"), new["problems"]):
            log.info("%s/%s %s: %s", namespace, name, t.reason, t.message)
            post = kopf.warn if t.warning else kopf.info
            post(obj, reason=t.reason, message=t.message)


def _live_status(namespace: str, name: str, body: kopf.Body) -> dict[str, Any]:
    """The status as stored now: the autoscaler may have moved the replicas since the event
    that started this reconcile was sent."""
    try:
        obj = kube.get_inference_service(namespace, name)
    except ApiException as exc:
        raise _api_error(exc, "reading the InferenceService") from exc
    return dict((obj if obj is not None else body).get("status") or {})


def apply_worker_replicas(obj: dict[str, Any], replicas: dict[str, int]) -> list[kube.ApplyResult]:
    """Apply the prefill and decode Deployments at ``replicas`` (the SLO loop's write path):
    the same full, adopted manifests a reconcile applies, so the field ownership never splits."""
    name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
    full = crd.defaulted_spec(dict(obj["spec"]))
    results = []
    for pool in scaling.POOLS:
        deployment = manifests.render_worker(name, namespace, full, pool, replicas[pool])[0]
        kopf.adopt(deployment, owner=obj)
        try:
            results.append(kube.apply(deployment))
        except ApiException as exc:
            raise _api_error(exc, f"scaling Deployment {deployment['metadata']['name']}") from exc
    return results


def reconcile(body: kopf.Body, spec: dict[str, Any], name: str, namespace: str, cause: str) -> None:
    """One full pass for a create/update/resume: children, an Event, then the status.

    A failure is recorded (the status says Degraded, with the message) and re-raised for kopf
    to retry (TemporaryError) or to wait for a spec change (PermanentError).
    """
    key = (namespace, name)
    generation = int(body.metadata.get("generation") or 0)
    try:
        with lock_for(namespace, name):
            replicas = scaling.effective_replicas(
                crd.defaulted_spec(dict(spec)), _live_status(namespace, name, body)
            )
            results = apply_children(
                name, namespace, dict(spec), _owner_adopter(body), replicas
            )
    except (kopf.PermanentError, kopf.TemporaryError) as exc:
        _errors[key] = str(exc)
        publish_status(namespace, name, generation)
        kopf.warn(body, reason="ReconcileFailed", message=str(exc))
        raise
    _errors.pop(key, None)
    kopf.info(body, reason="Reconciled", message=f"{cause}: {summarize(results)}")
    for r in results:
        if r.action != "unchanged":
            log.info("%s %s/%s %s", cause, r.kind, r.name, r.action)
    publish_status(namespace, name, generation)
