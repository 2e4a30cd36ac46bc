"""The FLUX.2 transformer (klein 4B/9B, their base variants, dev) in MLX: diffusers' Flux2Transformer2DModel.

Parameter names are diffusers' state-dict names, so `mapping.py` is the identity. What differs from FLUX.1:
- tokens are 128 channels: the 32-channel latent's 2x2 patches (channels ordered (c, patch row, patch col)),
  normalised by the autoencoder's batch-norm statistics, row-major; the pipeline does all that, the model
  only sees tokens. Reference images (edits) are more tokens after the noisy ones, with their own ids.
- 4-axis rotary positions (t, h, w, l), theta 2000: image tokens (0, row, col, 0) (`image_ids`), reference
  images t = 10, 20, ...; text tokens (0, 0, 0, index) (`text_ids`).
- no pooled text: the conditioning is the timestep (and, in guidance-distilled FLUX.2 dev, the guidance
  scale) alone, and the modulations are shared: one for all double blocks' image streams, one for their
  text streams, one for all single blocks (`*_modulation`), computed once per call.
- no biases anywhere; SwiGLU feed-forwards (`Flux2FeedForward`); single blocks fuse q, k, v and the MLP's
  input into one projection (`to_qkv_mlp_proj`) and the attention and MLP outputs into another (`to_out`).

Text and image tokens are concatenated once, before the single blocks, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.blocks.embeddings import TIME_CHANNELS, TimestepEmbedding, rope_angles, sigma_sinusoids
from mlx_sd_server.engine.blocks.transformer import Modulation, RopeAttention, clip_float16, modulate, rope_attention
from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.layers import Linear


@dataclass(frozen=True)
class Flux2TransformerConfig:
    """diffusers' Flux2Transformer2DModel arguments; defaults are diffusers' (FLUX.2 dev's). klein 4B: 5 double
    and 20 single layers, 24 heads, joint_attention_dim 7680, no guidance embedding; klein 9B: 8, 24, 32 heads,
    12288 (3 stacked Qwen3 hidden states)."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = TIME_CHANNELS
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000
    eps: float = 1e-6
    guidance_embeds: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> Flux2TransformerConfig:
        """From a diffusers transformer config.json dict (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and (v is not None or k == "out_channels")}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        return cls(**values)


# --- position ids (Flux2Pipeline's _prepare_latent_ids, _prepare_image_ids, _prepare_text_ids) ----------


def image_ids(h: int, w: int, t: int = 0) -> mx.array:
    """(h * w, 4) float32 ids (t, row, col, 0) of the tokens of an h x w patch grid (the latent's size / 2):
    t = 0 for the image being generated, 10 * (i + 1) for the i-th reference image."""
    rows, cols = mx.meshgrid(mx.arange(h), mx.arange(w), indexing="ij")
    ids = mx.stack([mx.full(rows.shape, t), rows, cols, mx.zeros_like(rows)], axis=-1)
    return ids.reshape(-1, 4).astype(mx.float32)


def text_ids(length: int) -> mx.array:
    """(length, 4) float32 ids (0, 0, 0, index) of the text tokens."""
    index = mx.arange(length)
    zeros = mx.zeros_like(index)
    return mx.stack([zeros, zeros, zeros, index], axis=-1).astype(mx.float32)


# --- blocks ------------------------------------------------------------------------------------------


def swiglu(h: mx.array) -> mx.array:
    """silu(a) * b for h = [a, b] (halves of the last axis): diffusers' Flux2SwiGLU."""
    a, b = mx.split(h, 2, axis=-1)
    return silu(a) * b


class Flux2FeedForward(nn.Module):
    """`linear_in` to twice the hidden width, SwiGLU, `linear_out`; no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = Linear(dim, 2 * hidden, bias=False)
        self.linear_out = Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_out(swiglu(self.linear_in(x)))


class Flux2TransformerBlock(nn.Module):
    """Double-stream block: image and text keep their own weights and meet in joint attention; the
    modulations come from the model (shared by all double blocks)."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = RopeAttention(dim, heads, head_dim, joint=True, bias=False, eps=eps)
        self.ff = Flux2FeedForward(dim, hidden)
        self.ff_context = Flux2FeedForward(dim, hidden)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        image_mod: list[mx.array],
        text_mod: list[mx.array],
        rope: tuple[mx.array, mx.array],
    ) -> tuple[mx.array, mx.array]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = image_mod
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = text_mod
        attn, context_attn = self.attn.joint(
            modulate(x, shift_msa, scale_msa, self.eps), modulate(context, c_shift_msa, c_scale_msa, self.eps), rope
        )
        x = x + gate_msa[:, None] * attn
        x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp, self.eps))
        context = context + c_gate_msa[:, None] * context_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp, self.eps))
        return clip_float16(context), x  # diffusers clips only the text stream here


class Flux2ParallelSelfAttention(nn.Module):
    """A single block's attention and SwiGLU MLP in parallel: one input projection for q, k, v and the MLP's
    two halves, one output projection for [attention, MLP]."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.heads, self.inner = heads, heads * head_dim
        self.to_qkv_mlp_proj = Linear(dim, 3 * self.inner + 2 * hidden, bias=False)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = Linear(self.inner + hidden, dim, bias=False)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        h = self.to_qkv_mlp_proj(x)
        q, k, v = (
            h[..., i * self.inner : (i + 1) * self.inner].reshape(*x.shape[:2], self.heads, -1) for i in range(3)
        )
        out = rope_attention(self.norm_q(q), self.norm_k(k), v, rope)
        return self.to_out(mx.concatenate([out, swiglu(h[..., 3 * self.inner :])], axis=-1))


class Flux2SingleTransformerBlock(nn.Module):
    """Single-stream block over [text, image]; its modulation comes from the model (shared by all)."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Flux2ParallelSelfAttention(dim, heads, head_dim, hidden, eps)

    def __call__(self, x: mx.array, mod: list[mx.array], rope: tuple[mx.array, mx.array]) -> mx.array:
        shift, scale, gate = mod
        return clip_float16(x + gate[:, None] * self.attn(modulate(x, shift, scale, self.eps), rope))


class Flux2TimestepGuidanceEmbeddings(nn.Module):
    """The timestep's embedding, plus the guidance scale's in guidance-distilled models (FLUX.2 dev)."""

    def __init__(self, channels: int, dim: int, guidance: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedding(channels, dim, bias=False)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(channels, dim, bias=False)

    def __call__(self, timestep: mx.array, guidance: mx.array | None, dtype: mx.Dtype) -> mx.array:
        emb = self.timestep_embedder(sigma_sinusoids(timestep, dtype, self.channels))
        if "guidance_embedder" not in self:
            return emb
        if guidance is None:
            # diffusers would silently leave the guidance embedding out: a runtime that forgot it must hear
            raise ValueError("this model embeds a guidance scale (FLUX.2 dev): pass guidance")
        return emb + self.guidance_embedder(sigma_sinusoids(guidance, dtype, self.channels))


# --- the model ---------------------------------------------------------------------------------------


class Flux2Transformer2DModel(nn.Module):
    def __init__(self, config: Flux2TransformerConfig):
        super().__init__()
        c = self.config = config
        if sum(c.axes_dims_rope) != c.attention_head_dim:
            raise ValueError(f"axes_dims_rope {c.axes_dims_rope} must sum to attention_head_dim {c.attention_head_dim}")
        heads, head_dim = c.num_attention_heads, c.attention_head_dim
        dim = heads * head_dim
        hidden = int(dim * c.mlp_ratio)
        self.time_guidance_embed = Flux2TimestepGuidanceEmbeddings(c.timestep_guidance_channels, dim, c.guidance_embeds)
        self.double_stream_modulation_img = Modulation(dim, 6, bias=False)
        self.double_stream_modulation_txt = Modulation(dim, 6, bias=False)
        self.single_stream_modulation = Modulation(dim, 3, bias=False)
        self.x_embedder = Linear(c.in_channels, dim, bias=False)
        self.context_embedder = Linear(c.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = [
            Flux2TransformerBlock(dim, heads, head_dim, hidden, c.eps) for _ in range(c.num_layers)
        ]
        self.single_transformer_blocks = [
            Flux2SingleTransformerBlock(dim, heads, head_dim, hidden, c.eps) for _ in range(c.num_single_layers)
        ]
        self.norm_out = Modulation(dim, 2, bias=False)  # AdaLayerNormContinuous: scale, then shift
        self.proj_out = Linear(dim, c.patch_size**2 * (c.out_channels or c.in_channels), bias=False)

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        timestep: mx.array | float,
        img_ids: mx.array,
        txt_ids: mx.array,
        guidance: mx.array | float | None = None,
        generated: int | None = None,
    ) -> mx.array:
        """The velocity for tokens (B, L_img, in_channels) at sigmas `timestep` (B,) in [0, 1], given text
        states (B, L_txt, joint_attention_dim); ids (L_img, 4) and (L_txt, 4). L_img may include reference
        images' tokens after the noisy ones: with `generated` (the noisy tokens' count) the output is theirs
        alone (B, generated, out_channels), as the pipelines slice it; else every token's.

        Computes in hidden_states' dtype. `guidance` (B,) is the distilled guidance scale of FLUX.2 dev; models
        without a guidance embedding (klein) ignore it.
        """
        batch = hidden_states.shape[0]

        def per_sample(t: mx.array | float) -> mx.array:
            return mx.broadcast_to(mx.array(t, dtype=mx.float32).reshape(-1), (batch,))

        x = self.x_embedder(hidden_states)
        temb = self.time_guidance_embed(
            per_sample(timestep), None if guidance is None else per_sample(guidance), x.dtype
        )
        cond = silu(temb)  # every modulation's input
        image_mod = self.double_stream_modulation_img(cond)
        text_mod = self.double_stream_modulation_txt(cond)
        single_mod = self.single_stream_modulation(cond)
        context = self.context_embedder(encoder_hidden_states)
        c = self.config
        rope = rope_angles(mx.concatenate([txt_ids, img_ids], axis=0), c.axes_dims_rope, c.rope_theta)

        for block in self.transformer_blocks:
            context, x = block(x, context, image_mod, text_mod, rope)
        text = context.shape[1]
        x = mx.concatenate([context, x], axis=1)
        for single_block in self.single_transformer_blocks:
            x = single_block(x, single_mod, rope)
        x = x[:, text : None if generated is None else text + generated]  # (references: not predicted)

        scale, shift = self.norm_out(cond)
        return self.proj_out(modulate(x, shift, scale, c.eps))
