"""kopf wiring only: each decorator forwards to a plain function in ``reconcile``.

Load this as a module (``splitserve.operator.handlers``, which ``splitserve operator`` imports),
never by file path: ``kopf run operator/handlers.py`` would put ``operator/`` on ``sys.path``.

No delete handler on purpose: children carry owner references, so Kubernetes' garbage collector
removes them, and without a delete handler kopf adds no finalizer; an InferenceService can be
deleted even while the operator is down.
"""

from __future__ import annotations

from typing import Any

import kopf
from splitserve.operator import crd, manifests, metrics, reconcile
from splitserve.operator import settings as operator_settings

ISVC = (crd.GROUP, crd.VERSION, crd.PLURAL)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    operator_settings.configure(settings)


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


@kopf.on.event(
    "apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": manifests.MANAGED_BY}
)
def on_child_deployment(labels: Any, namespace: str, **_: Any) -> None:
    instance = labels.get(manifests.LABEL_INSTANCE)
    if instance:
        reconcile.publish_status(namespace, instance)
