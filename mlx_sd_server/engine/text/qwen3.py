"""Qwen3 as a text encoder: transformers' `Qwen3Model` (Z-Image's and FLUX.2 klein's text encoder).

A decoder stack run once over the whole prompt: token embedding, pre-norm decoder layers (grouped-query
attention with RMS-normed q and k per head, rotary positions, causal attention restricted to the prompt's
tokens by the padding mask; a SiLU-gated MLP), a final RMS norm. Parameter names are `Qwen3Model`'s;
a `Qwen3ForCausalLM` checkpoint maps onto them (`map_qwen3_weight`).

The output is `output_hidden_states=True`'s `hidden_states`: the embeddings, then each layer's output, the
last one after the final norm. Pipelines take an inner one (Z-Image the second to last; FLUX.2 klein
layers 9, 18 and 27, stacked), so `depth` stops the stack early.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.attention import attention, causal_mask
from mlx_sd_server.engine.ops.layers import Linear
from mlx_sd_server.engine.text.embedding import TokenEmbedding
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer


@dataclass(frozen=True)
class Qwen3Config:
    """transformers' Qwen3Config fields the encoder uses; defaults are Qwen3-4B's (the text encoder of
    Z-Image and FLUX.2 klein 4B; klein 9B's Qwen3-8B has hidden_size 4096, intermediate_size 12288)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_type: str = "default"  # rope_scaling's (or rope_parameters') type; only plain RoPE is built
    attention_bias: bool = False
    use_sliding_window: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen3Config:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
            values["num_key_value_heads"] = d["num_attention_heads"]  # transformers' default: no grouping
        # Released files (transformers 4) say `rope_theta` and `rope_scaling`; transformers 5 writes both into
        # `rope_parameters`.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_theta") is not None:
            values["rope_theta"] = rope["rope_theta"]
        values["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        return cls(**values)


def rope_frequencies(head_dim: int, theta: float) -> mx.array:
    """transformers' default RoPE inverse frequencies theta^(-2i/head_dim), i < head_dim/2, float32."""
    return 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin (length, head_dim), float32, for positions 0..length-1: transformers' default RoPE (each
    frequency twice, for the two halves that `rotate_half` pairs)."""
    angles = mx.arange(length, dtype=mx.float32)[:, None] * rope_frequencies(head_dim, theta)[None, :]
    angles = mx.concatenate([angles, angles], axis=-1)
    return mx.cos(angles), mx.sin(angles)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x * cos + rotate_half(x) * sin on (B, heads, L, head_dim), in x's dtype as transformers computes it.
    (Channel i pairs with i + head_dim/2, unlike the DiTs' interleaved pairs in engine/blocks.)"""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


class Qwen3RMSNorm(nn.Module):
    """RMS norm over the last axis (no mean subtraction, no bias), accumulated in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"Qwen3: {config.num_attention_heads} attention heads do not group over "
                f"{config.num_key_value_heads} key/value heads"
            )
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        inner, kv_inner = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        self.q_proj = Linear(config.hidden_size, inner, bias=config.attention_bias)
        self.k_proj = Linear(config.hidden_size, kv_inner, bias=config.attention_bias)
        self.v_proj = Linear(config.hidden_size, kv_inner, bias=config.attention_bias)
        self.o_proj = Linear(inner, config.hidden_size, bias=config.attention_bias)
        self.q_norm = Qwen3RMSNorm(config.head_dim, config.rms_norm_eps)  # per head, before RoPE
        self.k_norm = Qwen3RMSNorm(config.head_dim, config.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str) -> mx.array:
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:  # (B, L, n * head_dim) -> (B, L, n, head_dim)
            return t.reshape(batch, length, -1, self.head_dim)

        q = apply_rope(self.q_norm(heads(self.q_proj(x))).transpose(0, 2, 1, 3), cos, sin)
        k = apply_rope(self.k_norm(heads(self.k_proj(x))).transpose(0, 2, 1, 3), cos, sin)
        v = heads(self.v_proj(x)).transpose(0, 2, 1, 3)
        if self.groups > 1:  # query head h reads key/value head h // groups (transformers' repeat_kv)
            k, v = mx.repeat(k, self.groups, axis=1), mx.repeat(v, self.groups, axis=1)
        out = attention(q, k, v, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class Qwen3MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases: also Qwen2.5-VL's language model MLP (text/qwen25vl.py)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(config)
        self.mlp = Qwen3MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        # What released Qwen3 text encoders use; other settings would silently change their states.
        if config.rope_type != "default":
            raise ValueError(f"Qwen3: rope type {config.rope_type!r} is not supported (plain RoPE only)")
        if config.hidden_act != "silu":
            raise ValueError(f"Qwen3: activation {config.hidden_act!r} is not supported (silu only)")
        if config.use_sliding_window:
            raise ValueError("Qwen3: sliding-window attention is not supported")
        self.config = config
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.layers = [Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def token_rows(self) -> int:
        """The token ids this encoder embeds: 0 to token_rows - 1."""
        return self.embed_tokens.rows

    def __call__(
        self, input_ids: mx.array, attention_mask: mx.array | None = None, depth: int | None = None
    ) -> list[mx.array]:
        """input_ids: (B, L) ids below `token_rows` (else ValueError); attention_mask: (B, L), 1 for the prompt's
        tokens and 0 for padding (after them: the tokenizer pads on the right), None for no padding.

        Returns transformers' `Qwen3Model(input_ids, attention_mask, output_hidden_states=True).hidden_states`:
        `depth + 1` states (B, L, hidden_size), the embeddings then the outputs of the first `depth` layers
        (default: all, the last one then after the final norm). Padding positions are computed too (they
        attend to the prompt's tokens), as transformers computes them.
        """
        count = len(self.layers)
        depth = count if depth is None else depth
        if not 0 <= depth <= count:
            raise ValueError(f"Qwen3: depth {depth} outside 0..{count}")
        length = input_ids.shape[1]
        cos, sin = rope_tables(length, self.config.head_dim, self.config.rope_theta)
        mask: mx.array | str = "causal"
        if attention_mask is not None:  # causal, and no query sees a padding key
            mask = causal_mask(length, length)[None, None] & attention_mask.astype(mx.bool_)[:, None, None, :]
        x = self.embed_tokens(input_ids)
        states = [x]
        for layer in self.layers[:depth]:
            x = layer(x, cos, sin, mask)
            states.append(x)
        if depth == count:
            states[-1] = self.norm(x)
        return states


def map_qwen3_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One transformers (key, value) as ours: `Qwen3Model`'s names. A `Qwen3ForCausalLM` nests them under
    `model.` and adds an LM head (tied to the embedding in Qwen3-4B), which an encoder does not use."""
    if key.startswith("lm_head."):
        return []
    return [(key.removeprefix("model."), value)]


# Released in bfloat16; its residual stream carries very large outlier activations, which float16 is not
# assumed to hold: bfloat16 when float16 is asked for (a precaution, as for T5).
QWEN3_ENCODER = ComponentKind(
    ("Qwen3Model", "Qwen3ForCausalLM"),
    Qwen3Config,
    Qwen3Model,
    map_qwen3_weight,
    Qwen3Tokenizer,
    instead_of_float16=mx.bfloat16,
)
