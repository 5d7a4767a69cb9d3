"""Hugging Face transformers as the reference implementation: greedy tokens for exactness checks
(tests on the CPU, ``bench/lab/engine_exactness.py`` on a GPU)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_greedy(
    model_dir: str | Path, prompts: list[list[int]], n: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[list[int]]:
    """``n`` greedy tokens per prompt, with EOS disabled: our engine runs with ``ignore_eos``, so
    both sides generate exactly ``n`` tokens (HF's ``min_new_tokens`` would instead mask EOS logits
    and pick a different token)."""
    hf = hf_model(model_dir, dtype).to(device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out.append(hf.generate(ids, max_new_tokens=n, do_sample=False)[0, len(p):].tolist())
    return out


def hf_model(model_path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' model for a folder or a GGUF file. A GGUF is read by transformers' own GGUF
    code (config from the metadata, ``load_gguf_checkpoint``: its dequantization, name mapping
    and Q/K un-permutation); ``from_pretrained(gguf_file=...)`` would do the same but needs the
    ``accelerate`` package, which serving does not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_path)
    if not path.is_file():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) - {"lm_head.weight"} or result.unexpected_keys:
        raise ValueError(f"transformers could not fill {path.name}: {result}")
    model.tie_weights()
    return model.eval()


def hf_tokenizer(model_path: str | Path):
    """transformers' tokenizer for a folder or a GGUF file (built from the file's metadata)."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    if path.is_file():
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def hf_tokenize(model_path: str | Path, texts: list[str]) -> list[list[int]]:
    tok = hf_tokenizer(model_path)
    return [tok(t)["input_ids"] for t in texts]
