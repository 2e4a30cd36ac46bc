"""T5 text encoder: T5 v1.1 (FLUX's T5-XXL, gated-GELU feed-forward) and the original T5 (ReLU).

Parameter names are transformers' `T5EncoderModel` state-dict names, less the tied duplicate
`encoder.embed_tokens.weight` (we embed with `shared`). The output is transformers'
`T5EncoderModel(input_ids).last_hidden_state` without an attention mask, as FLUX calls it.

Precision: prefer bfloat16 or float32 weights; T5-XXL's activations overflow float16. With float16 weights
we do what transformers does for a float16 T5: RMS norms in float32, the feed-forward's `wo` in float32
(its `_keep_in_fp32_modules`), which makes the residual stream float32 from the first feed-forward on,
and float16 hidden states clamped to float16's range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.ops.activations import gelu, gelu_approx, silu
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.layers import Linear
from mlx_sd_server.engine.text.embedding import TokenEmbedding
from mlx_sd_server.engine.text.mapping import map_t5_weight
from mlx_sd_server.engine.text.t5_tokenizer import T5Tokenizer

ACTIVATIONS = {"relu": nn.relu, "gelu_new": gelu_approx, "gelu": gelu, "silu": silu}  # gelu_new: tanh form
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class T5Config:
    """transformers' T5Config fields the encoder uses; defaults are transformers' own."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "gated-gelu" for T5 v1.1

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # As transformers: "gated-gelu" means the tanh approximation, a plain "gelu" the exact one.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


@lru_cache(maxsize=16)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(L, L) bucket of key j relative to query i, bidirectional (the encoder's): half the buckets for keys
    before the query, half after; in each, exact distances up to a quarter of `num_buckets`, then log bins
    up to `max_distance`, past which all share the last. In float32 and transformers' order of operations:
    distances on exact bin boundaries (16, 32, 64 for T5's 32 buckets up to 128) round as in torch."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    distance = np.abs(relative)
    scaled = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return ((relative > 0) * half + np.where(distance < max_exact, distance, large)).astype(np.int32)


def clamp_float16(x: mx.array) -> mx.array:
    """transformers' float16 guard: infinities become +-(max - 1000); other dtypes pass through."""
    if x.dtype != mx.float16:
        return x
    limit = mx.where(mx.isinf(x).any(), FLOAT16_MAX - 1000, FLOAT16_MAX).astype(x.dtype)
    return mx.clip(x, -limit, limit)


class T5LayerNorm(nn.Module):
    """RMS norm (no mean subtraction, no bias), computed in float32, then cast to a half weight's dtype."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(mx.float32)
        x = x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + self.eps)
        if self.weight.dtype in (mx.float16, mx.bfloat16):
            x = x.astype(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.config = config
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, length: int) -> mx.array:
        """(1, heads, L, L) additive score bias; the first layer's, shared by all layers."""
        c = self.config
        buckets = relative_position_buckets(length, c.relative_attention_num_buckets, c.relative_attention_max_distance)
        return self.relative_attention_bias(mx.array(buckets)).transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:  # (B, L, heads * d_kv) -> (B, heads, L, d_kv)
            return t.reshape(batch, length, self.config.num_heads, -1).transpose(0, 2, 1, 3)

        # T5 does not scale its scores (its trained q weights carry the scale); `attention` divides them by
        # sqrt(d_kv), so q is multiplied by it first (exactly: 8 for T5's d_kv of 64).
        q = heads(self.q(x)) * math.sqrt(self.config.d_kv)
        out = attention(q, heads(self.k(x)), heads(self.v(x)), mask=position_bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class T5DenseReluDense(nn.Module):
    """wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) for a gated feed_forward_proj ("gated-gelu")."""

    def __init__(self, config: T5Config):
        super().__init__()
        if config.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported T5 feed_forward_proj {config.feed_forward_proj!r}")
        self.activation = ACTIVATIONS[config.dense_act_fn]
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.activation(self.wi_0(x)) * self.wi_1(x) if self.gated else self.activation(self.wi(x))
        if h.dtype == mx.float16:  # wo's output overflows float16 in T5-XXL: float32, as transformers
            h = h.astype(mx.float32)
        return self.wo(h)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Pre-norm self-attention then feed-forward (transformers' `layer.0` and `layer.1`)."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        x = clamp_float16(self.layer[0](x, position_bias))
        return clamp_float16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = [T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        position_bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, position_bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = TokenEmbedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @property
    def token_rows(self) -> int:
        """The token ids this encoder embeds: 0 to token_rows - 1."""
        return self.shared.rows

    def __call__(self, input_ids: mx.array) -> mx.array:
        """input_ids: (B, L) integer ids below `token_rows` (else ValueError) -> (B, L, d_model) last hidden
        state (after the final norm)."""
        return self.encoder(self.shared(input_ids))


# T5 overflows in float16: it runs in bfloat16 when float16 is asked for.
T5_ENCODER = ComponentKind(
    ("T5EncoderModel",), T5Config, T5EncoderModel, map_t5_weight, T5Tokenizer, instead_of_float16=mx.bfloat16
)
