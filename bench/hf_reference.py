"""Hugging Face transformers as the reference implementation: greedy tokens for exactness checks
(tests on the CPU, ``bench/engine_exactness.py`` on a GPU)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_greedy(
    model_dir: str | Path, prompts: list[list[int]], n: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[list[int]]:
    """``n`` greedy tokens per prompt, with EOS disabled: our engine runs with ``ignore_eos``, so
    both sides generate exactly ``n`` tokens (HF's ``min_new_tokens`` would instead mask EOS logits
    and pick a different token)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out.append(hf.generate(ids, max_new_tokens=n, do_sample=False)[0, len(p):].tolist())
    return out


def hf_tokenize(model_dir: str | Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t)["input_ids"] for t in texts]
