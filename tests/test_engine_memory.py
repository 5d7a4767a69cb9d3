"""A worker's share of its GPU (engine/memory.py), on the CPU with a fake memory query.

The share is a fraction of the device's total memory, so two workers on one device get the same
KV cache whatever order they start in; an impossible share is refused before the weights load,
naming the flag to change; the log says where the memory went.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from splitserve.engine import runner as runner_module
from splitserve.engine.config import ModelConfig, RunnerConfig, SchedulerConfig
from splitserve.engine.loader import empty_model
from splitserve.engine.memory import (
    NON_TORCH_BYTES,
    MemoryBudgetError,
    estimate_plan,
    largest_prefill,
    parameter_count,
    profile_lengths,
    weight_bytes,
)
from splitserve.engine.runner import ModelRunner
from splitserve.worker.options import add_worker_args, options_from_args

GiB = 2**30

LLAMA3_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
}


class FakeMemory:
    """A device of ``total`` bytes of which ``others`` are held by other processes; this process
    holds ``held`` (what the runner's measurements see) and peaks at ``held + spike``."""

    def __init__(self, total: int, others: int = 0, held: int = 0, spike: int = 0) -> None:
        self.total_bytes, self.others, self.held, self.spike = total, others, held, spike

    def total(self) -> int:
        return self.total_bytes

    def free(self) -> int:
        return self.total_bytes - self.others - self.held

    def allocated(self) -> int:
        return self.held

    def reserved(self) -> int:
        return self.held

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return self.held + self.spike


def _runner(model_dir, memory: FakeMemory, **runner) -> ModelRunner:
    config = RunnerConfig(model_dir=str(model_dir), device="cpu", **runner)
    return ModelRunner(config, SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8), memory=memory)


def test_parameter_count_matches_the_model(model_variant):
    cfg = ModelConfig.from_pretrained(model_variant)
    model = empty_model(cfg, torch.float32, torch.device("meta"))
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_llama3_8b_weights_estimate():
    cfg = ModelConfig.from_dict(LLAMA3_8B)
    assert parameter_count(cfg) == 8_030_261_248  # Meta-Llama-3-8B
    assert 14.9 * GiB < weight_bytes(cfg, 2) < 15.1 * GiB


def test_two_workers_sharing_a_device_get_the_same_kv_cache_whatever_the_order(demo_model):
    """The second worker sees the first one's share gone from the free memory; its own share,
    a fraction of the total, is the same."""
    total = 4 * GiB
    first = _runner(demo_model, FakeMemory(total), gpu_memory_utilization=0.425)
    taken = int(0.425 * total)
    second = _runner(demo_model, FakeMemory(total, others=taken), gpu_memory_utilization=0.425)
    assert first.num_blocks == second.num_blocks
    expected = (int(0.425 * total) - NON_TORCH_BYTES) // first.bytes_per_block
    assert first.num_blocks == pytest.approx(expected, rel=0.01)  # the fake measures ~0 weights


def test_measured_weights_and_activations_come_off_the_share(demo_model):
    memory = FakeMemory(4 * GiB, held=0, spike=GiB // 2)
    base = _runner(demo_model, FakeMemory(4 * GiB), gpu_memory_utilization=0.5)
    spiky = _runner(demo_model, memory, gpu_memory_utilization=0.5)
    assert base.num_blocks - spiky.num_blocks == (GiB // 2) // base.bytes_per_block


def test_a_share_the_device_cannot_hold_now_is_refused_naming_the_flag(demo_model):
    """Two workers at the default 0.85 on one device: the second's KV cache does not fit."""
    total = 4 * GiB
    with pytest.raises(MemoryBudgetError, match="--gpu-memory-utilization") as err:
        _runner(demo_model, FakeMemory(total, others=int(0.85 * total)))
    assert "sum to at most 1" in str(err.value)


def test_an_impossible_share_is_refused_before_the_weights_load(demo_model, monkeypatch):
    def no_loading(*_a, **_k):
        raise AssertionError("the weights must not load for an impossible share")

    monkeypatch.setattr(runner_module, "load_model", no_loading)
    with pytest.raises(MemoryBudgetError, match=r"--gpu-memory-utilization 0\.1 .*at least") as err:
        _runner(demo_model, FakeMemory(4 * GiB), gpu_memory_utilization=0.1)
    assert "estimated before loading" in str(err.value)


def test_an_8b_model_at_a_tiny_share_is_refused_with_the_fraction_that_would_do():
    cfg = ModelConfig.from_dict(LLAMA3_8B)
    bytes_per_block = 2 * 32 * 16 * 8 * 128 * 2
    plan = estimate_plan("cuda:0", 141 * GiB, 0.1, cfg, 2, 8192, 64, 64)
    with pytest.raises(MemoryBudgetError, match=r"weights 14\.96 .*to at least 0\.1[1-9]"):
        plan.check(bytes_per_block, 8192, 16)
    half = estimate_plan("cuda:0", 141 * GiB, 0.425, cfg, 2, 8192, 64, 64)
    half.check(bytes_per_block, 8192, 16)
    assert 40 * GiB < half.kv < 45 * GiB


def test_the_log_says_where_the_memory_went(demo_model, caplog):
    with caplog.at_level(logging.INFO, logger="splitserve.engine.runner"):
        _runner(demo_model, FakeMemory(4 * GiB), gpu_memory_utilization=0.3)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory on"))
    for part in ("--gpu-memory-utilization 0.3", "weights", "activations", "CUDA graphs", "KV cache"):
        assert part in line


def test_explicit_kv_sizes_skip_the_share(demo_model):
    runner = _runner(demo_model, FakeMemory(GiB // 4), num_kv_blocks=100)
    assert runner.num_blocks == 100


def test_profiled_prefill_covers_the_largest_batch():
    assert sum(profile_lengths(8192, 64, 1024)) == 8192
    assert len(profile_lengths(8192, 64, 1024)) == 64
    assert max(profile_lengths(8192, 4, 1024)) == 1023  # never past the context
    assert profile_lengths(3, 64, 1024) == [1, 1, 1]
    assert largest_prefill(8192, chunked_prefill=False, max_model_len=32768) == 32767
    assert largest_prefill(8192, chunked_prefill=True, max_model_len=32768) == 8192


def test_worker_flag_sets_the_fraction():
    parser = argparse.ArgumentParser()
    add_worker_args(parser, default_port=0)
    args = parser.parse_args(["--model", "m", "--gpu-memory-utilization", "0.4"])
    assert options_from_args(args, "decode").engine.runner.gpu_memory_utilization == 0.4
    default = options_from_args(parser.parse_args(["--model", "m"]), "decode")
    assert default.engine.runner.gpu_memory_utilization == 0.85
