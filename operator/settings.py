"""Operator settings: kopf's, applied in the ``@kopf.on.startup`` handler, and the SLO loop's,
read from the environment when this module is imported (the timer's interval is a decorator
argument, so it must be known before ``handlers`` is imported).

SLO loop (``slo_loop.py``):
- ``SPLITSERVE_SLO_TICK_SECONDS`` (default 15): how often each InferenceService's router is
  scraped and the planner runs. The metrics window itself is ``spec.autoscaling.windowSeconds``
  (each tick compares with the scrape that is at least that old), so one operator serves
  services with different windows.
- ``SPLITSERVE_ROUTER_POD_METRICS_URL``: how to reach one router pod's /metrics, a template with
  ``{host}`` (the pod's address, IPv6 in brackets), ``{port}`` (the router Service's ``http``
  port on the pod), ``{pod}``, ``{name}`` and ``{namespace}``; default
  ``http://{host}:{port}/metrics``. The loop scrapes every ready router pod (``router_pods``).
  Tests map pods to a local server with it (kwok pods have fake addresses).
- ``SPLITSERVE_METRICS_URL``: a single URL to scrape instead (``{name}``, ``{namespace}``), e.g.
  a port-forwarded router in local use; no pod discovery then, and with several router pods
  behind it each scrape reads one random pod, so use it for one router only.
- ``SPLITSERVE_NOT_READY_SECONDS`` (default 60): how long a Running pod may stay not Ready
  before the status and an Event call it ``ReadinessFailing`` (``pod_problems``); each SLO tick
  refreshes the status, so the verdict comes within a tick of that time.
- ``SPLITSERVE_LATENCY_MODEL``: path of a profiled latency model JSON (``splitserve profile``)
  mounted into the operator; the planner's capacity comes from it when the spec gives none.

Routers: ``SPLITSERVE_ROUTER_LIMITS``, ``SPLITSERVE_ROUTER_FAILOVER`` and
``SPLITSERVE_ROUTER_ADMISSION``, JSON objects of router options spelled as in
``spec.router.limits``, ``.failover`` and ``.admission`` (the chart's ``routerLimits``,
``routerFailover`` and ``routerAdmission``), the default of every InferenceService's router for each
option its spec leaves out; null or absent: the router's own default. A bad value stops the
operator at start-up, naming it.

NetworkPolicies (``manifests.MetricsPeers``): besides the router, who may reach the pods' HTTP
ports for /metrics: ``SPLITSERVE_OPERATOR_NAMESPACE`` with ``SPLITSERVE_OPERATOR_POD_LABELS`` (the
operator itself), and a Prometheus by ``SPLITSERVE_PROMETHEUS_NAMESPACE_LABELS`` and
``SPLITSERVE_PROMETHEUS_POD_LABELS``; labels are JSON objects, set by the chart.

kopf keeps its bookkeeping (last handled spec, handler progress) in annotations under our own
prefix, so the status holds only what users read (conditions, pools, endpoint).
"""

from __future__ import annotations

import json
import logging
import os

import kopf
from splitserve.operator.manifests import MANAGED_BY, MetricsPeers
from splitserve.router.config import ROUTER_OPTIONS, options_from_keys

PREFIX = "splitserve.io"
DEFAULT_POD_METRICS_URL = "http://{host}:{port}/metrics"


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
NOT_READY_SECONDS = _positive_float("SPLITSERVE_NOT_READY_SECONDS", 60.0)
LATENCY_MODEL = os.environ.get("SPLITSERVE_LATENCY_MODEL") or None


def _router_options(section: str, var: str) -> dict[str, int | float]:
    """The router options of ``section`` in ``var`` (module docstring), checked. Helm's ``--set``
    makes a number with a decimal point a string ("2.5"): a string is read as the option's type."""
    raw = os.environ.get(var)
    if not raw:
        return {}
    try:
        given = json.loads(raw)
    except ValueError:
        given = None
    if not isinstance(given, dict):
        raise ValueError(f"{var} must be a JSON object of router {section} options, not {raw!r}")
    given = {k: v for k, v in given.items() if v is not None}
    types = {option.key: option.type for option in ROUTER_OPTIONS[section]}
    for key, value in given.items():
        if isinstance(value, str) and key in types:
            try:
                given[key] = types[key](value)
            except ValueError:
                pass  # refused below with the value as given
    options_from_keys(section, given, var)
    return given


# section -> key -> value, the operator's default for every router (spec.router.<section> wins)
ROUTER_DEFAULTS = {section: _router_options(section, f"SPLITSERVE_ROUTER_{section.upper()}")
                   for section in ROUTER_OPTIONS}


def _format(var: str, template: str, **fields: str | int) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        allowed = ", ".join(f"{{{k}}}" for k in fields)
        raise ValueError(f"{var} {template!r}: only {allowed} may appear") from exc


def metrics_url(name: str, namespace: str) -> str | None:
    """The single /metrics URL set by ``SPLITSERVE_METRICS_URL`` for one InferenceService, or
    None (the default): scrape each ready router pod instead."""
    template = os.environ.get("SPLITSERVE_METRICS_URL")
    if not template:
        return None
    return _format("SPLITSERVE_METRICS_URL", template, name=name, namespace=namespace)


def pod_metrics_url(name: str, namespace: str, pod: str, host: str, port: int) -> str:
    """The /metrics URL of one router pod (``SPLITSERVE_ROUTER_POD_METRICS_URL`` template)."""
    var = "SPLITSERVE_ROUTER_POD_METRICS_URL"
    template = os.environ.get(var) or DEFAULT_POD_METRICS_URL
    return _format(var, template, host=host, port=port, pod=pod, name=name, namespace=namespace)


def _labels(var: str) -> dict[str, str] | None:
    raw = os.environ.get(var)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{var} must be a JSON object of string labels, not {raw!r}")
    return value


def metrics_peers() -> MetricsPeers:
    """Who the NetworkPolicies admit to /metrics besides the router (module docstring)."""
    return MetricsPeers(
        operator_namespace=os.environ.get("SPLITSERVE_OPERATOR_NAMESPACE") or None,
        operator_labels=_labels("SPLITSERVE_OPERATOR_POD_LABELS"),
        prometheus_namespace_labels=_labels("SPLITSERVE_PROMETHEUS_NAMESPACE_LABELS"),
        prometheus_pod_labels=_labels("SPLITSERVE_PROMETHEUS_POD_LABELS"),
    )


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
    # pods are watched only for the status (``pod_problems``): the server sends ours alone, not
    # every pod of the namespace (or, with --all-namespaces, of the cluster)
    settings.watching.label_selectors["v1", "pods"] = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    settings.execution.max_workers = int(os.environ.get("SPLITSERVE_OPERATOR_WORKERS", "4"))
