"""Greedy tokens of our engine (on this machine's GPU: Triton kernels, CUDA graphs, overlapped steps) against
Hugging Face transformers on the same weights, for several demo architectures in fp32.

Usage: python bench/lab/engine_exactness.py   (prints one line per model, exits 1 on a mismatch)
"""

from __future__ import annotations

import sys
import tempfile

from splitserve.engine.config import RunnerConfig, SchedulerConfig
from splitserve.engine.demo_model import DemoModelSpec, init_demo_model
from splitserve.engine.engine import EngineConfig, LLMEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.testing.hf_reference import hf_greedy, hf_tokenize

PROMPTS = ["hello world", "the model serve token prompt decode prefill cache " * 9, "a",
           "Explain how the router picks a worker, and why the cache matters?"]
SPECS = {
    "llama-gqa": DemoModelSpec(),
    "qwen2-tied": DemoModelSpec(model_type="qwen2", tie_word_embeddings=True, num_kv_heads=1, seed=1),
    "llama3-rope-d128": DemoModelSpec(llama3_rope_scaling=True, hidden_size=512, num_heads=4, num_kv_heads=1, seed=2),
    "mistral-mha-d64": DemoModelSpec(model_type="mistral", hidden_size=256, num_heads=4, num_kv_heads=4, seed=3),
}


def main() -> int:
    failed = 0
    for name, spec in SPECS.items():
        model_dir = init_demo_model(tempfile.mkdtemp(), spec)
        prompts = hf_tokenize(model_dir, PROMPTS)
        engine = LLMEngine(EngineConfig(RunnerConfig(str(model_dir), block_size=16, num_kv_blocks=256),
                                        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=96)))
        ours = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        ref = hf_greedy(model_dir, prompts, 32, device=str(engine.runner.device))
        same = sum(a == b for a, b in zip(ours, ref, strict=True))
        graphs = engine.runner.graphs is not None
        print(f"{name:>18}: {same}/{len(prompts)} prompts token-identical to transformers "
              f"(device {engine.runner.device}, cuda graphs {graphs}, overlap {engine.overlap})")
        failed += same != len(prompts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
