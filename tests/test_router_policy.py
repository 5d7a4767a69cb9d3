"""Routing policies on recorded worker load: filters, scorers, pickers, goodput, prefix reuse."""

from __future__ import annotations

import json

import pytest
from splitserve.protocol.prefix_hash import prompt_block_hashes
from splitserve.router.config import SLO
from splitserve.router.policy import (
    LatencyModel,
    NoCandidate,
    RouteRequest,
    SloUnattainable,
    build_policy,
)
from splitserve.router.policy.filters import HasKVEndpoint, HasRoom, Healthy, KVCapacity
from splitserve.router.policy.prefix import PrefixIndex
from splitserve.router.policy.scorers import DecodeLoadScorer, PrefillQueueScorer, PrefixHitScorer
from splitserve.router.workers import WorkerLoad, WorkerState

# Profiled numbers in the shape `splitserve profile` writes: decode step 10 ms + 1 ms per sequence.
MODEL = LatencyModel(
    prefill_base_ms=5, prefill_per_token_ms=0.1, decode_base_ms=10, decode_per_seq_ms=1.0,
    decode_per_context_token_ms=0.0, transfer_base_ms=1, transfer_per_token_ms=0.01,
)


def worker(url: str, role: str, running: int = 0, free: int = 1000, queued: int = 0, healthy: bool = True) -> WorkerState:
    w = WorkerState(url=url, role=role, healthy=healthy, kv_endpoint="127.0.0.1:1" if role == "decode" else None)
    w.set_load(WorkerLoad(running=running, free_blocks=free, total_blocks=1000, queued_prompt_tokens=queued,
                          block_size=16, max_model_len=4096))
    return w


def request(n_tokens: int = 100, slo: SLO | None = None) -> RouteRequest:
    return RouteRequest(list(range(n_tokens)), max_tokens=64, slo=slo or SLO(ttft_ms=500, tpot_ms=50))


def test_goodput_avoids_decode_near_tpot_limit_round_robin_does_not() -> None:
    """Recorded load: decode A runs 38 sequences (step ~49 ms, limit 50 ms), decode B is idle."""
    prefills = [worker("http://p0", "prefill")]
    busy, idle = worker("http://d-busy", "decode", running=38), worker("http://d-idle", "decode")
    goodput, rr = build_policy("goodput", MODEL), build_policy("round_robin")
    picked_goodput = [goodput.pick(request(), prefills, [busy, idle]).decode.url for _ in range(6)]
    picked_rr = [rr.pick(request(), prefills, [busy, idle]).decode.url for _ in range(6)]
    assert picked_goodput == ["http://d-idle"] * 6
    assert picked_rr.count("http://d-busy") == 3
    d = goodput.pick(request(), prefills, [busy, idle])
    assert d.predicted_tpot_ms == pytest.approx(10 + 1.0 * 1)
    assert d.predicted_ttft_ms == pytest.approx(5 + 0.1 * 100 + 1 + 0.01 * 100)


def test_goodput_counts_requests_sent_since_last_poll() -> None:
    """Between two polls the router's own assignments raise the predicted batch."""
    policy = build_policy("goodput", MODEL)
    d0, d1 = worker("http://d0", "decode"), worker("http://d1", "decode")
    for _ in range(10):
        req = request()
        req.with_prefill = False
        policy.pick(req, [], [d0, d1]).decode.note_assigned(100)
    assert {d0.assigned_since_poll, d1.assigned_since_poll} == {5}


def test_goodput_sheds_with_reason_when_no_pair_can_meet_slo() -> None:
    policy = build_policy("goodput", MODEL)
    decodes = [worker("http://d0", "decode", running=60), worker("http://d1", "decode", running=45)]
    with pytest.raises(SloUnattainable) as exc:
        policy.pick(request(), [worker("http://p", "prefill")], decodes)
    assert exc.value.reason == "slo_tpot"
    assert "TPOT" in str(exc.value)
    slow_prefill = worker("http://p", "prefill", queued=10_000)
    with pytest.raises(SloUnattainable) as exc:
        policy.pick(request(), [slow_prefill], [worker("http://d", "decode")])
    assert exc.value.reason == "slo_ttft"


def test_goodput_prefers_prefill_with_short_queue_and_cached_prefix() -> None:
    policy = build_policy("goodput", MODEL)
    p_busy, p_free = worker("http://p-busy", "prefill", queued=2000), worker("http://p-free", "prefill")
    d = [worker("http://d", "decode")]
    assert policy.pick(request(), [p_busy, p_free], d).prefill.url == "http://p-free"
    # A long shared prefix cached on p-busy outweighs its modest queue.
    p_busy.set_load(WorkerLoad(queued_prompt_tokens=100, free_blocks=1000, total_blocks=1000))
    long_req = request(3000, SLO(ttft_ms=5000, tpot_ms=50))
    policy.prefix.record(long_req.block_hashes, "http://p-busy")
    assert policy.pick(long_req, [p_busy, p_free], d).prefill.url == "http://p-busy"


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "prefix_aware", "goodput"])
def test_every_policy_skips_unhealthy_and_full_workers(name: str) -> None:
    policy = build_policy(name, MODEL)
    prefills = [worker("http://p0", "prefill", healthy=False), worker("http://p1", "prefill")]
    decodes = [worker("http://d0", "decode", healthy=False), worker("http://d1", "decode", free=0),
               worker("http://d2", "decode")]
    for _ in range(4):
        d = policy.pick(request(), prefills, decodes)
        assert (d.prefill.url, d.decode.url) == ("http://p1", "http://d2")
    with pytest.raises((NoCandidate, SloUnattainable)):
        policy.pick(request(), prefills, decodes[:2])


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "prefix_aware", "goodput"])
def test_decode_only_mode_needs_no_prefill(name: str) -> None:
    req = request()
    req.with_prefill = False
    d = build_policy(name, MODEL).pick(req, [], [worker("http://d", "decode")])
    assert d.prefill is None and d.decode.url == "http://d"


def test_least_loaded_picks_the_emptier_workers() -> None:
    policy = build_policy("least_loaded")
    prefills = [worker("http://p0", "prefill", queued=4000), worker("http://p1", "prefill", queued=10)]
    decodes = [worker("http://d0", "decode", running=3), worker("http://d1", "decode", running=20, free=100)]
    d = policy.pick(request(), prefills, decodes)
    assert (d.prefill.url, d.decode.url) == ("http://p1", "http://d0")


def test_prefix_aware_sends_shared_prefix_to_the_same_prefill() -> None:
    policy = build_policy("prefix_aware")
    prefills = [worker(f"http://p{i}", "prefill") for i in range(3)]
    decodes = [worker("http://d", "decode")]
    system = list(range(1000, 1064))  # a 64-token shared system prompt
    first = RouteRequest(system + [1, 2, 3], 16)
    d = policy.pick(first, prefills, decodes)
    policy.on_routed(first, d)
    for tail in ([4, 5], [6, 7, 8, 9], list(range(50))):
        req = RouteRequest(system + tail, 16)
        again = policy.pick(req, prefills, decodes)
        assert again.prefill.url == d.prefill.url
        policy.on_routed(req, again)
    other = policy.pick(RouteRequest(list(range(2000, 2064)), 16), prefills, decodes)
    assert other.prefill is not None  # no prefix anywhere: any worker (by load) is fine


def test_prefix_hashes_are_chained_and_skip_the_last_prompt_token() -> None:
    import hashlib
    import struct

    tokens = list(range(70))
    prev, expected = b"", []
    for i in range((len(tokens) - 1) // 16):  # the definition, written out
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(struct.pack("<16I", *tokens[i * 16 : (i + 1) * 16]))
        prev = h.digest()
        expected.append(prev)
    assert prompt_block_hashes(tokens, 16) == expected
    assert len(expected) == 4  # the block holding the last prompt token is never cached
    assert len(prompt_block_hashes(list(range(65)), 16)) == 4
    assert len(prompt_block_hashes(list(range(64)), 16)) == 3


def test_prefix_index_is_bounded_and_per_worker() -> None:
    index = PrefixIndex(capacity=4)
    hashes = prompt_block_hashes(list(range(100)), 16)  # 6 blocks
    index.record(hashes, "a")
    assert index.matched_blocks(hashes, "a") == 0  # oldest (leading) blocks were evicted
    index = PrefixIndex()
    index.record(hashes[:3], "a")
    assert index.matched_blocks(hashes, "a") == 3 and index.matched_blocks(hashes, "b") == 0


def test_filters_and_scorers() -> None:
    req = request(100)
    ws = [worker("http://a", "decode", free=7), worker("http://b", "decode", free=6, healthy=False)]
    ws[0].kv_endpoint = None
    assert Healthy().apply(req, ws) == ws[:1]
    assert HasKVEndpoint().apply(req, ws) == ws[1:]
    assert HasRoom().apply(req, ws) == ws[:1]  # 101 tokens need 7 blocks of 16
    ws[0].note_assigned(16)  # one more block promised since the poll
    assert HasRoom().apply(req, ws) == []
    assert HasRoom.waits and not KVCapacity.waits  # room frees up; a cache never grows
    never_polled = WorkerState(url="http://new", role="decode", healthy=True)
    assert KVCapacity().apply(request(15_999), [*ws, never_polled]) == [*ws, never_polled]  # 1000 blocks
    assert KVCapacity().apply(request(16_000), [*ws, never_polled]) == [never_polled]
    for scorer in (DecodeLoadScorer(), PrefillQueueScorer(), PrefixHitScorer(PrefixIndex())):
        for w in (worker("http://x", "decode", running=500, free=0, queued=10**6), worker("http://y", "decode")):
            assert 0.0 <= scorer.score(req, w) <= 1.0
    assert DecodeLoadScorer().score(req, worker("u", "decode")) > DecodeLoadScorer().score(req, worker("u", "decode", running=5))


def test_round_robin_alternates_pairs() -> None:
    policy = build_policy("round_robin")
    ps = [worker("http://p0", "prefill"), worker("http://p1", "prefill")]
    ds = [worker("http://d0", "decode"), worker("http://d1", "decode")]
    picks = [(d.prefill.url, d.decode.url) for d in (policy.pick(request(), ps, ds) for _ in range(4))]
    assert picks == [("http://p0", "http://d0"), ("http://p1", "http://d1")] * 2
    assert all(k.startswith("decode.") or k.startswith("prefill.") for k in policy.pick(request(), ps, ds).timings_us)


def test_latency_model_from_coefficients_and_points(tmp_path) -> None:
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({
        "prefill": {"points": [[100, 15.0], [200, 25.0], [400, 45.0], [800, 85.0]]},
        "decode": {"points": [[1, 100, 11.0], [8, 100, 18.0], [1, 10000, 21.0], [8, 10000, 28.0]]},
        "transfer": {"base_ms": 2.0, "per_token_ms": 0.02},
        "meta": {"hardware": "test"},
    }))
    m = LatencyModel.load(path)
    assert m.prefill_ms(300) == pytest.approx(35.0, abs=1e-6)
    assert m.decode_step_ms(4, 5000) == pytest.approx(10 - 100 * 10 / 9900 + 4 + 5000 * 10 / 9900, abs=1e-6)
    assert m.transfer_ms(100) == pytest.approx(4.0)
    path.write_text(json.dumps({"prefill": {"base_ms": 1, "per_tokn_ms": 2}}))
    with pytest.raises(ValueError, match="per_tokn_ms"):
        LatencyModel.load(path)
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy("fastest")
