"""Policy as data: the plugin registry, each plugin on its own, configurations (presets and
files), per-pair transfer estimates, and admission's wake-up."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from splitserve.router.config import SLO, RouterConfig
from splitserve.router.policy import (
    POLICIES,
    NoCandidate,
    RouteRequest,
    Shortage,
    SloUnattainable,
    Unservable,
    build_policy,
    plugins,
)
from splitserve.router.policy.base import PolicyContext
from splitserve.router.policy.goodput import PairTransfer, SloSlackPicker, TpotSlack, TtftSlack
from splitserve.router.policy.latency import LatencyModel
from splitserve.router.policy.pickers import MaxScorePicker, RoundRobinPicker
from splitserve.router.policy.presets import PRESETS
from splitserve.router.policy.spec import PolicySpec
from splitserve.router.policy.transfer import TransferEstimator
from splitserve.router.workers import WorkerLoad, WorkerState

MODEL = LatencyModel(prefill_base_ms=5, prefill_per_token_ms=0.1, decode_base_ms=10, decode_per_seq_ms=1.0,
                     decode_per_context_token_ms=0.0, transfer_base_ms=1, transfer_per_token_ms=0.01)


def worker(url: str, role: str, running: int = 0, free: int = 1000, queued: int = 0) -> WorkerState:
    w = WorkerState(url=url, role=role, healthy=True, kv_endpoint="127.0.0.1:1" if role == "decode" else None)
    w.set_load(WorkerLoad(running=running, free_blocks=free, total_blocks=1000, queued_prompt_tokens=queued,
                          block_size=16, max_model_len=4096))
    return w


def request(n_tokens: int = 100, ttft_ms: float = 500, tpot_ms: float = 50) -> RouteRequest:
    return RouteRequest(list(range(n_tokens)), max_tokens=64, slo=SLO(ttft_ms=ttft_ms, tpot_ms=tpot_ms))


def varied_workers(role: str) -> list[WorkerState]:
    """Idle, busy, full, overloaded and never-polled workers."""
    never_polled = WorkerState(url="http://new", role=role, healthy=True)
    return [worker("http://idle", role), worker("http://busy", role, running=40, queued=5000),
            worker("http://full", role, free=0), worker("http://huge", role, running=10**4, queued=10**7),
            never_polled]


# -- the registry


def test_every_builtin_plugin_is_named_by_kind_and_a_duplicate_name_is_refused() -> None:
    assert plugins.names("filter") == ["has_room", "healthy", "kv_capacity", "kv_endpoint"]
    assert plugins.names("scorer") == ["decode_load", "prefill_queue", "prefix_hit"]
    assert plugins.names("picker") == ["max_score", "round_robin"]
    assert plugins.names("pair_scorer") == ["pair_transfer", "tpot_slack", "ttft_slack"]
    assert plugins.names("pair_picker") == ["slo_slack"]
    assert plugins.lookup("picker", "max_score") is MaxScorePicker
    with pytest.raises(ValueError, match="unknown scorer 'healthy'"):
        plugins.lookup("scorer", "healthy")  # a filter's name is not a scorer

    class Again(RoundRobinPicker):
        name = "max_score"

    with pytest.raises(ValueError, match="'max_score' is taken"):
        plugins.register(Again)
    plugins.register(MaxScorePicker)  # the same class again is no conflict


# -- each plugin on its own


@pytest.mark.parametrize("name", plugins.names("scorer"))
def test_every_scorer_scores_every_candidate_in_unit_interval(name: str) -> None:
    scorer = plugins.lookup("scorer", name).create(PolicyContext(MODEL))
    for role in ("prefill", "decode"):
        for w in varied_workers(role):
            w.note_assigned(3000)
            for n in (1, 100, 4000):
                assert 0.0 <= scorer.score(request(n), w) <= 1.0, (name, w.url, n)


@pytest.mark.parametrize("name", plugins.names("pair_scorer"))
def test_every_pair_scorer_predicts_each_pair_and_scores_in_unit_interval(name: str) -> None:
    scorer = plugins.lookup("pair_scorer", name).create(PolicyContext(MODEL))
    ps, ds = varied_workers("prefill"), varied_workers("decode")
    for prefills in (ps, [None]):
        for req in (request(1), request(4000, ttft_ms=1, tpot_ms=1)):
            grid = scorer.predict_ms(req, prefills, ds)
            assert len(grid) == len(prefills) and all(len(row) == len(ds) for row in grid)
            for row in grid:
                assert all(v >= 0 and 0.0 <= scorer.score(req, v) <= 1.0 for v in row)


def test_ttft_slack_prices_queue_prompt_and_the_pairs_measured_transfer() -> None:
    ctx = PolicyContext(MODEL)
    ttft = TtftSlack.create(ctx)
    p, near, far = worker("http://p", "prefill", queued=200), worker("http://near", "decode"), worker("http://far", "decode")
    req = request(100)
    prefill_ms, transfer_ms = 5 + 0.1 * 300, 1 + 0.01 * 100
    assert ttft.predict_ms(req, [p], [near, far]) == [[pytest.approx(prefill_ms + transfer_ms)] * 2]
    for _ in range(30):
        ctx.transfers.observe("http://p", "http://far", 100, 10 * transfer_ms)  # far is 10x the model
    near_ms, far_ms = ttft.predict_ms(req, [p], [near, far])[0]
    assert near_ms == pytest.approx(prefill_ms + transfer_ms)
    assert far_ms == pytest.approx(prefill_ms + 10 * transfer_ms, rel=0.01)
    assert ttft.score(req, near_ms) > ttft.score(req, far_ms) > 0
    assert ttft.score(req, 10 * req.slo.ttft_ms) == 0.0 and ttft.slack(req, 2 * req.slo.ttft_ms) == -1.0
    assert ttft.predict_ms(req, [None], [near]) == [[pytest.approx(5 + 0.1 * 100)]]  # decode computes it


def test_tpot_slack_counts_running_waiting_and_assigned_sequences() -> None:
    tpot = TpotSlack.create(PolicyContext(MODEL))
    idle, busy = worker("http://idle", "decode"), worker("http://busy", "decode", running=20)
    busy.note_assigned(10)
    assert tpot.predict_ms(request(), [None], [idle, busy]) == [[10 + 1.0, 10 + 22.0]]


def test_pair_transfer_prefers_the_faster_pair() -> None:
    ctx = PolicyContext(MODEL)
    scorer = PairTransfer.create(ctx, scale_ms=2.0)
    ctx.transfers.observe("http://p", "http://slow", 100, 50.0)
    ms = scorer.predict_ms(request(), [worker("http://p", "prefill")], [worker("http://fast", "decode"),
                                                                          worker("http://slow", "decode")])[0]
    assert scorer.score(request(), ms[0]) > scorer.score(request(), ms[1])
    with pytest.raises(ValueError, match="scale_ms"):
        PairTransfer.create(ctx, scale_ms=0)


def test_pickers_round_robin_and_max_score_share_ties() -> None:
    a, b, c = (worker(f"http://{n}", "decode") for n in "abc")
    rr = RoundRobinPicker()
    assert [rr.pick([(c, 0.9), (a, 0.1), (b, 0.5)]).url for _ in range(4)] == ["http://a", "http://b", "http://c", "http://a"]
    ms = MaxScorePicker()
    assert ms.pick([(a, 0.1), (b, 0.9), (c, 0.2)]) is b
    assert {ms.pick([(a, 0.5), (b, 0.5), (c, 0.2)]).url for _ in range(2)} == {"http://a", "http://b"}


def test_slo_slack_picks_largest_worst_slack_and_names_the_missed_target() -> None:
    ttft, tpot = TtftSlack.create(PolicyContext(MODEL)), TpotSlack.create(PolicyContext(MODEL))
    req = request(ttft_ms=100, tpot_ms=100)
    picker = SloSlackPicker()
    # pair (i, j): TTFT [[20, 20], [90, 90]], TPOT [[50, 30]] * 2 -> (0, 1): min slack 0.7
    grid = [(ttft, 1.0, [[20.0, 20.0], [90.0, 90.0]]), (tpot, 1.0, [[50.0, 30.0], [50.0, 30.0]])]
    assert picker.pick(req, grid, (2, 2)) == (0, 1)
    with pytest.raises(SloUnattainable) as exc:
        picker.pick(req, [(ttft, 1.0, [[20.0]]), (tpot, 1.0, [[150.0]])], (1, 1))
    assert exc.value.reason == "slo_tpot" and "TPOT 150.0 ms vs target 100.0 ms" in str(exc.value)
    with pytest.raises(SloUnattainable) as exc:  # each target met by some pair, never both by one
        picker.pick(req, [(ttft, 1.0, [[20.0, 150.0]]), (tpot, 1.0, [[150.0, 20.0]])], (1, 2))
    assert exc.value.reason == "slo_ttft_tpot"


# -- transfer estimates


def test_transfer_estimate_starts_at_the_model_and_follows_measurements_per_pair() -> None:
    est = TransferEstimator(MODEL, alpha=0.5)
    prior = est.prior_ms(100)
    assert prior == pytest.approx(2.0) and est.estimate_ms("p", "d", prior) == prior
    est.observe("p", "d", 100, 6.0)  # 3x the model: halfway from 1 to 3
    assert est.estimate_ms("p", "d", prior) == pytest.approx(4.0)
    assert est.estimate_ms("p", "other", prior) == prior and est.estimate_ms("other", "d", prior) == prior
    assert est.estimate_ms("p", "d", est.prior_ms(1000)) == pytest.approx(2 * 11.0)  # a ratio: scales with length
    for bad in (None, -1.0, math.nan, math.inf):
        est.observe("p", "d", 100, bad)
    assert est.estimate_ms("p", "d", prior) == pytest.approx(4.0)


def test_goodput_moves_off_a_pair_whose_measured_transfer_breaks_the_ttft_target() -> None:
    policy = build_policy("goodput", MODEL)
    p, d0, d1 = worker("http://p", "prefill"), worker("http://d0", "decode"), worker("http://d1", "decode", running=5)
    req = request(100, ttft_ms=40)
    assert policy.pick(req, [p], [d0, d1]).decode.url == "http://d0"  # idle, equal transfers
    for _ in range(20):
        policy.observe_transfer("http://p", "http://d0", 100, 60.0)  # d0 sits across a slow link
    d = policy.pick(req, [p], [d0, d1])
    assert d.decode.url == "http://d1" and d.predicted_ttft_ms == pytest.approx(5 + 10 + 2)


# -- configurations


def test_presets_are_configurations_and_build_distinct_policies() -> None:
    assert POLICIES == ("round_robin", "least_loaded", "prefix_aware", "goodput")
    for name in POLICIES:
        spec = PolicySpec.preset(name)
        assert spec.name == name and (spec.pair is not None) == (name == "goodput")
        assert build_policy(spec).name == name
    goodput = PolicySpec.preset("goodput")
    assert [(s.name, s.weight) for s in goodput.pair.scorers] == [("ttft_slack", 1.0), ("tpot_slack", 1.0)]
    assert all(PolicySpec.preset(name).queue for name in POLICIES)  # each waits out a KV shortage
    a, b = build_policy("round_robin"), build_policy("round_robin")
    assert a.decode_stage.picker is not b.decode_stage.picker  # no state shared between routers


def test_a_policy_configuration_file_in_yaml_or_json(tmp_path) -> None:
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text(
        "name: busiest_prefix\n"
        "prefill:\n  filters: [healthy]\n  scorers: {prefill_queue: 2}\n  picker: max_score\n"
        "decode:\n  filters: [healthy, kv_endpoint, has_room]\n"
        "  scorers: [{name: decode_load, weight: 0.5}]\n  picker: round_robin\n"
    )
    spec = PolicySpec.load(yaml_file)
    assert [(s.name, s.weight) for s in spec.prefill.scorers] == [("prefill_queue", 2.0)]
    policy = build_policy(spec)
    ps = [worker("http://p0", "prefill", queued=4000), worker("http://p1", "prefill")]
    d = policy.pick(request(), ps, [worker("http://d0", "decode")])
    assert (policy.name, d.prefill.url, d.decode.url) == ("busiest_prefix", "http://p1", "http://d0")
    assert set(d.timings_us) == {"prefill.healthy", "prefill.score", "decode.healthy", "decode.kv_endpoint",
                                 "decode.has_room", "decode.score"}

    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps({
        "name": "close_pairs", "prefill": {"filters": ["healthy"]}, "decode": {"filters": ["healthy"]},
        "pair": {"scorers": {"ttft_slack": 1, "tpot_slack": 1, "pair_transfer": {"weight": 0.1, "scale_ms": 20}},
                 "picker": "slo_slack"},
    }))
    spec = PolicySpec.load(json_file)
    assert spec.pair.scorers[2].args == (("scale_ms", 20),)
    d = build_policy(spec, MODEL).pick(request(), [worker("http://p", "prefill")], [worker("http://d", "decode")])
    assert set(d.timings_us) >= {"pair.ttft_slack", "pair.tpot_slack", "pair.pair_transfer", "pair.pick"}


@pytest.mark.parametrize(("data", "error"), [
    ({"name": "x", "prefill": {"picker": "max_score"}, "decode": {"picker": "max_score"}, "extra": 1},
     "unknown policy field"),
    ({"name": "x", "prefill": {"picker": "max_score"}, "decode": {"filters": ["roomy"], "picker": "max_score"}},
     "unknown filter 'roomy'"),
    ({"name": "x", "prefill": {"picker": "max_score"}, "decode": {}}, "decode needs a picker"),
    ({"name": "x", "prefill": {"scorers": {"prefill_queue": -1}, "picker": "max_score"}, "decode": {"picker": "max_score"}},
     "finite number >= 0"),
    ({"name": "x", "prefill": {"scorers": {"prefill_queue": {"scale": 3}}, "picker": "max_score"},
      "decode": {"picker": "max_score"}}, "bad arguments"),
    ({"name": "x", "prefill": {"picker": "max_score"}, "decode": {}, "pair": {"picker": "slo_slack"}},
     "prefill and decode only filter"),
    ({"name": "x", "pair": {"scorers": ["ttft_slack"], "picker": "max_score"}}, "unknown pair_picker"),
    ({"name": "x", "prefill": {"filters": [{"name": "healthy", "weight": 2}], "picker": "max_score"},
      "decode": {"picker": "max_score"}}, "filters take no weight"),
    ({"prefill": {"picker": "max_score"}, "decode": {"picker": "max_score"}}, "needs a name"),
    ({"name": "x", "pair": {"picker": "slo_slack"}, "queue": "yes"}, "true or false"),
])
def test_a_bad_configuration_is_refused_with_what_is_wrong(data: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        PolicySpec.from_dict(data)


def test_router_config_and_command_line_take_a_policy_configuration(tmp_path) -> None:
    import argparse

    from splitserve.router.cli import config_from_args, register

    def parse(*argv: str) -> RouterConfig:
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        return config_from_args(parser.parse_args(["router", "--model", "m", "--decode", "http://d:1", *argv]))

    data = {"name": "mine", "prefill": {"picker": "round_robin"}, "decode": {"filters": ["healthy"], "picker": "round_robin"}}
    spec = PolicySpec.from_dict(data)
    (tmp_path / "mine.json").write_text(json.dumps(data))
    assert (parse().policy, parse().policy_config) == ("round_robin", None)
    assert parse("--policy", "goodput").policy == "goodput"
    from_file = parse("--policy-config", str(tmp_path / "mine.json"))
    assert from_file.policy == "mine" and from_file.policy_config == spec
    with pytest.raises(ValueError, match="exclude each other"):
        parse("--policy-config", str(tmp_path / "mine.json"), "--policy", "goodput")
    with pytest.raises(ValueError, match="cannot load policy configuration"):
        parse("--policy-config", str(tmp_path / "missing.yaml"))

    base = {"served_model_name": "m", "model_dir": ".", "decode_urls": ("http://d",)}
    assert RouterConfig(**base, policy="mine", policy_config=spec).policy_config is spec
    with pytest.raises(ValueError, match="not the configuration's name"):
        RouterConfig(**base, policy="goodput", policy_config=spec)
    with pytest.raises(ValueError, match="preset's name"):
        RouterConfig(**base, policy="goodput", policy_config=PolicySpec.preset("goodput"))
    with pytest.raises(ValueError, match="policy must be one of"):
        RouterConfig(**base, policy="mine")


@pytest.mark.parametrize("name", POLICIES)
def test_every_preset_waits_while_no_decode_worker_has_kv_room(name: str) -> None:
    """Blocks free as running requests end: a shortage is queued (a SloUnattainable), not a 503."""
    full = [worker("http://d0", "decode", free=0), worker("http://d1", "decode", free=6)]  # 101 tokens: 7 blocks
    with pytest.raises(Shortage) as exc:
        build_policy(name, MODEL).pick(request(), [worker("http://p", "prefill")], full)
    assert isinstance(exc.value, SloUnattainable) and exc.value.reason == "no_kv_room"
    assert str(exc.value) == "every decode worker is out of KV blocks for this prompt"
    assert build_policy(name, MODEL).pick(request(90), [worker("http://p", "prefill")], full).decode.url == "http://d1"


def test_a_policy_that_does_not_queue_refuses_a_kv_shortage_at_once() -> None:
    spec = PolicySpec.from_dict({**PRESETS["least_loaded"], "name": "eager", "queue": False})
    with pytest.raises(NoCandidate, match="out of KV blocks.*filtered out by 'has_room'") as exc:
        build_policy(spec).pick(request(), [worker("http://p", "prefill")], [worker("http://d", "decode", free=0)])
    assert not isinstance(exc.value, Unservable)


@pytest.mark.parametrize("name", POLICIES)
def test_a_prompt_larger_than_every_decode_workers_whole_cache_fails_at_once(name: str) -> None:
    """1000 blocks of 16 hold 15999 prompt tokens and the first token: 16000 never fit, however
    empty the workers are, so nothing waits for them; a worker that could hold it but is down
    now leaves it an ordinary NoCandidate (it may come back)."""
    policy, prefills = build_policy(name, MODEL), [worker("http://p", "prefill")]
    decodes = [worker("http://d0", "decode"), worker("http://d1", "decode", free=0)]
    with pytest.raises(Unservable) as exc:
        policy.pick(request(16_000), prefills, decodes)
    assert exc.value.code == "prompt_exceeds_kv_cache"
    assert "larger than every decode worker's whole KV cache (16000 prompt tokens)" in str(exc.value)
    assert policy.pick(request(15_999, ttft_ms=10**6), prefills, decodes).decode.url == "http://d0"
    big = worker("http://big", "decode")
    big.set_load(WorkerLoad(free_blocks=2000, total_blocks=2000, block_size=16))
    big.healthy = False
    with pytest.raises(NoCandidate, match="'healthy'") as exc:
        policy.pick(request(16_000), prefills, [*decodes, big])
    assert not isinstance(exc.value, Unservable)


# -- admission and metrics


def test_admission_wakes_waiters_on_notify_and_times_out_otherwise() -> None:
    from splitserve.router.admission import AdmissionSignal

    async def main() -> None:
        signal = AdmissionSignal()
        t0 = time.monotonic()
        assert await signal.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.045
        waiters = [asyncio.create_task(signal.wait(5.0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        signal.notify()
        assert await asyncio.gather(*waiters) == [True] * 3
        assert time.monotonic() - t0 < 0.5
        signal.notify()  # nobody waits: nothing happens
        assert await signal.wait(0.0) is False

    asyncio.run(main())


def test_policy_step_times_are_a_sampled_histogram_per_policy_and_step() -> None:
    from splitserve.router.metrics import RouterMetrics

    metrics = RouterMetrics()
    d = build_policy("goodput", MODEL).pick(request(), [worker("http://p", "prefill")], [worker("http://d", "decode")])
    metrics.observe_policy_steps("goodput", d.timings_us)
    text = metrics.exposition().decode()
    for step in ("decode.healthy", "pair.ttft_slack", "pair.pick"):
        assert f'splitserve_router_policy_step_seconds_count{{policy="goodput",step="{step}"}} 1.0' in text
    for _ in range(8):  # sampled: one decision in 8
        metrics.observe_policy_steps("goodput", d.timings_us)
    assert 'splitserve_router_policy_step_seconds_count{policy="goodput",step="pair.pick"} 2.0' in metrics.exposition().decode()


def test_a_queued_request_asks_the_policy_again_only_when_the_pool_reports() -> None:
    """Admission is event-driven: no asking on a timer; a poll round admits at once; the deadline
    still sheds."""
    from splitserve.router.dispatch import Dispatcher
    from splitserve.router.errors import ShedError
    from splitserve.router.metrics import RouterMetrics

    class Pool:
        def __init__(self) -> None:
            self.on_change: set = set()
            self.workers = {"decode": [worker("http://d", "decode")], "prefill": []}

        def role(self, role: str) -> list[WorkerState]:
            return self.workers[role]

        def round(self) -> None:
            for callback in list(self.on_change):
                callback()

    class Gate:
        name, asked, open = "gate", 0, False

        def pick(self, req: RouteRequest, prefills: list, decodes: list):  # noqa: ANN202
            self.asked += 1
            if not self.open:
                raise SloUnattainable("slo_tpot", "not now")
            return build_policy("round_robin").pick(req, prefills, decodes)

    async def main() -> None:
        config = RouterConfig(served_model_name="m", model_dir=".", decode_urls=("http://d",), max_queue_ms=300)
        pool, gate = Pool(), Gate()
        dispatcher = Dispatcher(config, pool, None, gate, RouterMetrics())
        task = asyncio.create_task(dispatcher.route(request(), set()))
        await asyncio.sleep(0.1)
        assert gate.asked == 1 and dispatcher.queued == 1  # waiting, not polling
        pool.round()  # a load report that changes nothing: asked again, still waiting
        await asyncio.sleep(0.01)
        assert gate.asked == 2 and not task.done()
        gate.open = True
        t0 = time.monotonic()
        pool.round()
        decision = await task
        assert decision.decode.url == "http://d" and time.monotonic() - t0 < 0.05
        assert gate.asked == 3 and dispatcher.queued == 0
        gate.open = False
        t0 = time.monotonic()
        with pytest.raises(ShedError):
            await dispatcher.route(request(), set())
        assert 0.28 < time.monotonic() - t0 < 0.6 and gate.asked == 5  # first ask, last ask at the deadline

    asyncio.run(main())
