"""What the router measured over a window: two scrapes of its /metrics, and the deltas between.

The router (``router/metrics.py``) exports cumulative counters and histograms; one scrape says
nothing about *now*, so the SLO loop keeps an earlier scrape and reads the difference, the way
Prometheus' ``rate()`` and ``histogram_quantile()`` do. Parsing goes through prometheus_client's
own text parser, so exposition details (escaping, ``_total``/``_created`` samples, ``+Inf``)
are the library's business, not ours.

Read from the router (names are the contract with ``router/metrics.py``):
- ``splitserve_router_ttft_seconds`` / ``_tpot_seconds``: p50/p90 from the bucket deltas;
- ``splitserve_router_e2e_seconds``: finished requests, and by Little's law the mean number of
  sequences in flight over the window (sum of their durations / window);
- ``splitserve_router_inflight_sequences`` (gauge): sequences in flight at the scrape;
- ``splitserve_router_slo_requests{ttft,tpot}``: SLO attainment (both targets met / finished),
  and each target's own (the planner's feedback: TTFT misses are prefill's, TPOT misses decode's);
- ``splitserve_router_prompt_tokens`` (counter): prompt tokens per second (from a router that
  lacks it, e.g. an older version, ``prompt_tokens_per_s`` is None and the planner holds prefill);
- ``splitserve_router_queued_prompt_tokens`` / ``_oldest_wait_seconds`` (gauges): the prefill
  backlog at the scrape (prompt tokens waiting for a prefill, in the router's queue and the
  workers'; the age of the oldest request without a first token), the planner's queue inputs:
  the largest over the router pods (each reports the same workers' queues, so a sum would
  count them once per pod);
- ``splitserve_router_busy_workers{role}`` (gauge): workers with work queued or running, the
  planner's floor for a pool (the largest over the router pods);
- ``splitserve_router_kv_link_{transfers,failures,bytes_per_second}`` (gauges per prefill ->
  decode link, labelled with the negotiated backend): not a window but the links' state now,
  summarised by ``kv_summary`` into ``status.observed.kvTransfer``.

A router Deployment has several pods (``spec.router.replicas``, an HPA), each with its own
counters, so the SLO loop scrapes every ready pod, not the Service (which would answer from a
random pod each time): ``delta`` reads one pod's scrapes, and ``merge`` adds the pods' deltas
into one ``Window`` (bucket counts, SLO verdicts and rates add). With ``--workers N`` one pod's
processes share one multiprocess metrics directory, so one scrape gives that whole pod.

Only this module's ``fetch`` does I/O; everything else is pure and unit-tested on metric text.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from splitserve.router.kv_links import KvLink

TTFT = "splitserve_router_ttft_seconds"
TPOT = "splitserve_router_tpot_seconds"
E2E = "splitserve_router_e2e_seconds"
INFLIGHT = "splitserve_router_inflight_sequences"
SLO = "splitserve_router_slo_requests"
PROMPT_TOKENS = "splitserve_router_prompt_tokens"
KV_LINK = "splitserve_router_kv_link"
QUEUED_TOKENS = "splitserve_router_queued_prompt_tokens"
OLDEST_WAIT = "splitserve_router_oldest_wait_seconds"
BUSY = "splitserve_router_busy_workers"


class MetricsUnavailable(RuntimeError):
    """The /metrics endpoint could not be read or parsed (names the URL and the cause)."""


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets ``(upper bound, count)`` in ascending order, ending with ``+Inf``."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float  # the ``_sum`` sample

    def minus(self, earlier: Histogram) -> Histogram | None:
        """The observations between ``earlier`` and this one; None if the bucket layouts
        differ or any count went down (the router restarted: its counters began again)."""
        if [b for b, _ in self.buckets] != [b for b, _ in earlier.buckets]:
            return None
        pairs = zip(self.buckets, earlier.buckets, strict=True)
        deltas = tuple((b, c - e) for (b, c), (_, e) in pairs)
        count = self.count - earlier.count
        if count < 0 or any(c < 0 for _, c in deltas):
            return None
        return Histogram(deltas, count, self.total - earlier.total)

    def quantile(self, q: float) -> float | None:
        """``histogram_quantile`` as Prometheus computes it: linear within the bucket holding
        rank ``q * count``; a rank in the ``+Inf`` bucket reads as the highest finite bound.
        None when the histogram is empty (no traffic: no latency to report)."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], not {q}")
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank and cumulative > below:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            lower, below = bound, cumulative
        return lower


@dataclass(frozen=True)
class Snapshot:
    """One scrape, reduced to what the SLO loop reads. ``at`` is the scraper's clock, seconds."""

    at: float
    ttft: Histogram | None
    tpot: Histogram | None
    e2e: Histogram | None
    inflight: float | None
    slo_met: float  # finished sequences that met both targets
    slo_total: float  # finished sequences with a verdict
    prompt_tokens: float | None
    ttft_met: float = 0.0  # finished sequences that met the TTFT target
    tpot_met: float = 0.0  # finished sequences that met the TPOT target
    kv_links: tuple[KvLink, ...] = ()
    queued_prompt_tokens: float = 0.0
    oldest_wait_s: float = 0.0
    busy_workers: dict[str, float] = field(default_factory=dict)  # role -> workers with work


def kv_summary(snapshots: list[Snapshot]) -> dict[str, Any] | None:
    """``status.observed.kvTransfer`` from the latest scrape of each router pod: links by
    backend, fallbacks (a pair that wanted a faster backend and got tcp), transfers, failures
    and the mean rate over links that moved bytes. Several router pods poll the same workers,
    so a link seen by many counts once (its largest counts). None when no link is known."""
    links: dict[tuple[str, str], KvLink] = {}
    for snap in snapshots:
        for link in snap.kv_links:
            key = (link.prefill, link.decode)
            if key not in links or link.transfers > links[key].transfers:
                links[key] = link
    if not links:
        return None
    backends: dict[str, int] = {}
    for link in links.values():
        backends[link.backend] = backends.get(link.backend, 0) + 1
    rates = [k.bytes_per_s for k in links.values() if k.bytes_per_s]
    return {
        "links": len(links),
        "backends": dict(sorted(backends.items())),
        "fallbacks": sum(1 for k in links.values() if k.fallback),
        "transfers": sum(k.transfers for k in links.values()),
        "failures": sum(k.failures for k in links.values()),
        "bytesPerSecond": round(sum(rates) / len(rates)) if rates else None,
    }


@dataclass(frozen=True)
class Window:
    """Deltas between two snapshots. Latencies in milliseconds; None where nothing finished."""

    seconds: float
    finished: float
    requests_per_s: float
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    tpot_p50_ms: float | None
    tpot_p90_ms: float | None
    attainment: float | None
    prompt_tokens_per_s: float | None
    concurrent_seqs: float
    ttft_attainment: float | None = None
    tpot_attainment: float | None = None
    queued_prompt_tokens: float = 0.0  # at the window's end (gauges, not deltas)
    oldest_wait_s: float = 0.0
    busy_workers: dict[str, int] = field(default_factory=dict)

    def to_status(self) -> dict[str, Any]:
        """The ``status.observed`` block (camelCase, rounded for people reading kubectl)."""

        def r(x: float | None, nd: int = 1) -> float | None:
            return None if x is None else round(x, nd)

        return {
            "windowSeconds": r(self.seconds),
            "requestsPerSecond": r(self.requests_per_s, 2),
            "ttftP50Ms": r(self.ttft_p50_ms),
            "ttftP90Ms": r(self.ttft_p90_ms),
            "tpotP50Ms": r(self.tpot_p50_ms),
            "tpotP90Ms": r(self.tpot_p90_ms),
            "attainment": r(self.attainment, 3),
            "promptTokensPerSecond": r(self.prompt_tokens_per_s),
            "concurrentSequences": r(self.concurrent_seqs, 2),
            "queuedPromptTokens": r(self.queued_prompt_tokens, 0),
            "oldestWaitSeconds": r(self.oldest_wait_s, 2),
        }


def _samples(families: list[Any], name: str) -> list[Any]:
    return [s for f in families if f.name == name for s in f.samples]


def _histogram(families: list[Any], name: str) -> Histogram | None:
    """The histogram ``name`` summed over its label sets (the router's have none)."""
    samples = _samples(families, name)
    if not samples:
        return None
    buckets: dict[float, float] = {}
    count = total = 0.0
    for s in samples:
        if s.name == f"{name}_bucket":
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
        elif s.name == f"{name}_count":
            count += s.value
        elif s.name == f"{name}_sum":
            total += s.value
    return Histogram(tuple(sorted(buckets.items())), count, total)


def _value(families: list[Any], sample: str, **labels: str) -> float | None:
    """Sum of the samples named ``sample`` whose labels include ``labels``; None if absent."""
    found = [
        s.value
        for f in families
        for s in f.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found) if found else None


def parse(text: str, at: float) -> Snapshot:
    """A Snapshot from Prometheus exposition text scraped at time ``at``."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise MetricsUnavailable(f"cannot parse metrics text: {exc}") from exc
    return Snapshot(
        at=at,
        ttft=_histogram(families, TTFT),
        tpot=_histogram(families, TPOT),
        e2e=_histogram(families, E2E),
        inflight=_value(families, INFLIGHT),
        slo_met=_value(families, f"{SLO}_total", ttft="met", tpot="met") or 0.0,
        slo_total=_value(families, f"{SLO}_total") or 0.0,
        prompt_tokens=_value(families, f"{PROMPT_TOKENS}_total"),
        ttft_met=_value(families, f"{SLO}_total", ttft="met") or 0.0,
        tpot_met=_value(families, f"{SLO}_total", tpot="met") or 0.0,
        kv_links=_kv_links(families),
        queued_prompt_tokens=_value(families, QUEUED_TOKENS) or 0.0,
        oldest_wait_s=_value(families, OLDEST_WAIT) or 0.0,
        busy_workers={s.labels["role"]: s.value for s in _samples(families, BUSY) if "role" in s.labels},
    )


def _kv_links(families: list[Any]) -> tuple[KvLink, ...]:
    """The link gauges, joined on their labels (transfers are always exported, the rate only
    once bytes moved)."""
    def by_link(name: str) -> dict[tuple[str, str, str, str], float]:
        return {(s.labels["prefill"], s.labels["decode"], s.labels["backend"], s.labels["fallback"]):
                s.value for s in _samples(families, name)}

    failures = by_link(f"{KV_LINK}_failures")
    rates = by_link(f"{KV_LINK}_bytes_per_second")
    return tuple(
        KvLink(prefill=key[0], decode=key[1], backend=key[2], fallback=key[3] == "true",
               transfers=int(value), failures=int(failures.get(key, 0)), bytes_per_s=rates.get(key))
        for key, value in by_link(f"{KV_LINK}_transfers").items()
    )


def _delta(cur: Histogram | None, prev: Histogram | None) -> Histogram | None:
    if cur is None:
        return None
    if prev is None:  # the metric appeared (first observation since start): all of it is new
        return cur
    return cur.minus(prev)


def _ms(h: Histogram | None, q: float) -> float | None:
    v = h.quantile(q) if h is not None else None
    return None if v is None else v * 1000.0


@dataclass(frozen=True)
class Delta:
    """What one router pod did between two of its scrapes: histogram deltas, SLO verdicts,
    prompt tokens over ``seconds``, and its in-flight gauge at the later scrape."""

    seconds: float
    ttft: Histogram | None
    tpot: Histogram | None
    e2e: Histogram | None
    slo_met: float
    slo_total: float
    prompt_tokens: float | None
    inflight: float | None
    ttft_met: float = 0.0
    tpot_met: float = 0.0
    queued_prompt_tokens: float = 0.0  # the later scrape's gauges
    oldest_wait_s: float = 0.0
    busy_workers: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> float:
        return self.e2e.count if self.e2e is not None else 0.0

    @property
    def concurrent_seqs(self) -> float:
        """Little's law: mean sequences in flight = their summed durations / the window. It lags
        a rising load (sequences still running are not in it), so the gauge counts too."""
        littles = (self.e2e.total / self.seconds) if self.e2e is not None else 0.0
        return max(littles, self.inflight or 0.0)


def delta(prev: Snapshot, cur: Snapshot) -> Delta | None:
    """One pod's delta between two of its scrapes, or None when it cannot be read: no time
    passed, or a counter went down (that pod restarted: its counters began again)."""
    seconds = cur.at - prev.at
    if seconds <= 0:
        return None
    ttft, tpot, e2e = (_delta(cur.ttft, prev.ttft), _delta(cur.tpot, prev.tpot),
                       _delta(cur.e2e, prev.e2e))  # fmt: skip
    pairs = ((cur.ttft, ttft), (cur.tpot, tpot), (cur.e2e, e2e))
    resets = [c is not None and d is None for c, d in pairs]
    slo_met, slo_total = cur.slo_met - prev.slo_met, cur.slo_total - prev.slo_total
    prompt = None
    if cur.prompt_tokens is not None:
        prompt = cur.prompt_tokens - (prev.prompt_tokens or 0.0)
    if any(resets) or slo_met < 0 or slo_total < 0 or (prompt is not None and prompt < 0):
        return None
    met = cur.ttft_met - prev.ttft_met, cur.tpot_met - prev.tpot_met
    if min(met) < 0:
        return None
    return Delta(seconds, ttft, tpot, e2e, slo_met, slo_total, prompt, cur.inflight, *met,
                 queued_prompt_tokens=cur.queued_prompt_tokens, oldest_wait_s=cur.oldest_wait_s,
                 busy_workers=cur.busy_workers)


def _sum_histograms(hs: list[Histogram | None]) -> Histogram | None:
    """Bucket-wise sum of the pods' histogram deltas; None when none has one, or when their
    bucket layouts differ (routers of different versions: no honest merged quantile)."""
    present = [h for h in hs if h is not None]
    if not present:
        return None
    layout = [b for b, _ in present[0].buckets]
    if any([b for b, _ in h.buckets] != layout for h in present[1:]):
        return None
    counts = [sum(h.buckets[i][1] for h in present) for i in range(len(layout))]
    return Histogram(
        tuple(zip(layout, counts, strict=True)),
        sum(h.count for h in present),
        sum(h.total for h in present),
    )


def merge(deltas: list[Delta]) -> Window:
    """The window of a router Deployment from its pods' own deltas. Counts add (histogram
    buckets, finished, SLO verdicts), so quantiles and attainment are those of all requests;
    rates add each pod's count over its own seconds (a pod that appeared later has a shorter
    baseline); concurrency adds each pod's estimate. The prompt-token rate is None when any pod
    lacks the counter (an older router): a part must not read as the whole."""
    if not deltas:
        raise ValueError("merge needs at least one pod's delta")
    ttft = _sum_histograms([d.ttft for d in deltas])
    tpot = _sum_histograms([d.tpot for d in deltas])
    slo_met = sum(d.slo_met for d in deltas)
    slo_total = sum(d.slo_total for d in deltas)
    prompts = [d.prompt_tokens for d in deltas]
    prompt_rate = None
    if all(p is not None for p in prompts):
        prompt_rate = sum((p / d.seconds for p, d in zip(prompts, deltas, strict=True) if p), 0.0)
    return Window(
        seconds=max(d.seconds for d in deltas),
        finished=sum(d.finished for d in deltas),
        requests_per_s=sum(d.finished / d.seconds for d in deltas),
        ttft_p50_ms=_ms(ttft, 0.5),
        ttft_p90_ms=_ms(ttft, 0.9),
        tpot_p50_ms=_ms(tpot, 0.5),
        tpot_p90_ms=_ms(tpot, 0.9),
        attainment=(slo_met / slo_total) if slo_total > 0 else None,
        prompt_tokens_per_s=prompt_rate,
        concurrent_seqs=sum(d.concurrent_seqs for d in deltas),
        ttft_attainment=(sum(d.ttft_met for d in deltas) / slo_total) if slo_total > 0 else None,
        tpot_attainment=(sum(d.tpot_met for d in deltas) / slo_total) if slo_total > 0 else None,
        queued_prompt_tokens=max(d.queued_prompt_tokens for d in deltas),
        oldest_wait_s=max(d.oldest_wait_s for d in deltas),
        busy_workers={role: int(max(d.busy_workers.get(role, 0) for d in deltas))
                      for role in {r for d in deltas for r in d.busy_workers}},
    )


def window(prev: Snapshot, cur: Snapshot) -> Window | None:
    """The window between two scrapes of one pod (``delta`` then ``merge``), or None when it
    cannot be read; the caller then keeps ``cur`` as that pod's new baseline."""
    d = delta(prev, cur)
    return None if d is None else merge([d])


def fetch(url: str, timeout: float = 5.0) -> str:
    """GET ``url`` (a /metrics endpoint) and return its text; MetricsUnavailable on failure."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"metrics URL must be http(s), not {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MetricsUnavailable(f"cannot scrape {url}: {exc}") from exc
