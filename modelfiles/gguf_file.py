"""Read a GGUF file (llama.cpp's single-file format) as the engine reads a Hugging Face folder.

A GGUF holds everything in one file: the architecture as metadata under llama.cpp's key names,
the tokenizer (see ``gguf_tokenizer``), and the weights, mostly block-quantized. This module turns
the metadata into a Hugging Face style ``config.json`` dict (so ``ModelConfig`` validates it the
same way) and yields the weights under Hugging Face names, dequantized by the ``gguf`` package
(llama.cpp's own reader) and with llama.cpp's rotary row order of Q and K undone.

It needs numpy, not torch: the router reads a GGUF's config and tokenizer without loading torch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"

# GGUF architecture -> our model_type. llama.cpp writes Mistral checkpoints as "llama".
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

# Weight types we dequantize: the classic block quantizations, the float formats, and the
# K-quants of the popular *_K_M files; each is the gguf package's own dequantizer, vectorised in
# numpy. Anything else (the IQ* and ternary types) is refused by name.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# general.file_type -> the dtype a model serves in by default: a float file keeps its own
# precision; a quantized one is dequantized to float32, as transformers and llama.cpp compute.
_FILE_DTYPES = {1: "float16", 32: "bfloat16"}


def is_gguf(path: str | Path) -> bool:
    """True for a file that starts with the GGUF magic (its name does not matter)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def _reader(path: str | Path):
    """The file's reader, parsed once per process while the file is unchanged: parsing a
    49k-token vocabulary takes seconds, and a worker reads the config, the weights and the
    tokenizer from the same file."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _open(str(resolved), stat.st_mtime_ns, stat.st_size)


def metadata(path: str | Path, key: str, default: Any = None) -> Any:
    """One metadata value (a scalar, a string or a list), or ``default`` when absent."""
    field = _reader(path).fields.get(key)
    return default if field is None else field.contents()


def _architecture(path: str | Path) -> str:
    arch = metadata(path, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{Path(path).name}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def eos_token_ids(path: str | Path) -> list[int]:
    """End-of-sequence ids: eos, plus end-of-turn and end-of-message where the file names them
    (a Llama 3 chat turn ends with <|eot_id|>, which is not its eos)."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [metadata(path, k) for k in keys]
    return sorted({int(i) for i in ids if i is not None})


ROPE_FACTORS = "rope_freqs.weight"  # not a weight: Llama 3.1's RoPE scaling, one divisor per pair


def _rope_scaling(path: str | Path, arch: str) -> dict[str, Any] | None:
    factors = next((t for t in _reader(path).tensors if t.name == ROPE_FACTORS), None)
    if factors is not None:
        from gguf.quants import dequantize

        values = dequantize(factors.data, factors.tensor_type).reshape(-1)
        return {"rope_type": "freq_factors", "factors": [float(v) for v in values]}
    kind = metadata(path, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(metadata(path, f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"{Path(path).name}: rope scaling {kind!r} is not supported (linear, or rope_freqs)")


def gguf_config(path: str | Path) -> dict[str, Any]:
    """The file's architecture as a Hugging Face ``config.json`` dict."""
    arch = _architecture(path)
    reader = _reader(path)
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")

    def key(name: str, default: Any = None) -> Any:
        value = metadata(path, f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{Path(path).name}: metadata {arch}.{name} is missing")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    return {
        "architectures": ["GGUF"],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(embed.shape[-1]),  # the embedding's rows: the file's true vocabulary
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(path, arch),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": _FILE_DTYPES.get(metadata(path, "general.file_type"), "float32"),
        "bos_token_id": metadata(path, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_token_ids(path),
        "gguf_name": metadata(path, "general.name"),
    }


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; an unknown tensor
    is an error, never skipped (a silently missing layer produces plausible garbage)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and kind == "weight":
        return f"{_GLOBAL_NAMES[base]}.weight"
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a Llama/Qwen2/Mistral model")


def _unpermute_rotary(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. Its converter interleaves each head's two rotary
    halves (rows 0, d/2, 1, d/2+1, ...) for its rotate-adjacent-pairs RoPE; our RoPE, like
    transformers', rotates the halves, so the rows go back to half-split order."""
    half = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(path: str | Path, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, np.ndarray]]:
    """Every weight as (Hugging Face name, float32 array in Hugging Face layout)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    arch = _architecture(path)
    for tensor in _reader(path).tensors:
        if tensor.name == ROPE_FACTORS:  # read into the config's rope_scaling instead
            continue
        name = hf_name(tensor.name)
        kind = GGMLQuantizationType(tensor.tensor_type).name
        if kind not in SUPPORTED_TYPES:
            raise ValueError(
                f"{Path(path).name}: tensor {tensor.name} has type {kind}, which splitserve does "
                f"not dequantize; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if arch != "qwen2":  # llama.cpp runs Qwen2 with NeoX-style RoPE: its rows are not permuted
            if ".q_proj." in name:
                array = _unpermute_rotary(array, num_heads)
            elif ".k_proj." in name:
                array = _unpermute_rotary(array, num_kv_heads)
        yield name, np.require(array, requirements=["C", "W"])  # writable: torch shares it


def tensor_count(path: str | Path) -> int:
    """How many weights ``gguf_tensors`` yields (for a progress bar)."""
    return sum(t.name != ROPE_FACTORS for t in _reader(path).tensors)
