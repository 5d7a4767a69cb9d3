"""Make a small random-weight model in Hugging Face format, entirely locally.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here with the ``tokenizers``
library on a built-in English corpus, and the weights are drawn from a seeded generator. The
result (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a ChatML chat
template, generation_config.json) loads in both splitserve and ``transformers``, which is what the
exactness tests compare. Its output is random text: it is for plumbing, tests and timing.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to in and is it that for on with as was by at be this from or which are have "
    "not but had his they you were her she all there one been their we him would when more what "
    "so if out up into some could them other than then now its only time two may over new these "
    "model serve token prompt decode prefill cache block request latency router worker kernel "
    "cluster pod node memory compute batch stream transfer layer attention query key value head "
    "hello world python code function return class import def print list dict string number "
    "please write tell me about how why where who explain summarise answer question story poem"
).split()


@dataclass(frozen=True)
class DemoModelSpec:
    """Shape of the demo model; defaults give a ~1M-parameter Llama that runs fast on a CPU."""

    model_type: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 160
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    llama3_rope_scaling: bool = False
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"model_type must be llama, qwen2 or mistral, not {self.model_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 bytes + special tokens + merges)")


def _corpus(seed: int, n_sentences: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","]))
    return lines


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE (GPT-2/Llama-3 style) that can encode any text, with a BOS template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _hf_config(spec: DemoModelSpec, vocab_size: int, tok) -> dict:
    head_dim = spec.head_dim or spec.hidden_size // spec.num_heads
    archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    cfg = {
        "architectures": [archs[spec.model_type]],
        "model_type": spec.model_type,
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(IM_END)],
        "pad_token_id": tok.token_to_id(PAD),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "splitserve_demo": asdict(spec),
    }
    if spec.model_type == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if spec.model_type == "mistral":
        cfg["sliding_window"] = None
    if spec.model_type == "qwen2":
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = spec.num_layers
    if spec.llama3_rope_scaling:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(64, spec.max_position_embeddings // 8),
        }
    return cfg


def _random_weights(cfg: dict, seed: int) -> dict:
    """Weights scaled so logits are well spread: greedy argmax is then far from ties, which keeps
    token-exact comparisons between implementations meaningful."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    bias = cfg["model_type"] == "qwen2"

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    w = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        if bias:
            for name, n in (("q", nh), ("k", nkv), ("v", nkv)):
                w[p + f"self_attn.{name}_proj.bias"] = 0.1 * torch.randn(n * hd, generator=g)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter)
        w[p + "input_layernorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
        w[p + "post_attention_layernorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    w["model.norm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = 2.0 * lin(cfg["vocab_size"], h)
    dtype = getattr(torch, cfg["torch_dtype"])
    return {k: v.to(dtype).contiguous() for k, v in w.items()}


def init_demo_model(out_dir: str | Path, spec: DemoModelSpec | None = None) -> Path:
    """Write the demo model into ``out_dir`` (created if needed) and return its path."""
    from safetensors.torch import save_file

    spec = spec or DemoModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size, spec.seed)
    vocab = tok.get_vocab_size()
    padded_vocab = -(-vocab // 64) * 64  # embedding rows padded like real checkpoints do
    cfg = _hf_config(spec, padded_vocab, tok)
    tok.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2)
        + "\n"
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": IM_END,
                "pad_token": PAD,
                "add_bos_token": True,
                "model_max_length": spec.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    save_file(_random_weights(cfg, spec.seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
