"""`splitserve profile` measures the real engine and writes what the goodput policy loads."""

from __future__ import annotations

from splitserve.engine.config import EngineConfig, RunnerConfig, SchedulerConfig
from splitserve.engine.profile import profile
from splitserve.router.policy.latency import LatencyModel


def test_profile_writes_a_loadable_latency_model(demo_model):
    config = EngineConfig(
        RunnerConfig(str(demo_model), num_kv_blocks=128),
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64),
    )
    lines: list[str] = []
    doc = profile(config, progress=lines.append)
    assert [p[0] for p in doc["prefill"]["points"]] == [16, 32, 64]
    assert {p[0] for p in doc["decode"]["points"]} == {1, 2}
    assert [p[0] for p in doc["transfer"]["points"]] == [16, 32, 64]
    assert all(p[-1] > 0 for section in ("prefill", "decode", "transfer") for p in doc[section]["points"])
    assert len(lines) == 2 + sum(len(doc[s]["points"]) for s in ("prefill", "decode", "transfer"))  # + warm-up, spread
    ratios = doc["spread"]["step_ratio"]  # step time over its median, 5% to 95%
    assert len(ratios) == 19 and ratios == sorted(ratios) and ratios[0] <= 1.0 <= ratios[-1]
    model = LatencyModel.from_dict(doc)
    assert model.prefill_ms(64) > 0 and model.decode_step_ms(2, 512) > 0 and model.step_ratio == tuple(ratios)


def test_prefix_hits_are_measured_and_fitted(demo_model):
    """Prefill after a prefix-cache hit: the points say how many tokens were cached, and the
    fitted model charges the new tokens' attention over the cached ones."""
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.profile import Profiler

    engine = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), block_size=16, num_kv_blocks=64)))
    points = list(Profiler(engine).prefix_points([64], [8, 32]))
    assert [(p[0], p[1]) for p in points] == [(8, 64), (32, 64)] and all(p[2] > 0 for p in points)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    model = LatencyModel.from_dict({"prefill": {"points": [[16, 2.0], [64, 5.0], [256, 30.0], *points]}})
    assert model.prefill_ms(32, 32 * 64) >= model.prefill_ms(32)


def test_latency_model_without_prefix_points_charges_cached_attention_like_its_own():
    model = LatencyModel.from_dict({"prefill": {"points": [[16, 2.0], [64, 5.0], [256, 30.0], [512, 90.0]]}})
    assert model.prefill_per_cached_pair_ms == 2 * model.prefill_per_token2_ms > 0


def test_mixed_steps_are_timed_as_the_colocated_engine_runs_them(demo_model):
    """A prompt chunk computed in the same step as running decodes: one point per chunk size,
    decode batch and context; the engine schedules as before afterwards, every block free."""
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.profile import Profiler

    engine = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), block_size=16, num_kv_blocks=128),
                                    SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)))
    before = engine.config
    points = list(Profiler(engine).mixed_points([16, 32, 64], [2, 4], [32]))
    # the 64-token chunk does not fit the 64-token budget beside the decode rows
    assert [p[:3] for p in points] == [[16, 2, 64], [32, 2, 64], [16, 4, 128], [32, 4, 128]]
    assert all(p[3] > 0 for p in points)
    assert engine.config is before and not engine.scheduler.config.chunked_prefill
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.has_work()


def test_mixed_points_fit_the_mixed_step_model():
    truth = {"base_ms": 3.0, "per_token_ms": 0.02, "per_token2_ms": 1e-5, "per_row_ms": 0.1,
             "per_context_token_ms": 0.001}
    rows = [[t, r, r * c] for t in (64, 256, 1024) for r in (4, 16) for c in (256, 1024)]
    exact = LatencyModel.from_dict({"mixed": truth})
    fitted = LatencyModel.from_dict({"mixed": {"points": [[*x, exact.mixed_ms(*x)] for x in rows]}})
    for x in rows:
        assert abs(fitted.mixed_ms(*x) - exact.mixed_ms(*x)) < 1e-6
    assert fitted.mixed_max_tokens == 1024  # the largest chunk measured: the fit holds up to it
    assert LatencyModel.from_dict({"mixed": {**truth, "max_tokens": 512}}).mixed_max_tokens == 512
    assert LatencyModel().mixed_base_ms is None  # absent: the simulator composes mixed steps


def test_the_transfer_is_profiled_over_the_backend_the_workers_negotiate():
    import torch
    from splitserve.engine.profile import transfer_backend

    assert transfer_backend("auto", torch.device("cpu")) == "tcp"
    assert transfer_backend("auto", torch.device("cuda", 0)) == "cuda_ipc"
    assert transfer_backend("shm", torch.device("cuda", 0)) == "shm"
