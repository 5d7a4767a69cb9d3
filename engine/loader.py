"""Load a Llama/Qwen2/Mistral checkpoint: a Hugging Face folder or a GGUF file.

Reads single-file or sharded safetensors (with ``model.safetensors.index.json``) in bf16, fp16 or
fp32, or a GGUF file's weights dequantized (``gguf_file``); packs q/k/v and gate/up into the fused
projections, and refuses a checkpoint that leaves any parameter unset: a silently random layer
would produce plausible garbage.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from splitserve.engine.config import ModelConfig
from splitserve.engine.model import CausalLM
from splitserve.engine.rope import cos_sin_table
from splitserve.modelfiles.gguf_file import gguf_tensors, is_gguf, tensor_count

log = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def _target(cfg: ModelConfig, name: str) -> tuple[str, slice | None]:
    """Map a checkpoint tensor name to (our parameter name, rows it fills or None for all)."""
    name = name.removeprefix("model.")
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    packed = {
        "self_attn.q_proj.": ("self_attn.qkv_proj.", slice(0, q)),
        "self_attn.k_proj.": ("self_attn.qkv_proj.", slice(q, q + kv)),
        "self_attn.v_proj.": ("self_attn.qkv_proj.", slice(q + kv, q + 2 * kv)),
        "mlp.gate_proj.": ("mlp.gate_up_proj.", slice(0, inter)),
        "mlp.up_proj.": ("mlp.gate_up_proj.", slice(inter, 2 * inter)),
    }
    for src, (dst, rows) in packed.items():
        if src in name:
            return name.replace(src, dst), rows
    return name, None


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Allocate the model's parameters (uninitialised) in ``dtype`` on ``device``; RoPE tables
    stay float32."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    cos, sin = cos_sin_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.eval()


def _progress(items: Iterable, description: str, total: int):
    from rich.progress import track

    return track(items, description=description, total=total, disable=not sys.stderr.isatty(), transient=True)


def _safetensors(model_dir: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = list(f.keys())
            for key in _progress(keys, f"loading {path.name}", len(keys)):
                yield key, f.get_tensor(key)


def _gguf(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    tensors = gguf_tensors(path, cfg.num_heads, cfg.num_kv_heads)
    for key, array in _progress(tensors, f"loading {path.name}", tensor_count(path)):
        yield key, torch.from_numpy(array)


def load_model(
    model_path: str | Path, dtype: torch.dtype, device: torch.device, cfg: ModelConfig | None = None
) -> CausalLM:
    """The model with every parameter filled from ``model_path`` (a folder or a GGUF file)."""
    model_path = Path(model_path)
    cfg = cfg or ModelConfig.from_pretrained(model_path)
    model = empty_model(cfg, dtype, device)
    tensors = _gguf(model_path, cfg) if is_gguf(model_path) else _safetensors(model_path, device)
    _fill(model, cfg, tensors, model_path.name)
    log.info("loaded %s (%s, %d layers) on %s in %s", model_path.name, cfg.model_type, cfg.num_layers, device, dtype)
    return model


def _fill(model: CausalLM, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    params = dict(model.named_parameters())
    unfilled = {name: p.shape[0] for name, p in params.items()}
    for key, tensor in tensors:
        name, rows = _target(cfg, key)
        if name not in params:
            if "rotary_emb" in key or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            raise ValueError(f"{source}: unexpected tensor {key!r} for {cfg.model_type}")
        dest = params[name].data if rows is None else params[name].data[rows]
        if tensor.shape != dest.shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        unfilled[name] -= dest.shape[0]
    missing = [n for n, left in unfilled.items() if left and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise ValueError(f"checkpoint {source} lacks weights for: {', '.join(missing[:8])}")


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> CausalLM:
    """Random weights of the right shape: for timing on shapes whose checkpoints are not here."""
    model = empty_model(cfg, dtype, device)
    g = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02, generator=g)
    return model
