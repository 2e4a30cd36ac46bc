"""CLIP text encoders: SD1 (ViT-L), SD2 (OpenCLIP-H), SDXL's two (ViT-L, and bigG with a projection).

One module covers them all; the config says which activation, how big, and whether there is a
`text_projection` (transformers' `CLIPTextModelWithProjection`, SDXL's second encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.ops.activations import gelu, quick_gelu
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.layers import Linear
from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer
from mlx_sd_server.engine.text.embedding import TokenEmbedding
from mlx_sd_server.engine.text.mapping import map_clip_weight

ACTIVATIONS = {
    "quick_gelu": quick_gelu,  # OpenAI CLIP (SD1, SDXL's first encoder)
    "gelu": gelu,  # OpenCLIP (SD2, SDXL's second encoder): the exact, erf-based GELU
}

# Configs whose eos_token_id is 2 predate transformers' fix (PR #24773); their pooled token is the one
# with the highest id, which is the end token in CLIP's vocabulary.
LEGACY_EOS_TOKEN_ID = 2


@dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields we use; defaults are transformers' own."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    with_projection: bool = False  # from config.json's "architectures"

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        values["with_projection"] = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
        return cls(**values)


class CLIPOutput(NamedTuple):
    last_hidden_state: mx.array  # (B, L, D): final layer, after the final layer norm
    hidden_states: tuple[mx.array, ...]  # embeddings, then every layer's output (no final norm), as transformers
    pooled_output: mx.array  # (B, D): last_hidden_state at the end token
    text_embeds: mx.array | None  # (B, projection_dim): text_projection(pooled_output), with a projection only


class CLIPAttention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = Linear(dims, dims)
        self.k_proj = Linear(dims, dims)
        self.v_proj = Linear(dims, dims)
        self.out_proj = Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dims = x.shape

        def heads(t: mx.array) -> mx.array:  # (B, L, D) -> (B, heads, L, D / heads)
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = attention(q, k, v, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dims))


class CLIPMLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, activation: str):
        super().__init__()
        self.fc1 = Linear(dims, hidden_dims)
        self.fc2 = Linear(hidden_dims, dims)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        dims = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(dims, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(dims, config.intermediate_size, config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """Parameter names are transformers' without the `text_model.`, `embeddings.` and `encoder.` levels."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP activation {config.hidden_act!r}")
        self.config = config
        self.token_embedding = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.with_projection:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def token_rows(self) -> int:
        """The token ids this encoder embeds: 0 to token_rows - 1."""
        return self.token_embedding.rows

    def __call__(self, input_ids: mx.array) -> CLIPOutput:
        """input_ids: (B, L) integer ids below `token_rows` (else ValueError), L <= max_position_embeddings.
        No padding mask: SD attends to padding tokens too (causally), as the diffusers pipelines do."""
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:length]
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        last_hidden_state = self.final_layer_norm(x)

        end_positions = self.end_token_positions(input_ids)
        pooled_output = last_hidden_state[mx.arange(input_ids.shape[0]), end_positions]
        text_embeds = self.text_projection(pooled_output) if self.config.with_projection else None
        return CLIPOutput(last_hidden_state, tuple(hidden_states), pooled_output, text_embeds)

    def end_token_positions(self, input_ids: mx.array) -> mx.array:
        """(B,) index of the first end token (the first highest id for legacy configs), as transformers picks
        the pooled token; 0 for a sequence without one."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            is_end = input_ids == input_ids.max(axis=1, keepdims=True)
        else:
            is_end = input_ids == self.config.eos_token_id
        length = input_ids.shape[1]
        # The smallest matching position, computed explicitly rather than trusting argmax's tie-breaking;
        # no match gives `length`, which wraps to 0.
        first = mx.where(is_end, mx.arange(length), length).min(axis=1)
        return first % length


CLIP_TEXT = ComponentKind(
    ("CLIPTextModel", "CLIPTextModelWithProjection"), CLIPTextConfig, CLIPTextModel, map_clip_weight, CLIPTokenizer
)
