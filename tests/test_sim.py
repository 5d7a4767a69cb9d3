"""The simulator (``splitserve sim``): its rules on tiny synthetic latency models, not timing
accuracy (that is what bench/lab/sim_validate.py measures against real runs)."""

from __future__ import annotations

import json

import pytest
from splitserve.bench.results import find_runs
from splitserve.bench.stats import SLO, attainment, percentile, summarize
from splitserve.bench.workloads import LengthCaps, build_requests
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence
from splitserve.router.policy.latency import LatencyModel
from splitserve.sim.cluster import Layout, SimConfig, SimRequest, Simulation, prompt_ids
from splitserve.sim.costs import step_ms, transfer_done_ms
from splitserve.sim.plan import candidates, plan, search
from splitserve.sim.runner import EngineShape
from splitserve.sim.sweep import Load, SimSpec, sim_requests, simulate

LAT = LatencyModel(prefill_base_ms=10, prefill_per_token_ms=0.05, prefill_per_token2_ms=0.0,
                   prefill_per_cached_pair_ms=0.0, decode_base_ms=5, decode_per_seq_ms=0.1,
                   decode_per_context_token_ms=0.0005, transfer_base_ms=1, transfer_per_token_ms=0.01)
SHAPE = EngineShape(num_blocks=4000, block_size=16, max_num_seqs=64, max_num_batched_tokens=2048)


def _run(layout: Layout, reqs: list[SimRequest], shape: EngineShape = SHAPE, lat: LatencyModel = LAT):
    sim = Simulation(SimConfig(layout, shape), lat, reqs)
    return sim, sim.run()


def _workload(rate: float, n: int = 120, workload: str = "chat", **caps) -> list[SimRequest]:
    return sim_requests(build_requests(workload, n, rate, 0, caps=LengthCaps(**caps), with_text=False))


def test_layout_parse_and_candidates_cover_every_split_and_colocated():
    assert Layout.parse("2P6D") == Layout(2, 6) and Layout.parse("colocated8") == Layout(0, 8)
    assert Layout.parse("c4").label == "colocated4"
    with pytest.raises(ValueError):
        Layout.parse("8")
    assert [lay.label for lay in candidates(3)] == ["1P2D", "2P1D", "colocated3"]


def test_decode_step_costs_what_profile_measured_and_prefill_is_one_pass():
    seqs = [Sequence(f"r{i}", list(range(100)), SamplingParams(max_tokens=4)) for i in range(3)]
    for s in seqs:
        s.num_computed_tokens, s.num_scheduled_tokens = 99, 1
    assert step_ms(LAT, seqs, False) == pytest.approx(LAT.decode_step_ms(3, 300))
    for s in seqs:
        s.num_computed_tokens, s.num_scheduled_tokens = 0, 100
    assert step_ms(LAT, seqs, True) == pytest.approx(10 + 0.05 * 300)  # one base for the batch


def test_kv_transfer_overlaps_the_prefill_step():
    # a short transfer ends just after the step; a long one from the step's start
    assert transfer_done_ms(LAT, 100, 0.0, 50.0) == pytest.approx(51.0)
    assert transfer_done_ms(LAT, 10_000, 0.0, 50.0) == pytest.approx(101.0)


def test_one_request_timeline_split_and_colocated():
    req = [SimRequest(0, 0.0, 160, 5)]
    _, [split] = _run(Layout(1, 1), req)
    prefill = LAT.prefill_ms(160)
    assert split.ttft_s * 1000 == pytest.approx(max(prefill + 1, LAT.transfer_ms(160)))
    # tokens 2..5 come from decode steps of a batch of one
    assert split.itl_s == pytest.approx([LAT.decode_step_ms(1, n) / 1000 for n in (161, 162, 163, 164)])
    _, [colo] = _run(Layout(0, 1), req)
    assert colo.ttft_s * 1000 == pytest.approx(prefill)  # no transfer
    assert colo.output_tokens == split.output_tokens == 5


def test_every_request_is_accounted_for_and_every_block_comes_back():
    reqs = _workload(8.0, n=150)
    for layout in (Layout(1, 2), Layout(0, 3)):
        sim, records = _run(layout, reqs)
        assert [r.index for r in records] == [r.index for r in reqs]
        assert all(r.ok and r.output_tokens == q.max_tokens for r, q in zip(records, reqs, strict=True))
        for w in (*sim.prefills, *sim.decodes):
            assert not w.engine.has_work()
            assert w.engine.blocks.num_free_blocks == SHAPE.num_blocks


def test_a_cache_too_small_for_every_answer_preempts_and_still_finishes_every_request(monkeypatch):
    from splitserve.engine.scheduler import Scheduler

    preempted = []
    real = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, seq: (preempted.append(seq), real(self, seq)))
    small = EngineShape(num_blocks=120, block_size=16, max_num_seqs=64, max_num_batched_tokens=2048)
    reqs = _workload(20.0, n=60, max_input=32, max_output=300)
    sim, records = _run(Layout(0, 1), reqs, small)
    assert preempted  # a full cache at admission waits, then is shed (429), never a lost request:
    assert all(r.ok or "HTTP 429: no_kv_room" in r.error for r in records)
    assert sum(r.ok for r in records) > len(records) // 2
    assert sim.decodes[0].engine.blocks.num_free_blocks == small.num_blocks


def test_a_prompt_with_no_room_waits_for_room_as_the_router_waits():
    """40 blocks of 16: two 500-token prompts never fit together, so the second waits in the
    router's admission for the first to end (within max_queue_ms, else 429 no_kv_room); a prompt
    larger than the whole cache is refused at once."""
    small = EngineShape(num_blocks=40, block_size=16, max_num_seqs=64, max_num_batched_tokens=2048)
    reqs = [SimRequest(0, 0.0, 500, 5), SimRequest(1, 0.001, 500, 5), SimRequest(2, 0.002, 640, 5)]
    sim, records = _run(Layout(0, 1), reqs, small)
    assert records[0].ok and records[1].ok
    assert records[1].ttft_s > records[0].e2e_s - 0.001  # admitted once the first freed its blocks
    assert records[2].error.startswith("HTTP 400") and "whole KV cache" in records[2].error
    assert sim.decodes[0].engine.blocks.num_free_blocks == small.num_blocks
    _, records = _run(Layout(0, 1), [SimRequest(0, 0.0, 500, 120), SimRequest(1, 0.001, 500, 5)], small)
    assert records[0].ok and records[1].error == "HTTP 429: no_kv_room (shed after 500 ms)"


def test_higher_rate_means_later_first_tokens():
    p90 = []
    for rate in (2.0, 8.0, 32.0):
        _, records = _run(Layout(1, 1), _workload(rate))
        p90.append(percentile([r.ttft_s for r in records], 0.9))
    assert p90[0] < p90[1] < p90[2]


def test_split_beats_colocated_at_a_tight_tpot_and_not_at_a_loose_one():
    # prompts long enough that a colocated step carrying a chunk is many decode steps long
    reqs = _workload(8.0, n=80, workload="summarisation", max_output=64)
    _, split = _run(Layout(1, 1), reqs)
    _, colo = _run(Layout(0, 2), reqs)
    tight, loose = SLO(ttft_s=2.0, tpot_s=0.015), SLO(ttft_s=2.0, tpot_s=0.1)
    tpot = {k: summarize(v, tight)["tpot_ms"]["p90"] for k, v in (("split", split), ("colo", colo))}
    assert tpot["split"] < tight.tpot_s * 1000 < tpot["colo"]
    assert attainment(split, tight).both >= 0.9 > attainment(colo, tight).both
    assert attainment(colo, loose).both >= attainment(split, loose).both


def test_prefix_sharing_reaches_the_block_manager():
    reqs = [SimRequest(0, 0.0, 320, 2), SimRequest(1, 1.0, 480, 2, prefix_of=0)]
    ids = prompt_ids(reqs, 0)
    assert ids(1)[:320] == ids(0) and len(ids(1)) == 480
    sim, _ = _run(Layout(0, 1), reqs)
    assert sim.steps >= 2
    assert sim.decodes[0].engine.blocks.num_free_blocks == SHAPE.num_blocks


def test_sim_requests_are_the_bench_requests():
    with_text = build_requests("chat", 50, 4.0, 3)
    without = build_requests("chat", 50, 4.0, 3, with_text=False)
    key = [(r.arrival_s, r.prompt_tokens, r.max_tokens, r.prefix_of) for r in with_text.requests]
    assert key == [(r.arrival_s, r.prompt_tokens, r.max_tokens, r.prefix_of) for r in without.requests]


def test_goodput_search_brackets_the_crossing():
    spec = SimSpec(Layout(0, 1), SHAPE)
    load = Load("chat", num_requests=40, duration_s=20.0, max_requests=2000)
    slo = SLO(0.25, 0.05)
    row = search(spec, LAT, load, slo, refine=2)
    assert row.goodput.status == "interpolated"
    ok = [r for r, a in row.points if a >= slo.attainment]
    bad = [r for r, a in row.points if a < slo.attainment]
    assert max(ok) <= row.goodput.rate <= min(bad)
    records, cost = simulate(spec, LAT, sim_requests(load.request_set(max(ok))), slo)
    assert attainment(records, slo).both >= slo.attainment and cost["steps"] > 0


def test_a_run_that_surely_misses_stops_early_and_one_that_meets_runs_as_before():
    spec, slo = SimSpec(Layout(1, 1), SHAPE), SLO(0.25, 0.05)
    load = Load("chat", duration_s=5.0, max_requests=2000)
    stopped = []
    for rate in (4.0, 40.0, 80.0):
        reqs = sim_requests(load.request_set(rate))
        full, _ = simulate(spec, LAT, reqs, slo)
        early, cost = simulate(spec, LAT, reqs, slo, stop_early=True)
        stopped.append(cost["stopped"])
        if cost["stopped"]:  # an upper bound, below the target: the same pass/fail
            assert attainment(full, slo).both <= cost["attainment_bound"] < slo.attainment
            assert any(r.error == "simulation stopped early" for r in early)
        else:
            assert [r.to_dict() for r in early] == [r.to_dict() for r in full]
    assert stopped == [False, True, True]


def test_a_request_counts_as_a_miss_once_its_ttft_or_tpot_deadline_passes_and_not_before():
    from splitserve.bench.records import RequestRecord
    from splitserve.sim.sweep import MissCount

    slo = SLO(ttft_s=0.1, tpot_s=0.01, attainment=0.5)
    watch = MissCount(slo, [SimRequest(0, 0.0, 10, 21), SimRequest(1, 0.05, 10, 11)])
    first = RequestRecord(0, 0.0, 10, 21, sent_s=0.0, ttft_s=0.05, output_tokens=1)
    assert not watch(first, 50.0) and not watch.missed
    # at 150 ms request 1 (sent at 50 ms, no token yet) would have a TTFT of 0.1 s: not over
    assert not watch(first, 150.0) and not watch.missed
    assert not watch(first, 150.5) and watch.missed == {1}
    # request 0 (first token at 50 ms, 20 gaps to go) finishing at 249 ms would make 10 ms
    assert not watch(first, 249.0) and watch.missed == {1}
    assert watch(first, 251.0) and watch.missed == {0, 1}  # it cannot any more
    assert watch.bound == 0.0


def test_the_search_gives_the_goodput_of_full_runs_when_failing_runs_stop_early():
    """A search driven by a known attainment curve: stopped runs report a bound just below the
    target, and the failing point that the interpolation reads is asked for again in full."""
    from splitserve.bench.stats import goodput
    from splitserve.sim.plan import _Search

    def curve(rate: float) -> float:
        return max(0.0, 1.0 - rate / 100)

    s = _Search(SimSpec(Layout(1, 1), SHAPE), 0.9, start=3.0, refine=3)
    steps, asked = s.steps(), []
    try:
        probe = next(steps)
        while True:
            asked.append(probe)
            a = curve(probe.rate)
            probe = steps.send((a, False, 0.1) if probe.exact or a >= 0.9 else (0.899, True, 0.1))
    except StopIteration as done:
        row = done.value
    rates = sorted({p.rate for p in asked})
    assert row.goodput == goodput([(r, curve(r)) for r in rates], 0.9)
    assert row.goodput.status == "interpolated"
    assert set(row.bounded) == {r for r, a in row.points if a == 0.899}
    assert all(curve(r) < 0.9 for r in row.bounded)
    again = [p for p in asked if p.exact and [q.rate for q in asked].count(p.rate) == 2]
    assert len(again) == 1  # the interpolated failing point (10.5 here), asked again in full


def test_a_plan_on_more_processes_than_searches_answers_as_one_process_does():
    """Idle processes simulate the rates a search may ask for next; the answers stay."""
    spec, slo = SimSpec(Layout(0, 2), SHAPE), SLO(0.25, 0.05)
    load = Load("chat", num_requests=40, duration_s=5.0, max_requests=2000)
    one = plan(spec, LAT, load, slo, 2, refine=2, jobs=1)
    many = plan(spec, LAT, load, slo, 2, refine=2, jobs=5)
    assert [(r.layout, r.goodput, r.points, r.bounded) for r in many] == \
        [(r.layout, r.goodput, r.points, r.bounded) for r in one]


def test_cli_writes_run_files_that_bench_report_reads(tmp_path):
    from splitserve.cli import main

    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({
        "prefill": {"points": [[16, 10.8], [256, 22.8], [1024, 61.2]]},
        "decode": {"base_ms": 5, "per_seq_ms": 0.1, "per_context_token_ms": 0.0005},
        "meta": {"block_size": 16, "num_kv_blocks": 2000},
    }))
    out = tmp_path / "out"
    assert main(["sim", "--latency-model", str(lat), "--workload", "chat", "--rates", "1,2",
                 "--colocated", "2", "--num-requests", "20", "--out", str(out), "--no-plots"]) == 0
    runs = find_runs([out / "colocated2"])
    assert [r.rate for r in runs] == [1.0, 2.0] and all(r.num_gpus == 2 for r in runs)
    assert runs[0].data["simulated"]["layout"] == "colocated2"
    assert (out / "colocated2" / "report_chat" / "report.json").is_file()


def test_validation_compares_latencies_relatively_and_attainment_in_points():
    import argparse

    from splitserve.bench.lab.sim_validate import compare, markdown, system_command

    args = argparse.Namespace(tolerance=0.10, attainment_points=5.0)
    summary = {"ttft_ms": {"p50": 100.0, "p90": 200.0}, "tpot_ms": {"p50": 10.0, "p90": 20.0},
               "attainment": {"both": 0.95}}
    near = {"ttft_ms": {"p50": 109.0, "p90": 181.0}, "tpot_ms": {"p50": 10.5, "p90": 19.0},
            "attainment": {"both": 0.91}}
    assert compare("split", 2.0, summary, near, args)["pass"]
    far = dict(near, tpot_ms={"p50": 12.0, "p90": 19.0})
    row = compare("split", 2.0, summary, far, args)
    assert not row["pass"] and not row["metrics"]["tpot p50"]["pass"]
    assert "| split | 2 |" in markdown([row], args)
    cmd_args = argparse.Namespace(devices="cuda:0,cuda:1", dtype="bfloat16", num_kv_blocks=64,
                                  max_num_seqs=8, max_num_batched_tokens=512, worker_args="",
                                  random_weights=True, kv_backend="cuda_ipc", policy="least_loaded")
    colo, split = system_command("colocated", cmd_args), system_command("split", cmd_args)
    assert "--chunked-prefill" in colo and "--devices cuda:0 " in colo and "kv-backend" not in colo
    assert "--kv-backend cuda_ipc" in split and "--devices cuda:0,cuda:1" in split


def test_a_fixed_seed_gives_the_records_it_gave_before_the_fast_paths():
    """Digests of whole record lists, taken before the engine's per-token fast paths (and before
    step-time spread and per-hop overheads, which default to none): a split run and a colocated
    one whose cache is small enough to preempt. A change here is a change of behaviour."""
    import hashlib
    from pathlib import Path

    lat = LatencyModel.load(Path(__file__).parents[1] / "bench/profiles/h200-llama3-8b-shape.json")
    for layout, rate, n, blocks, want in (("1P2D", 20, 300, 2000, "fa1bdf494a44f772"),
                                          ("colocated1", 30, 200, 300, "b36d8587a5b0e840")):
        reqs = sim_requests(build_requests("chat", n, rate, 0, with_text=False))
        shape = EngineShape(blocks, 16, 64, 2048)
        records = Simulation(SimConfig(Layout.parse(layout), shape), lat, reqs).run()
        text = json.dumps([r.to_dict() for r in records], sort_keys=True)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == want, layout


def test_measured_overheads_delay_routing_and_the_split_handoff():
    from dataclasses import replace

    req = [SimRequest(0, 0.0, 160, 5)]
    lat = replace(LAT, overhead_request_ms=(7.0,), overhead_handoff_ms=(3.0,))
    _, [split0] = _run(Layout(1, 1), req)
    _, [split] = _run(Layout(1, 1), req, lat=lat)
    _, [colo0] = _run(Layout(0, 1), req)
    _, [colo] = _run(Layout(0, 1), req, lat=lat)
    assert colo.ttft_s * 1000 == pytest.approx(colo0.ttft_s * 1000 + 7)  # no handoff colocated
    assert split.ttft_s * 1000 == pytest.approx(split0.ttft_s * 1000 + 7 + 3)
    assert split.itl_s == pytest.approx(split0.itl_s) and colo.itl_s == pytest.approx(colo0.itl_s)
    # a split path's own measured overhead replaces both on split layouts
    lat = replace(lat, overhead_split_request_ms=(12.0,))
    assert _run(Layout(1, 1), req, lat=lat)[1][0].ttft_s * 1000 == pytest.approx(split0.ttft_s * 1000 + 12)
    assert _run(Layout(0, 1), req, lat=lat)[1][0].ttft_s * 1000 == pytest.approx(colo0.ttft_s * 1000 + 7)


def test_the_overhead_grows_with_the_requests_in_flight_per_worker():
    from dataclasses import replace

    def routed_at(layout: Layout, lat: LatencyModel) -> list[float]:
        reqs = [SimRequest(i, i * 0.01, 160, 200) for i in range(3)]  # all three in flight together
        sim, at = Simulation(SimConfig(layout, SHAPE), lat, reqs), {}
        route = sim._route

        def spy(t: float, rid: str, deadline: float) -> None:
            at.setdefault(rid, t)
            route(t, rid, deadline)

        sim._route = spy
        sim.run()
        return [at[str(i)] - i * 10 for i in range(3)]

    lat = replace(LAT, overhead_request_ms=(7.0,), overhead_request_per_inflight_ms=(4.0,))
    assert routed_at(Layout(0, 1), lat) == pytest.approx([7.0, 11.0, 15.0])
    assert routed_at(Layout(0, 2), lat) == pytest.approx([7.0, 9.0, 11.0])  # half the streams per worker
    assert routed_at(Layout(1, 1), lat) == pytest.approx([7.0, 11.0, 15.0])  # no split path's own: the same
    own = replace(lat, overhead_split_request_ms=(5.0, 5.0), overhead_split_request_per_inflight_ms=(1.0, 1.0))
    assert routed_at(Layout(1, 1), own) == pytest.approx([5.0, 6.0, 7.0])
    # one growth per value: a drawn value grows at its own rate (here the tail grows faster)
    tail = replace(LAT, overhead_request_ms=(7.0, 7.0), overhead_request_per_inflight_ms=(0.0, 0.0))
    assert routed_at(Layout(0, 1), tail) == pytest.approx([7.0] * 3)


def test_step_time_spread_is_drawn_per_step_and_repeats_with_the_seed():
    from dataclasses import replace

    lat = replace(LAT, step_ratio=(0.5, 1.0, 1.5))
    reqs = _workload(4.0, n=40)
    _, plain = _run(Layout(1, 1), reqs)
    _, spread = _run(Layout(1, 1), reqs, lat=lat)
    _, again = _run(Layout(1, 1), reqs, lat=lat)
    assert [r.to_dict() for r in spread] == [r.to_dict() for r in again]
    gaps = [g for r in spread for g in r.itl_s]
    plain_gaps = [g for r in plain for g in r.itl_s]
    assert max(gaps) > 1.3 * max(plain_gaps) and min(gaps) < 0.7 * min(plain_gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(sum(plain_gaps) / len(plain_gaps), rel=0.1)


@pytest.mark.parametrize("devices", ["cuda:0,cuda:1", "cuda:0,cuda:0"])
def test_validation_calibrates_the_overhead_that_the_measured_runs_paid(tmp_path, devices):
    """Runs 'measured' by a simulator that charges known overheads (and, with the split's two
    workers on one GPU, a known sharing slowdown): calibration recovers them, and the profile's
    other sections stay."""
    import argparse
    from dataclasses import replace

    from splitserve.bench.lab.sim_validate import calibrate
    from splitserve.sim.sweep import run_rate

    profile = tmp_path / "lat.json"
    profile.write_text(json.dumps({"prefill": {"base_ms": 10, "per_token_ms": 0.05},
                                   "decode": {"base_ms": 5, "per_seq_ms": 0.1, "per_context_token_ms": 0.0005},
                                   "transfer": {"base_ms": 1, "per_token_ms": 0.01},
                                   "meta": {"block_size": 16}}))
    shared = devices == "cuda:0,cuda:0"
    real = replace(LatencyModel.load(profile), overhead_request_ms=(6.0,), overhead_split_request_ms=(15.0,),
                   sharing_slowdown=0.5)
    load, slo = Load("chat", num_requests=60, max_requests=60), SLO(1.0, 0.1)
    for label, layout in (("colocated", Layout(0, 1)), ("split", Layout(1, 1, 1 if shared else None))):
        for rate in (0.5, 12.0):
            run_rate(SimSpec(layout, SHAPE), real, load, rate, slo, tmp_path / "real", label)
    args = argparse.Namespace(devices=devices, num_kv_blocks=SHAPE.num_blocks, max_num_seqs=SHAPE.max_num_seqs,
                              max_num_batched_tokens=SHAPE.max_num_batched_tokens, policy="least_loaded")
    doc = json.loads(calibrate(args, tmp_path, profile).read_text())
    assert doc["overhead"]["request_ms"][9] == pytest.approx(6.0, abs=0.5)  # the median
    assert doc["overhead"]["split_request_ms"][9] == pytest.approx(15.0, abs=0.5)
    if shared:
        assert doc["sharing"]["slowdown"] == pytest.approx(0.5, abs=0.1)
    else:
        assert "sharing" not in doc
    assert doc["prefill"] == json.loads(profile.read_text())["prefill"]
    assert LatencyModel.from_dict(doc).overhead_request_ms[9] == doc["overhead"]["request_ms"][9]


def test_a_queued_request_asks_again_at_the_routers_poll_rounds_and_once_at_its_deadline():
    """As router/admission.py: a request the policy cannot place waits for the next round of
    load polls (every 500 ms by default), and is asked once more at its deadline."""
    from splitserve.router.policy import SloUnattainable
    from splitserve.sim.cluster import POLL_ROUND_MS

    sim = Simulation(SimConfig(Layout(1, 1), SHAPE), LAT, [SimRequest(0, 0.12, 160, 5)])
    asked, real_pick = [], sim.policy.pick

    def pick(*args):  # no pair for the first two asks
        asked.append(1)
        if len(asked) <= 2:
            raise SloUnattainable("test", "not yet")
        return real_pick(*args)

    sim.policy.pick = pick
    times = []
    real_route = sim._route
    sim._route = lambda t, *a: (times.append(t), real_route(t, *a))[1]
    [record] = sim.run()
    assert POLL_ROUND_MS == 500
    assert times == pytest.approx([120.0, 500.0, 620.0])  # arrival, a round, the deadline
    assert record.error is None and record.ttft_s * 1000 > 500


def test_shared_gpu_layout_parses_and_labels():
    lay = Layout.parse("1P1D-on-1gpu")
    assert lay == Layout(1, 1, gpus=1) and lay.label == "1P1D-on-1gpu" and lay.shared
    assert lay.num_gpus == 1 and Layout.parse(lay.label) == lay
    assert Layout(1, 1, gpus=2).label == "1P1D" and not Layout(1, 1, gpus=2).shared
    with pytest.raises(ValueError):
        Layout(1, 1, gpus=3)


def test_steps_on_a_shared_gpu_progress_at_one_over_k():
    from splitserve.sim.cluster import _SharedGpu

    gpu, a, b = _SharedGpu(), object(), object()
    gpu.start(0.0, a, 10.0)
    assert dict(gpu.ends(0.0))[a] == pytest.approx(10.0)
    gpu.start(5.0, b, 10.0)  # a has 5 ms of work left, now at half speed
    ends = dict(gpu.ends(5.0))
    assert ends[a] == pytest.approx(15.0) and ends[b] == pytest.approx(25.0)
    gpu.finish(15.0, a)  # b did 5 ms of work in those 10 ms; the rest at full speed
    assert dict(gpu.ends(15.0))[b] == pytest.approx(20.0)


def test_a_split_sharing_one_gpu_is_the_split_when_alone_and_slower_under_load():
    alone = [SimRequest(0, 0.0, 160, 5)]
    assert _run(Layout(1, 1, gpus=1), alone)[1][0].to_dict() == _run(Layout(1, 1), alone)[1][0].to_dict()
    reqs = _workload(20.0, n=150)
    _, own = _run(Layout(1, 1), reqs)
    sim, shared = _run(Layout(1, 1, gpus=1), reqs)
    assert all(r.ok for r in shared)
    tpot = [percentile([r.tpot_s for r in recs if r.tpot_s is not None], 0.5) for recs in (own, shared)]
    assert tpot[1] > tpot[0] * 1.05  # decode steps stretch while the prefill worker computes
    for w in (*sim.prefills, *sim.decodes):
        assert not w.engine.has_work() and w.engine.blocks.num_free_blocks == SHAPE.num_blocks


def test_a_profiled_mixed_step_prices_decode_rows_beside_a_chunk():
    from dataclasses import replace

    lat = replace(LAT, mixed_base_ms=25.0, mixed_per_token_ms=0.03, mixed_per_token2_ms=0.0,
                  mixed_per_row_ms=0.5, mixed_per_context_token_ms=0.002)
    rows = [Sequence(f"d{i}", list(range(100)), SamplingParams(max_tokens=8)) for i in range(3)]
    for s in rows:
        s.token_ids.append(7)  # one answer token so far
        s.num_computed_tokens, s.num_scheduled_tokens = 100, 1
    chunk = Sequence("p", list(range(300)), SamplingParams(max_tokens=8))
    chunk.num_computed_tokens, chunk.num_scheduled_tokens = 0, 200
    assert step_ms(lat, [*rows, chunk], True) == pytest.approx(lat.mixed_ms(200, 3, 303))
    # a prefill step with no decode row is priced by the prefill curve, as without the section
    assert step_ms(lat, [chunk], True) == pytest.approx(step_ms(LAT, [chunk], True))
    # a chunk larger than any profiled: the prefill curve, plus the rows' extra where measured
    big = Sequence("b", list(range(5000)), SamplingParams(max_tokens=8))
    big.num_computed_tokens, big.num_scheduled_tokens = 0, 4000
    capped = replace(lat, mixed_base_ms=40.0, mixed_max_tokens=1024.0)
    extra = capped.mixed_ms(1024, 3, 303) - capped.prefill_ms(1024)
    assert extra > 0 and step_ms(capped, [*rows, big], True) == pytest.approx(capped.prefill_ms(4000) + extra)
    # never cheaper than the chunk's own prefill
    cheap = replace(capped, mixed_base_ms=0.0, mixed_per_row_ms=0.0, mixed_per_context_token_ms=0.0)
    assert step_ms(cheap, [*rows, big], True) == pytest.approx(capped.prefill_ms(4000))
