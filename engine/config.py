"""Model and engine configuration: plain frozen dataclasses, validated when built (torch-free, so
command-line parsing never loads torch).

``ModelConfig`` is read from a Hugging Face ``config.json`` or a GGUF file's metadata (Llama,
Qwen2, Mistral families) and normalised into the few fields the engine needs; anything the engine cannot serve is refused here,
when the config is built, rather than producing wrong tokens later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.protocol.sampling import MAX_LOGPROBS  # noqa: F401  (engine settings name it)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def dtype_from_name(name: str):
    """Map a config/CLI dtype name to torch; unknown names are an error, not a silent default."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {list(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}")
    return name


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, as the engine uses it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # Qwen2 always has a bias on q/k/v; Llama exposes it as attention_bias.
        attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            torch_dtype=str(dtype),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(sliding) if sliding else None,
            raw=dict(cfg),
        )

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> ModelConfig:
        """From a Hugging Face folder's config.json or a GGUF file's metadata."""
        from splitserve.modelfiles.read import read_config

        return cls.from_dict(read_config(model_path))

    def fingerprint(self) -> str:
        """A short hash of the architecture, part of the KV-transfer handshake."""
        blob = json.dumps(self.raw, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class RunnerConfig:
    model_dir: str
    dtype: str | None = None  # default: the checkpoint's torch_dtype
    device: str | None = None  # default: cuda if available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: from kv_cache_memory_gb / GPU memory
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    random_weights: bool = False  # timing runs on shapes whose weights are not here
    cuda_graphs: bool = True  # capture the decode step on CUDA (off: eager, for debugging)
    max_num_seqs: int = 64  # largest decode batch a graph is captured for
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    runner: RunnerConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Queue each decode step before the previous one's tokens reach the host, so the host's
    # work per step hides behind the GPU's (default: on where steps are asynchronous, CUDA;
    # on the CPU a step computes while it is queued, so overlapping would only delay tokens).
    overlap: bool | None = None
