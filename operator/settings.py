"""Operator settings: kopf's, applied in the ``@kopf.on.startup`` handler, and the SLO loop's,
read from the environment when this module is imported (the timer's interval is a decorator
argument, so it must be known before ``handlers`` is imported).

SLO loop (``slo_loop.py``):
- ``SPLITSERVE_SLO_TICK_SECONDS`` (default 15): how often each InferenceService's router is
  scraped and the planner runs. The metrics window itself is ``spec.autoscaling.windowSeconds``
  (each tick compares with the scrape that is at least that old), so one operator serves
  services with different windows.
- ``SPLITSERVE_METRICS_URL``: where to scrape, a template with ``{name}`` and ``{namespace}``;
  default the router Service's cluster DNS name (``http://{name}-router.{namespace}.svc:8000``).
  Tests point it at a local server.
- ``SPLITSERVE_LATENCY_MODEL``: path of a profiled latency model JSON (``splitserve profile``)
  mounted into the operator; the planner's capacity comes from it when the spec gives none.

kopf keeps its bookkeeping (last handled spec, handler progress) in annotations under our own
prefix, so the status holds only what users read (conditions, pools, endpoint).
"""

from __future__ import annotations

import logging
import os

import kopf

PREFIX = "splitserve.io"
DEFAULT_METRICS_URL = "http://{name}-router.{namespace}.svc:8000/metrics"


def _positive_float(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{var} must be a number of seconds, not {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{var} must be > 0, not {raw!r}")
    return value


SLO_TICK_SECONDS = _positive_float("SPLITSERVE_SLO_TICK_SECONDS", 15.0)
LATENCY_MODEL = os.environ.get("SPLITSERVE_LATENCY_MODEL") or None


def metrics_url(name: str, namespace: str) -> str:
    """The /metrics URL of one InferenceService's router (``SPLITSERVE_METRICS_URL`` template,
    else the router Service's DNS name; must match ``manifests.endpoint``)."""
    template = os.environ.get("SPLITSERVE_METRICS_URL") or DEFAULT_METRICS_URL
    try:
        return template.format(name=name, namespace=namespace)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"SPLITSERVE_METRICS_URL {template!r}: only {{name}} and {{namespace}} may appear"
        ) from exc


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.posting.level = logging.INFO
    # reconnect watches regularly so a silently dropped connection heals within a minute
    settings.watching.server_timeout = int(os.environ.get("SPLITSERVE_WATCH_TIMEOUT", "60"))
    settings.watching.client_timeout = settings.watching.server_timeout + 10
    settings.execution.max_workers = int(os.environ.get("SPLITSERVE_OPERATOR_WORKERS", "4"))
