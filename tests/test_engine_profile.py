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
    assert len(lines) == sum(len(doc[s]["points"]) for s in ("prefill", "decode", "transfer"))
    model = LatencyModel.from_dict(doc)
    assert model.prefill_ms(64) > 0 and model.decode_step_ms(2, 512) > 0
