"""observe.py on metric text: bucket-delta quantiles, rates, Little's law, resets, fetch.

Most texts come from the router's own ``RouterMetrics`` (so a renamed router metric breaks these
tests, not production), one is written by hand to pin the exact interpolation.
``MetricsStub`` (a real HTTP server) is also what the Kubernetes test points the operator at.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import Counter, generate_latest
from splitserve.operator import observe
from splitserve.router.metrics import RouterMetrics


class MetricsStub:
    """A router-like /metrics on 127.0.0.1 (port 0): ``load(metrics)`` runs before each scrape,
    so each scrape shows the traffic of one more interval."""

    def __init__(self, load: Callable[[RouterMetrics, Counter], None] | None = None) -> None:
        self.metrics = RouterMetrics()
        self.prompt_tokens = self.metrics.prompt_tokens
        self.load = load
        self.scrapes = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with stub.lock:
                    body = stub.body(self.path)
                    stub.scrapes += body is not None
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.lock = threading.Lock()  # the operator scrapes pods concurrently
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def body(self, path: str) -> bytes | None:
        """The answer to GET ``path`` (None: 404)."""
        if path != "/metrics":
            return None
        if self.load is not None:
            self.load(self.metrics, self.prompt_tokens)
        return generate_latest(self.metrics.registry)

    def __enter__(self) -> MetricsStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def text_of(m: RouterMetrics) -> str:
    return generate_latest(m.registry).decode()


def observe_n(m: RouterMetrics, n: int, ttft: float, tpot: float, e2e: float) -> None:
    for _ in range(n):
        m.observe_sequence(ttft, tpot, e2e, 10, slo_ttft_s=0.5, slo_tpot_s=0.05)


HAND_WRITTEN = """\
# TYPE splitserve_router_ttft_seconds histogram
splitserve_router_ttft_seconds_bucket{{le="0.1"}} {a}
splitserve_router_ttft_seconds_bucket{{le="0.2"}} {b}
splitserve_router_ttft_seconds_bucket{{le="+Inf"}} {c}
splitserve_router_ttft_seconds_count {c}
splitserve_router_ttft_seconds_sum {s}
# TYPE splitserve_router_prompt_tokens counter
splitserve_router_prompt_tokens_total {p}
# TYPE splitserve_router_inflight_sequences gauge
splitserve_router_inflight_sequences {g}
"""


def test_quantiles_interpolate_within_the_bucket_delta() -> None:
    t0 = observe.parse(HAND_WRITTEN.format(a=5, b=5, c=5, s=0.2, p=100, g=0), at=10.0)
    # in the window: 10 observations in (0.1, 0.2], none elsewhere; 3000 prompt tokens
    t1 = observe.parse(HAND_WRITTEN.format(a=5, b=15, c=15, s=1.7, p=3100, g=2), at=12.0)
    w = observe.window(t0, t1)
    assert w is not None
    assert w.ttft_p50_ms == pytest.approx(150.0)  # 0.1 + 0.1 * (5 / 10)
    assert w.ttft_p90_ms == pytest.approx(190.0)
    assert w.prompt_tokens_per_s == pytest.approx(1500.0)
    assert w.tpot_p50_ms is None and w.attainment is None  # nothing of those in the text
    assert w.concurrent_seqs == 2  # no e2e histogram: the gauge alone


def test_window_from_router_metrics_text() -> None:
    m = RouterMetrics()
    observe_n(m, 20, ttft=0.02, tpot=0.005, e2e=1.0)  # before the window: must not count
    before = observe.parse(text_of(m), at=100.0)
    observe_n(m, 8, ttft=0.3, tpot=0.04, e2e=2.0)  # meets both targets
    observe_n(m, 2, ttft=0.7, tpot=0.04, e2e=3.0)  # misses TTFT
    m.inflight.set(7)
    m.prompt_tokens.inc(500)
    after = observe.parse(text_of(m), at=110.0)
    w = observe.window(before, after)
    assert w is not None
    assert w.seconds == 10 and w.finished == 10 and w.requests_per_s == pytest.approx(1.0)
    # 8 of 10 TTFTs in (0.25, 0.5], 2 in (0.5, 1]: p50 inside the first, p90 the second
    assert w.ttft_p50_ms == pytest.approx((0.25 + 0.25 * 5 / 8) * 1000)
    assert w.ttft_p90_ms == pytest.approx((0.5 + 0.5 * 1 / 2) * 1000)
    assert w.tpot_p90_ms == pytest.approx((0.02 + 0.02 * 0.9) * 1000)  # all in (0.02, 0.04]
    assert w.attainment == pytest.approx(0.8)
    # each target's own attainment, for the planner's per-pool feedback
    assert (w.ttft_attainment, w.tpot_attainment) == (pytest.approx(0.8), 1.0)
    # Little's law: (8 * 2 s + 2 * 3 s) / 10 s = 2.2 in flight on average; the gauge says 7
    assert w.concurrent_seqs == 7
    m.inflight.set(0)
    quiet = observe.window(before, observe.parse(text_of(m), at=110.0))
    assert quiet is not None and quiet.concurrent_seqs == pytest.approx(2.2)
    assert w.prompt_tokens_per_s == pytest.approx(50.0)  # 500 prompt tokens in 10 s
    status = w.to_status()
    assert status["ttftP90Ms"] == 750.0 and status["concurrentSequences"] == 7


def test_empty_window_has_no_latencies() -> None:
    m = RouterMetrics()
    observe_n(m, 3, 0.1, 0.01, 1.0)
    a = observe.parse(text_of(m), at=0.0)
    w = observe.window(a, observe.parse(text_of(m), at=5.0))
    assert w is not None
    assert (w.finished, w.ttft_p90_ms, w.tpot_p50_ms, w.attainment) == (0, None, None, None)


def test_counter_reset_or_no_time_gives_no_window() -> None:
    m = RouterMetrics()
    observe_n(m, 5, 0.1, 0.01, 1.0)
    busy = observe.parse(text_of(m), at=0.0)
    fresh = observe.parse(text_of(RouterMetrics()), at=5.0)  # a restarted router
    assert observe.window(busy, fresh) is None
    assert observe.window(busy, busy) is None  # zero seconds
    gone = observe.parse(HAND_WRITTEN.format(a=0, b=0, c=0, s=0, p=50, g=0), at=1.0)
    more = observe.parse(HAND_WRITTEN.format(a=0, b=0, c=0, s=0, p=10, g=0), at=2.0)
    assert observe.window(gone, more) is None  # prompt-token counter went down


def test_quantile_edges() -> None:
    h = observe.Histogram(((0.1, 0.0), (0.2, 1.0), (float("inf"), 10.0)), 10.0, 5.0)
    assert h.quantile(0.9) == 0.2  # rank in +Inf: the highest finite bound, as Prometheus
    assert h.quantile(0.05) == pytest.approx(0.15)
    assert observe.Histogram(((float("inf"), 0.0),), 0.0, 0.0).quantile(0.5) is None
    with pytest.raises(ValueError, match="quantile"):
        h.quantile(1.5)


def test_bad_text_and_unreachable_endpoint_raise_metrics_unavailable() -> None:
    with pytest.raises(observe.MetricsUnavailable, match="parse"):
        observe.parse("splitserve_router_ttft_seconds_bucket{le=oops} x\n", at=0.0)
    with MetricsStub() as stub:
        url = stub.url
        with pytest.raises(observe.MetricsUnavailable, match="404"):
            observe.fetch(url.replace("/metrics", "/nope"))
    with pytest.raises(observe.MetricsUnavailable, match="cannot scrape"):
        observe.fetch(url, timeout=2)  # the server is gone: connection refused
    with pytest.raises(ValueError, match="http"):
        observe.fetch("file:///etc/passwd")


@pytest.fixture
def loaded_stub() -> Iterator[MetricsStub]:
    def load(m: RouterMetrics, prompt: Counter) -> None:
        observe_n(m, 4, 0.3, 0.04, 2.0)
        prompt.inc(4 * 500)

    with MetricsStub(load) as stub:
        yield stub


def test_fetch_and_parse_two_real_scrapes(loaded_stub: MetricsStub) -> None:
    a = observe.parse(observe.fetch(loaded_stub.url), at=0.0)
    b = observe.parse(observe.fetch(loaded_stub.url), at=2.0)
    w = observe.window(a, b)
    assert w is not None and loaded_stub.scrapes == 2
    assert w.finished == 4 and w.prompt_tokens_per_s == pytest.approx(1000.0)
    assert w.ttft_p90_ms == pytest.approx(475.0) and w.attainment == 1.0


# ---------------------------------------------------------------- several router pods ----------
def pod_delta(m_before: str, m_after: str, seconds: float) -> observe.Delta:
    d = observe.delta(observe.parse(m_before, at=0.0), observe.parse(m_after, at=seconds))
    assert d is not None
    return d


def test_merge_adds_pods_buckets_verdicts_rates_and_concurrency() -> None:
    a, b = RouterMetrics(), RouterMetrics()
    a0, b0 = text_of(a), text_of(b)
    observe_n(a, 4, ttft=0.3, tpot=0.04, e2e=2.0)  # pod a: 4 in SLO
    a.inflight.set(10)
    a.prompt_tokens.inc(1000)
    observe_n(b, 1, ttft=0.7, tpot=0.04, e2e=2.0)  # pod b: 1 misses TTFT
    b.inflight.set(20)
    b.prompt_tokens.inc(500)
    da, db = pod_delta(a0, text_of(a), 10.0), pod_delta(b0, text_of(b), 5.0)  # b: newer baseline
    w = observe.merge([da, db])
    alone = observe.merge([da])
    assert w.finished == 5 and w.attainment == pytest.approx(0.8) and alone.attainment == 1.0
    # the summed buckets: 4 TTFTs in (0.25, 0.5], 1 in (0.5, 1] -> p90 = 0.5 + 0.5 * 0.5
    assert w.ttft_p90_ms == pytest.approx(750.0) and alone.ttft_p90_ms < 500
    # rates: each pod's count over its own seconds, added
    assert w.requests_per_s == pytest.approx(4 / 10 + 1 / 5)
    assert w.prompt_tokens_per_s == pytest.approx(1000 / 10 + 500 / 5)
    assert w.concurrent_seqs == 30 and w.seconds == 10  # gauges add
    assert observe.window(observe.parse(a0, 0.0), observe.parse(text_of(a), 10.0)) == alone


def test_merge_of_mixed_pods_says_what_it_cannot_know() -> None:
    old = HAND_WRITTEN.replace("# TYPE splitserve_router_prompt_tokens counter\n", "")
    old = "\n".join(x for x in old.splitlines() if "prompt_tokens_total" not in x) + "\n"
    d_old = pod_delta(old.format(a=0, b=0, c=0, s=0, g=0), old.format(a=1, b=1, c=1, s=0, g=0), 1)
    d_new = pod_delta(HAND_WRITTEN.format(a=0, b=0, c=0, s=0, p=0, g=0),
                      HAND_WRITTEN.format(a=0, b=2, c=2, s=0, p=9, g=0), 1)  # fmt: skip
    assert d_old.prompt_tokens is None and d_new.prompt_tokens == 9
    w = observe.merge([d_old, d_new])
    assert w.prompt_tokens_per_s is None  # one pod's part must not read as the whole
    assert w.ttft_p90_ms is not None  # same bucket layout: merged
    m = RouterMetrics()  # a different bucket layout: no honest merged quantile
    other = pod_delta(text_of(m), (observe_n(m, 1, 0.3, 0.04, 1.0), text_of(m))[1], 1)
    assert observe.merge([d_new, other]).ttft_p90_ms is None
    with pytest.raises(ValueError, match="at least one"):
        observe.merge([])


class PodsMetricsStub(MetricsStub):
    """Several router pods' /metrics behind one server: ``/<pod>/metrics`` is pod ``<pod>``'s
    own RouterMetrics (made on its first scrape). ``load(i, metrics)`` runs before each scrape
    of the ``i``-th pod seen, so pods can carry different traffic; ``url_template`` is the
    ``SPLITSERVE_ROUTER_POD_METRICS_URL`` that maps a pod to its path."""

    def __init__(self, load: Callable[[int, RouterMetrics], None]) -> None:
        self.pods: dict[str, RouterMetrics] = {}
        self.pod_load = load
        super().__init__()
        self.url_template = self.url.replace("/metrics", "/{pod}/metrics")

    def body(self, path: str) -> bytes | None:
        parts = path.strip("/").split("/")
        if len(parts) != 2 or parts[1] != "metrics":
            return None
        if parts[0] not in self.pods:
            self.pods[parts[0]] = RouterMetrics()
        m = self.pods[parts[0]]
        self.pod_load(list(self.pods).index(parts[0]), m)
        return generate_latest(m.registry)
