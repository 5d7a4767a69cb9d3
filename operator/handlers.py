"""kopf wiring only: each decorator forwards to a plain function in ``reconcile``.

Load this as a module (``splitserve.operator.handlers``, which ``splitserve operator`` imports),
never by file path: ``kopf run operator/handlers.py`` would put ``operator/`` on ``sys.path``.

No delete handler on purpose: children carry owner references, so Kubernetes' garbage collector
removes them, and without a delete handler kopf adds no finalizer; an InferenceService can be
deleted even while the operator is down.

The SLO loop (``slo_loop.SloLoop``) is one operator-wide task started at startup, not a
``@kopf.timer``: kopf gives every object with a timer a finalizer, which is what this operator
avoids. It ticks every ``SPLITSERVE_SLO_TICK_SECONDS``; each service's metrics window is its own
``spec.autoscaling.windowSeconds``; an event handler (no finalizer) tells it which objects exist.
"""

from __future__ import annotations

from typing import Any

import kopf
from splitserve.operator import crd, manifests, metrics, reconcile, slo_loop
from splitserve.operator import settings as operator_settings

ISVC = (crd.GROUP, crd.VERSION, crd.PLURAL)


SLO_LOOP = "slo_loop"  # key of the SloLoop in kopf's memo


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    operator_settings.configure(settings)
    # a bad latency model stops the operator here, naming the file, not at the first tick
    slo_loop.latency_model(operator_settings.LATENCY_MODEL)
    memo[SLO_LOOP] = slo_loop.SloLoop(operator_settings.SLO_TICK_SECONDS)


@kopf.on.cleanup()
async def stop_slo_loop(memo: kopf.Memo, **_: Any) -> None:
    await memo[SLO_LOOP].stop()


def _handle(cause: str, body: kopf.Body, spec: Any, name: str, namespace: str) -> None:
    with metrics.reconcile_timer(cause):
        reconcile.reconcile(body, dict(spec), name, namespace, cause)


@kopf.on.create(*ISVC)
def on_create(body: kopf.Body, spec: Any, name: str, namespace: str, **_: Any) -> None:
    _handle("create", body, spec, name, namespace)


@kopf.on.update(*ISVC)
def on_update(body: kopf.Body, spec: Any, name: str, namespace: str, **_: Any) -> None:
    _handle("update", body, spec, name, namespace)


@kopf.on.resume(*ISVC)
def on_resume(body: kopf.Body, spec: Any, name: str, namespace: str, **_: Any) -> None:
    _handle("resume", body, spec, name, namespace)


CHILDREN = {"app.kubernetes.io/managed-by": manifests.MANAGED_BY}


def _refresh_owner(labels: Any, namespace: str) -> None:
    instance = labels.get(manifests.LABEL_INSTANCE)
    if instance:
        reconcile.publish_status(namespace, instance)


@kopf.on.event("apps", "v1", "deployments", labels=CHILDREN)
def on_child_deployment(labels: Any, namespace: str, **_: Any) -> None:
    _refresh_owner(labels, namespace)


@kopf.on.event("v1", "pods", labels=CHILDREN)
def on_child_pod(labels: Any, namespace: str, **_: Any) -> None:
    """Scheduled or refused, pulled, crashed, (not) Ready: the status says why each pool waits."""
    _refresh_owner(labels, namespace)


@kopf.on.event(*ISVC)
async def on_isvc_event(
    event: Any, name: str, namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    loop = memo[SLO_LOOP]
    loop.note(event.get("type"), namespace, name)
    # started from here, not at startup: its task copies this context, which holds kopf's
    # event-posting queue (startup handlers run before kopf sets it up)
    loop.start()
