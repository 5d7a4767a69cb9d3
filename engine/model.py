"""Llama-family decoder (Llama 2/3, Qwen2, Mistral) over the paged KV cache.

RMSNorm, RoPE (with Llama 3 scaling), grouped-query attention, SwiGLU; tied embeddings and
Qwen2's q/k/v bias. q/k/v and gate/up are fused into single projections (the loader packs the
checkpoint's separate tensors), which is fewer, larger matmuls on every backend. All attention and
elementwise work goes through ``splitserve.kernels`` so Triton kernels replace the torch
references without changes here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from splitserve.engine.config import ModelConfig
from splitserve.engine.rope import cos_sin_table
from splitserve.kernels import attention as attn_ops
from splitserve.kernels import ops
from torch import nn


@dataclass
class AttentionMetadata:
    """Where this batch's tokens live in the paged cache.

    ``slot_mapping`` (N,) flat cache slot of each new token; ``block_tables`` (B, max_blocks);
    ``context_lens`` (B,) tokens in context after this step; ``cu_seqlens_q`` (B+1,) offsets of each
    sequence's new tokens (prefill only); ``last_token_index`` (B,) row of each sequence's last token.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    last_token_index: torch.Tensor
    layer_hook: Callable[[int], None] | None = None  # called after each layer has written its KV


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, residual stream); fuses the residual add when one is given."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        layer_cache = kv_cache[self.layer_index]
        q, k = ops.rope_and_write_kv(q, k, v, cos, sin, layer_cache, meta.slot_mapping)
        if meta.layer_hook is not None:
            meta.layer_hook(self.layer_index)
        if meta.is_prefill:
            out = attn_ops.prefill_attention(
                q, layer_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, self.scale,
                k=k, v=v,
            )
        else:
            out = attn_ops.decode_attention(
                q, layer_cache, meta.block_tables, meta.context_lens, self.scale
            )
        return ops.linear(out.reshape(-1, self.q_size), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = ops.linear(x, self.gate_up_proj.weight)
        return ops.linear(ops.silu_and_mul(gate_up), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_index)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    """The decoder stack plus LM head; ``forward`` returns hidden states of every new token,
    ``logits`` maps the selected ones to vocabulary scores."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = cos_sin_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.linear(hidden, self.lm_head.weight).float()
