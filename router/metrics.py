"""Prometheus metrics of the router (prefix ``splitserve_``), one registry per app so several
routers in one process (tests) do not collide.

Labelled children are looked up once and kept (``child``): ``labels()`` takes a lock and
validates its arguments on every call, and the hot path updates several labelled metrics per
request.

With ``splitserve router --workers N`` the processes share prometheus_client's multiprocess
directory (``PROMETHEUS_MULTIPROC_DIR``, set by the parent before it starts them), so whichever
process answers a scrape reports the totals of all of them: counters and histograms summed,
gauges summed (queued, in flight) or maxed (worker health) over the live processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from splitserve.router.kv_links import KvLink

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP_SAMPLE = 8  # policy step times of one decision in this many: enough to find a slow plugin
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class RouterMetrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._decisions_seen = 0
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(
            "splitserve_router_ttft_seconds",
            "Time to first token seen by the router",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "splitserve_router_tpot_seconds",
            "Mean time per output token after the first, per request",
            registry=r,
            buckets=_TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            "splitserve_router_e2e_seconds",
            "End-to-end request latency",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "splitserve_router_requests",
            "Requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "splitserve_router_routing_decisions",
            "Routing decisions by policy and outcome",
            ["policy", "outcome"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "splitserve_router_routing_decision_seconds",
            "Time spent choosing workers",
            ["policy"],
            registry=r,
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05),
        )
        self.policy_step_seconds = Histogram(
            "splitserve_router_policy_step_seconds",
            f"Time each step of a routing decision took (a role's filter or scoring, a pair scorer, the pick); "
            f"one decision in {_STEP_SAMPLE}",
            ["policy", "step"],
            registry=r,
            buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 0.01),
        )
        self.shed = Counter(
            "splitserve_router_shed",
            "Requests refused by admission (429), by reason",
            ["reason"],
            registry=r,
        )
        self.waited = Counter(
            "splitserve_router_queued",
            "Requests that waited in admission, by the reason they began to (a shed one counts here too)",
            ["reason"],
            registry=r,
        )
        self.slo = Counter(
            "splitserve_router_slo_requests",
            "Finished sequences by whether they met TTFT and TPOT targets",
            ["ttft", "tpot"],
            registry=r,
        )
        self.goodput_tokens = Counter(
            "splitserve_router_goodput_tokens",
            "Output tokens of sequences that met both targets",
            registry=r,
        )
        self.refused = Counter(
            "splitserve_router_refused",
            "Requests and connections refused or closed by a limit (router Limits), by reason",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "splitserve_router_retries",
            "Sequences retried on another pair, by reason",
            ["reason"],
            registry=r,
        )
        self.resumed = Counter(
            "splitserve_router_resumed",
            "Sequences resumed on another pair after their decode worker failed mid-stream, from "
            "the tokens sent, by reason (stalled: hung with its connection open; failed: the rest)",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "splitserve_router_prompt_tokens",
            "Prompt tokens of the sequences routed (the planner's prefill load)",
            registry=r,
        )
        self.registry_forged = Counter(
            "splitserve_router_registry_forged",
            "Registry entries ignored because their MAC did not verify (each scan counts them)",
            registry=r,
        )
        self.queued = Gauge(
            "splitserve_router_queued_requests", "Requests waiting in admission", registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "splitserve_router_inflight_sequences", "Sequences being served", registry=r,
            multiprocess_mode="livesum",
        )
        self.queued_prompt_tokens = Gauge(
            "splitserve_router_queued_prompt_tokens",
            "Prompt tokens waiting to be prefilled: this router's admission queue plus the"
            " workers' queues as their last /load reported (the backlog the planner drains)",
            registry=r, multiprocess_mode="livemax",
        )
        self.busy_workers = Gauge(
            "splitserve_router_busy_workers",
            "Workers of a role whose last /load shows work queued or running (the planner never"
            " sizes a pool below them)",
            ["role"], registry=r, multiprocess_mode="livemax",
        )
        self.oldest_wait = Gauge(
            "splitserve_router_oldest_wait_seconds",
            "Age of the oldest request still waiting for its first token (0: none waiting)",
            registry=r, multiprocess_mode="livemax",
        )
        self.worker_healthy = Gauge(
            "splitserve_router_worker_healthy",
            "1 if the router considers the worker healthy",
            ["role", "url"],
            registry=r,
            multiprocess_mode="livemax",
        )
        link = ["prefill", "decode", "backend", "fallback"]
        self.kv_link_transfers = Gauge(
            "splitserve_router_kv_link_transfers",
            "KV transfers a prefill worker reports to a decode worker, by negotiated backend",
            link, registry=r, multiprocess_mode="livemax",
        )
        self.kv_link_failures = Gauge(
            "splitserve_router_kv_link_failures",
            "Failed KV transfers a prefill worker reports to a decode worker",
            link, registry=r, multiprocess_mode="livemax",
        )
        self.kv_link_bytes_per_second = Gauge(
            "splitserve_router_kv_link_bytes_per_second",
            "Bytes per second of a prefill -> decode link's transfers (the sender's mean)",
            link, registry=r, multiprocess_mode="livemax",
        )

    def observe_kv_links(self, links: Iterable[KvLink]) -> None:
        """Replace the link gauges with ``links`` (links of departed workers disappear)."""
        gauges = (self.kv_link_transfers, self.kv_link_failures, self.kv_link_bytes_per_second)
        for gauge in gauges:
            gauge.clear()
        for k in links:
            labels = (k.prefill, k.decode, k.backend, str(k.fallback).lower())
            self.kv_link_transfers.labels(*labels).set(k.transfers)
            self.kv_link_failures.labels(*labels).set(k.failures)
            if k.bytes_per_s is not None:
                self.kv_link_bytes_per_second.labels(*labels).set(k.bytes_per_s)

    def exposition(self) -> bytes:
        """The text a scrape gets: this registry, or every router process's values when they
        share a multiprocess directory."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            shared = CollectorRegistry()
            multiprocess.MultiProcessCollector(shared)
            return generate_latest(shared)
        return generate_latest(self.registry)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, cached (not for metrics whose children are cleared)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def observe_policy_steps(self, policy: str, timings_us: dict[str, float]) -> None:
        """One decision's step times (``Decision.timings_us``), for one decision in _STEP_SAMPLE
        (the first of each run of them): each observation costs about a microsecond."""
        self._decisions_seen += 1
        if self._decisions_seen % _STEP_SAMPLE != 1:
            return
        for step, us in timings_us.items():
            self.child(self.policy_step_seconds, policy, step).observe(us * 1e-6)

    def observe_sequence(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float,
        tokens: int,
        slo_ttft_s: float,
        slo_tpot_s: float,
    ) -> None:
        self.e2e.observe(e2e_s)
        if ttft_s is None:
            return
        self.ttft.observe(ttft_s)
        ttft_ok = ttft_s <= slo_ttft_s
        tpot_ok = tpot_s is None or tpot_s <= slo_tpot_s
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        self.child(self.slo, "met" if ttft_ok else "missed", "met" if tpot_ok else "missed").inc()
        if ttft_ok and tpot_ok:
            self.goodput_tokens.inc(tokens)
