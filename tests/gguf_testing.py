"""Write a demo model (a Hugging Face folder) as a GGUF file, the way llama.cpp's converter does:
llama.cpp tensor names, Q/K rows permuted for its RoPE (not for Qwen2), Llama 3 RoPE scaling as a
rope_freqs tensor, norms in F32, the other
weights in the chosen type, the byte-level BPE vocabulary, merges, token types and chat
template as metadata. Lets the GGUF tests cover every weight type and architecture in
milliseconds, without a downloaded file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from splitserve.modelfiles.gguf_file import _GLOBAL_NAMES, _LAYER_NAMES

_TO_GGUF = {f"{hf}.": f"{g}." for g, hf in _GLOBAL_NAMES.items()}
_LAYER_TO_GGUF = {f".{hf}.": f".{g}." for g, hf in _LAYER_NAMES.items()}


def gguf_name(hf: str) -> str:
    for src, dst in _TO_GGUF.items():
        if hf.startswith(src):
            return dst + hf[len(src):]
    name = hf.replace("model.layers.", "blk.")
    for src, dst in _LAYER_TO_GGUF.items():
        name = name.replace(src, dst)
    return name


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (the inverse of what the loader undoes)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, kind: str):
    import gguf

    if kind == "I8":  # a type the loader must refuse
        return np.round(w * 10).astype(np.int8), None
    qtype = gguf.GGMLQuantizationType[kind]
    data = gguf.quants.quantize(w.astype(np.float32), qtype)
    return data, (None if kind in ("F32", "F16") else qtype)


def write_gguf(model_dir: Path, out: Path, weight_type: str = "F32") -> Path:
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = "qwen2" if cfg["model_type"] == "qwen2" else "llama"  # llama.cpp writes Mistral as llama
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(model_dir.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    _write_tokenizer(w, model_dir)
    if cfg.get("rope_scaling"):  # Llama 3.1: the converter stores the scaling as per-pair factors
        from splitserve.engine.rope import inverse_frequencies

        plain = inverse_frequencies(cfg["head_dim"], cfg["rope_theta"], None)
        scaled = inverse_frequencies(cfg["head_dim"], cfg["rope_theta"], cfg["rope_scaling"])
        w.add_tensor("rope_freqs.weight", (plain / scaled).numpy())
    for name, array in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        if arch == "llama" and ".q_proj." in name:
            array = _permute(array, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = _permute(array, cfg["num_key_value_heads"])
        data, raw = _encode(array, weight_type if array.ndim == 2 else "F32")
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _write_tokenizer(w, model_dir: Path) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(ids[tcfg["bos_token"]])
    w.add_eos_token_id(ids[tcfg["eos_token"]])
    w.add_pad_token_id(ids[tcfg["pad_token"]])
    w.add_add_bos_token(bool(tcfg.get("add_bos_token")))
    w.add_chat_template(tcfg["chat_template"])


SPM_PIECES = ["▁", "t", "h", "e", "a", "n", "d", "i", "o", "w", "r", "l", "s", "▁t", "he", "▁the", "in",
              "▁a", "an", "▁an", "nd", "▁and", "▁th", "▁thin", "th", "or", "ld", "▁w", "▁wor", "▁world"]


def write_sentencepiece_gguf(out: Path) -> Path:
    """A llama.cpp SentencePiece vocabulary (Llama 2 / Mistral style: scores instead of merges,
    byte-fallback tokens, BOS added), with just enough model metadata for transformers to read
    the file; no weights."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [2, 3, 3, *[6] * 256, *[1] * len(SPM_PIECES)]  # unknown, control, byte, normal
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("spm-test")
    for add, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2)):
        getattr(w, f"add_{add}")(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
