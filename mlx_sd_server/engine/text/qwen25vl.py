"""Qwen2.5-VL's language model as a text encoder: transformers' `Qwen2_5_VLTextModel` (Qwen-Image's).

A decoder stack run once over the whole prompt: token embedding, pre-norm decoder layers (grouped-query
attention with biased q, k and v projections, multimodal rotary positions, causal attention restricted to the
prompt's tokens by the padding mask; a SiLU-gated MLP), a final RMS norm. Parameter names are transformers';
`map_qwen25vl_weight` reads a `Qwen2_5_VLForConditionalGeneration` checkpoint in either key layout.

Multimodal RoPE (mRoPE): each token has three positions, temporal, height and width (`position_ids` (3, B, L));
the head's rotary frequencies are cut into `mrope_section` runs (Qwen2.5-VL-7B: 16, 24, 24 of its 64) and run
i takes its angles from axis i % 3. Text tokens have the same position on all three axes: plain RoPE. Image
tokens (put into the embedded sequence by the caller: `embed`, then `inputs_embeds`) have a grid's.

The output is the last hidden state after the final norm: what Qwen-Image's pipelines read as
`output_hidden_states=True`'s `hidden_states[-1]` (transformers ties it to `last_hidden_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import accumulate
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.ops.attention import attention, causal_mask
from mlx_sd_server.engine.ops.layers import Linear
from mlx_sd_server.engine.text.embedding import TokenEmbedding
from mlx_sd_server.engine.text.qwen3 import Qwen3MLP, Qwen3RMSNorm, apply_rope, rope_frequencies
from mlx_sd_server.engine.text.qwen25vl_vision import (
    Qwen25VLVisionConfig,
    Qwen25VLVisionModel,
    map_qwen25vl_vision_weight,
)
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer

# The vision tower's weights keep this prefix through `map_qwen25vl_weight`: they load into a module at
# `visual` beside the language model (a text-only load leaves them out).
VISUAL_PREFIX = "visual."


@dataclass(frozen=True)
class Qwen25VLConfig:
    """transformers' Qwen2_5_VLTextConfig fields the language model uses, and the token ids that frame an image
    in the prompt; defaults are Qwen2.5-VL-7B-Instruct's (Qwen-Image's text encoder)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_type: str = "default"  # only plain RoPE is built ("mrope", the older files' name for it, reads as it)
    mrope_section: tuple[int, ...] = (16, 24, 24)  # temporal, height, width runs of the head_dim/2 frequencies
    use_sliding_window: bool = False
    image_token_id: int = 151655  # <|image_pad|>: one per merged image patch
    vision_start_token_id: int = 151652  # <|vision_start|>
    vision_end_token_id: int = 151653  # <|vision_end|>

    @property
    def head_dim(self) -> int:
        """hidden_size / num_attention_heads: Qwen2.5-VL's text config has no head_dim of its own."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen25VLConfig:
        """A Qwen2.5-VL config.json: transformers 5 nests the language model's settings under `text_config`,
        older files (Qwen-Image's) have them at the top level (some both); `text_config` wins."""
        merged = {**d, **(d.get("text_config") or {})}
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in merged.items() if k in known and v is not None}
        if merged.get("num_key_value_heads") is None and "num_attention_heads" in merged:
            values["num_key_value_heads"] = merged["num_attention_heads"]  # transformers' default: no grouping
        # Older files: `rope_theta` and `rope_scaling` ({"type": "mrope" or "default", "mrope_section": ...});
        # transformers 5: `rope_parameters`.
        rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}
        if rope.get("rope_theta") is not None:
            values["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        values["rope_type"] = "default" if rope_type == "mrope" else rope_type
        if rope.get("mrope_section") is not None:
            values["mrope_section"] = tuple(rope["mrope_section"])
        return cls(**values)


def mrope_tables(
    position_ids: mx.array, head_dim: int, theta: float, mrope_section: tuple[int, ...]
) -> tuple[mx.array, mx.array]:
    """cos and sin (B, L, head_dim), float32, for `position_ids` (3, B, L): frequency run i (of `mrope_section`)
    at axis i % 3's positions, each frequency twice for the halves `rotate_half` pairs, as transformers'
    `Qwen2_5_VLRotaryEmbedding` (and the older `apply_multimodal_rotary_pos_emb`)."""
    angles = position_ids.astype(mx.float32)[..., None] * rope_frequencies(head_dim, theta)  # (3, B, L, D/2)
    runs = mx.split(angles, list(accumulate(mrope_section))[:-1], axis=-1)
    angles = mx.concatenate([run[i % 3] for i, run in enumerate(runs)], axis=-1)
    angles = mx.concatenate([angles, angles], axis=-1)
    return mx.cos(angles), mx.sin(angles)


class Qwen25VLAttention(nn.Module):
    def __init__(self, config: Qwen25VLConfig):
        super().__init__()
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        inner, kv_inner = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        self.q_proj = Linear(config.hidden_size, inner, bias=True)
        self.k_proj = Linear(config.hidden_size, kv_inner, bias=True)
        self.v_proj = Linear(config.hidden_size, kv_inner, bias=True)
        self.o_proj = Linear(inner, config.hidden_size, bias=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str) -> mx.array:
        """cos, sin: (B, 1, L, head_dim), broadcast over the heads."""
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:  # (B, L, n * head_dim) -> (B, n, L, head_dim)
            return t.reshape(batch, length, -1, self.head_dim).transpose(0, 2, 1, 3)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if self.groups > 1:  # query head h reads key/value head h // groups (transformers' repeat_kv)
            k, v = mx.repeat(k, self.groups, axis=1), mx.repeat(v, self.groups, axis=1)
        out = attention(q, k, v, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class Qwen25VLDecoderLayer(nn.Module):
    def __init__(self, config: Qwen25VLConfig):
        super().__init__()
        self.self_attn = Qwen25VLAttention(config)
        self.mlp = Qwen3MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen25VLTextModel(nn.Module):
    """transformers' `Qwen2_5_VLTextModel`: embed_tokens, layers, norm (parameter names kept)."""

    def __init__(self, config: Qwen25VLConfig):
        super().__init__()
        # What released Qwen2.5-VL checkpoints use; other settings would silently change their states.
        if config.rope_type != "default":
            raise ValueError(f"Qwen2.5-VL: rope type {config.rope_type!r} is not supported (plain mRoPE only)")
        if config.hidden_act != "silu":
            raise ValueError(f"Qwen2.5-VL: activation {config.hidden_act!r} is not supported (silu only)")
        if config.use_sliding_window:
            raise ValueError("Qwen2.5-VL: sliding-window attention is not supported")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"Qwen2.5-VL: hidden size {config.hidden_size} does not split over {config.num_attention_heads} heads"
            )
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"Qwen2.5-VL: {config.num_attention_heads} attention heads do not group over "
                f"{config.num_key_value_heads} key/value heads"
            )
        if sum(config.mrope_section) != config.head_dim // 2:
            raise ValueError(
                f"Qwen2.5-VL: mrope_section {list(config.mrope_section)} does not sum to head_dim / 2 "
                f"({config.head_dim // 2})"
            )
        self.config = config
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.layers = [Qwen25VLDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def token_rows(self) -> int:
        """The token ids this encoder embeds: 0 to token_rows - 1."""
        return self.embed_tokens.rows

    def embed(self, input_ids: mx.array) -> mx.array:
        """(B, L) ids -> (B, L, hidden_size) embeddings, in which a caller puts the image features (at the
        `image_token_id` positions) before passing them as `inputs_embeds`."""
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        input_ids: mx.array | None = None,
        inputs_embeds: mx.array | None = None,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        """The last hidden state (B, L, hidden_size), after the final norm, of exactly one of `input_ids`
        (B, L) (ids below `token_rows`, else ValueError) or `inputs_embeds` (B, L, hidden_size).

        attention_mask: (B, L), 1 for the prompt's tokens then 0 for padding (on the right, at least one token
        per row, else ValueError: a query with no key to attend to would give NaN, which the next layer would
        spread), None for no padding; padding positions are computed too (they attend to the prompt's tokens),
        as transformers computes them.
        position_ids: (3, B, L) temporal, height and width positions, or (B, L) for all three; None: 0..L-1 on
        every axis whatever the mask, as transformers 5 gives a text-only prompt (the same positions for the
        prompt's tokens as a mask-aware count when the padding is on the right, as Qwen-Image's tokenizer pads).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen2.5-VL: give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds
        assert x is not None  # (for mypy: one of the two is set)
        batch, length, _ = x.shape
        if position_ids is None:
            position_ids = mx.broadcast_to(mx.arange(length), (3, batch, length))
        elif position_ids.ndim == 2:
            position_ids = mx.broadcast_to(position_ids[None], (3, *position_ids.shape))
        if tuple(position_ids.shape) != (3, batch, length):
            raise ValueError(
                f"Qwen2.5-VL: position_ids of shape {tuple(position_ids.shape)}, expected (3, {batch}, {length}) "
                f"or ({batch}, {length})"
            )
        cos, sin = mrope_tables(position_ids, self.config.head_dim, self.config.rope_theta, self.config.mrope_section)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over the heads
        mask: mx.array | str = "causal"
        if attention_mask is not None:  # causal, and no query sees a padding key
            check_right_padding(attention_mask)
            mask = causal_mask(length, length)[None, None] & attention_mask.astype(mx.bool_)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


def check_right_padding(attention_mask: mx.array) -> None:
    """ValueError unless each row of the (B, L) mask is ones then zeros, with at least one one."""
    rows = np.array(attention_mask.astype(mx.int32)) != 0
    if rows.ndim != 2 or not (rows[:, 0].all() and (rows[:, :-1] >= rows[:, 1:]).all()):
        raise ValueError("Qwen2.5-VL: attention_mask must be (B, L) with each row's tokens first and padding after")


# Checkpoint prefixes, most specific first: transformers 5 (`model.language_model.`, `model.visual.`), the older
# layout Qwen-Image ships (`model.`, `visual.`), and a bare `Qwen2_5_VLModel`'s (`language_model.`, `visual.`).
WEIGHT_PREFIXES = (
    ("model.visual.", VISUAL_PREFIX),
    ("model.language_model.", ""),
    ("model.", ""),
    ("language_model.", ""),
)


def map_qwen25vl_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One `Qwen2_5_VLForConditionalGeneration` (key, value) as ours, from either key layout: the language
    model's as `Qwen25VLTextModel`'s names, the vision tower's under `visual.` with the rest of the key
    untouched (the vision tower maps those), the LM head (unused by an encoder) dropped."""
    if key.startswith("lm_head."):
        return []
    for prefix, ours in WEIGHT_PREFIXES:
        if key.startswith(prefix):
            return [(ours + key.removeprefix(prefix), value)]
    return [(key, value)]


# --- as a model folder's text encoder ----------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen25VLEncoderConfig:
    """A Qwen2_5_VLForConditionalGeneration config.json: the language model's settings, and the vision tower's
    when it has a `vision_config` (a llama.cpp file's text model alone has none)."""

    text: Qwen25VLConfig
    vision: Qwen25VLVisionConfig | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen25VLEncoderConfig:
        vision = d.get("vision_config")
        return cls(Qwen25VLConfig.from_dict(d), Qwen25VLVisionConfig.from_dict(vision) if vision else None)


class Qwen25VLEncoder(Qwen25VLTextModel):
    """Qwen-Image's text encoder: the language model (this class's parameters, transformers' names) and, under
    `visual`, the vision tower that the edit models read their input images with."""

    def __init__(self, config: Qwen25VLEncoderConfig):
        super().__init__(config.text)
        if config.vision is not None:
            self.visual = Qwen25VLVisionModel(config.vision)


def map_qwen25vl_encoder_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One Qwen2_5_VLForConditionalGeneration (key, value) as `Qwen25VLEncoder`'s: the language model's by
    `map_qwen25vl_weight`, the vision tower's by `map_qwen25vl_vision_weight` under `visual.`."""
    mapped = []
    for name, tensor in map_qwen25vl_weight(key, value):
        if name.startswith(VISUAL_PREFIX):
            mapped += [(VISUAL_PREFIX + k, v) for k, v in map_qwen25vl_vision_weight(name, tensor)]
        else:
            mapped.append((name, tensor))
    return mapped


# Released in bfloat16, with Qwen3's large residual outliers: bfloat16 when float16 is asked for, as Qwen3.
QWEN25VL_ENCODER = ComponentKind(
    ("Qwen2_5_VLForConditionalGeneration",),
    Qwen25VLEncoderConfig,
    Qwen25VLEncoder,
    map_qwen25vl_encoder_weight,
    Qwen3Tokenizer,
    instead_of_float16=mx.bfloat16,
)
