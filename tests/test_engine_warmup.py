"""The warm-up a worker runs before it reports healthy: it exercises the prefill path's shapes
and leaves the engine exactly as idle as it found it."""

from __future__ import annotations

from splitserve.engine.config import RunnerConfig, SchedulerConfig
from splitserve.engine.engine import EngineConfig, LLMEngine
from splitserve.engine.warmup import warm_up, warmup_batches


def test_batches_hit_each_triton_specialisation_and_fit_the_context() -> None:
    batches = warmup_batches(16, 4096)
    totals = {sum(b) for b in batches}
    assert 1 in totals and any(t % 16 == 0 for t in totals) and any(t % 16 for t in totals)
    assert any(len(b) > 1 for b in batches)  # packed prompts too
    assert all(1 <= n <= 5 for b in warmup_batches(16, 5) for n in b)


def test_warm_up_leaves_no_work_and_no_held_blocks(demo_model) -> None:
    for chunked in (False, True):
        engine = LLMEngine(EngineConfig(
            RunnerConfig(str(demo_model), dtype="float32", max_model_len=128, num_kv_blocks=64),
            SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, chunked_prefill=chunked),
        ))
        steps: list = []
        engine.step_observers.append(steps.append)
        warm_up(engine)
        assert not engine.has_work()
        assert engine.blocks.num_free_blocks == 64
        assert any(s.is_prefill and s.num_seqs > 1 for s in steps)  # a packed prefill ran
        assert any(not s.is_prefill for s in steps)  # and decode steps
