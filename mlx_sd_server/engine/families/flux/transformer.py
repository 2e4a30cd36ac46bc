"""The FLUX.1 transformer (schnell and dev) in MLX: diffusers' FluxTransformer2DModel.

Parameter names are diffusers' state-dict names, so `mapping.py` is the identity. The model works on
packed latents: 2x2 patches of the 16-channel latent as 64-channel tokens (`pack_latents`), positioned by
3-axis rotary embeddings over (0, row, col) ids (`latent_image_ids`); text tokens have all-zero ids.

Where diffusers concatenates text and image tokens in every single-stream block and splits them after, we
concatenate once before those blocks and split once at the end: every op there is per token or joint
attention over all of them, so the result is the same, without two copies of the stream per block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.blocks.embeddings import TimeTextEmbedding, rope_angles
from mlx_sd_server.engine.blocks.transformer import FeedForward, Modulation, RopeAttention, clip_float16, modulate
from mlx_sd_server.engine.ops.activations import gelu_approx, silu
from mlx_sd_server.engine.ops.layers import Linear


@dataclass
class FluxTransformerConfig:
    """diffusers' FluxTransformer2DModel arguments; defaults are FLUX.1's (dev adds guidance_embeds=True)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @classmethod
    def from_dict(cls, d: dict) -> FluxTransformerConfig:
        """From a diffusers transformer config.json dict (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and (v is not None or k == "out_channels")}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        return cls(**values)


# --- latents <-> tokens (FluxPipeline's _pack_latents, _unpack_latents, _prepare_latent_image_ids) ---


def _check_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent size {h}x{w} must be even")


def pack_latents(x: mx.array) -> mx.array:
    """(B, h, w, C) NHWC latents -> (B, h/2 * w/2, 4C) tokens, row-major over patches; each token's
    channels are ordered (c, patch row, patch col), as diffusers packs the NCHW latents."""
    b, h, w, c = x.shape
    _check_even(h, w)
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: mx.array, h: int, w: int) -> mx.array:
    """The inverse of `pack_latents`: (B, h/2 * w/2, 4C) -> (B, h, w, C), for latent size h x w."""
    b, _, c4 = x.shape
    _check_even(h, w)
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, c4 // 4)


def latent_image_ids(h: int, w: int) -> mx.array:
    """(h/2 * w/2, 3) float32 position ids (0, row, col) of the packed tokens of an h x w latent."""
    _check_even(h, w)
    rows, cols = mx.meshgrid(mx.arange(h // 2), mx.arange(w // 2), indexing="ij")
    ids = mx.stack([mx.zeros_like(rows), rows, cols], axis=-1)
    return ids.reshape(-1, 3).astype(mx.float32)


# --- blocks ------------------------------------------------------------------------------------------


class FluxTransformerBlock(nn.Module):
    """Double-stream block: image and text keep their own weights and meet in joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = Modulation(dim, 6)
        self.norm1_context = Modulation(dim, 6)
        self.attn = RopeAttention(dim, heads, head_dim, joint=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array, cond: mx.array, rope) -> tuple[mx.array, mx.array]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(cond)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(cond)
        attn, context_attn = self.attn.joint(
            modulate(x, shift_msa, scale_msa), modulate(context, c_shift_msa, c_scale_msa), rope
        )
        x = x + gate_msa[:, None] * attn
        x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp))
        context = context + c_gate_msa[:, None] * context_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp))
        return clip_float16(context), x  # diffusers clips only the text stream here


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over [text, image]: attention and a GELU MLP in parallel, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = Modulation(dim, 3)
        self.proj_mlp = Linear(dim, 4 * dim)
        self.attn = RopeAttention(dim, heads, head_dim, joint=False)
        self.proj_out = Linear(dim + 4 * dim, dim)

    def __call__(self, x: mx.array, cond: mx.array, rope) -> mx.array:
        shift, scale, gate = self.norm(cond)
        h = modulate(x, shift, scale)
        out = self.proj_out(mx.concatenate([self.attn(h, rope), gelu_approx(self.proj_mlp(h))], axis=-1))
        return clip_float16(x + gate[:, None] * out)


# --- the model ---------------------------------------------------------------------------------------


class FluxTransformer2DModel(nn.Module):
    def __init__(self, config: FluxTransformerConfig):
        super().__init__()
        c = self.config = config
        if sum(c.axes_dims_rope) != c.attention_head_dim:
            raise ValueError(f"axes_dims_rope {c.axes_dims_rope} must sum to attention_head_dim {c.attention_head_dim}")
        dim, heads, head_dim = c.num_attention_heads * c.attention_head_dim, c.num_attention_heads, c.attention_head_dim
        self.x_embedder = Linear(c.in_channels, dim)
        self.context_embedder = Linear(c.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.transformer_blocks = [FluxTransformerBlock(dim, heads, head_dim) for _ in range(c.num_layers)]
        self.single_transformer_blocks = [
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(c.num_single_layers)
        ]
        self.norm_out = Modulation(dim, 2)
        self.proj_out = Linear(dim, c.patch_size**2 * (c.out_channels or c.in_channels))

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        pooled_projections: mx.array,
        timestep: mx.array | float,
        img_ids: mx.array,
        txt_ids: mx.array,
        guidance: mx.array | float | None = None,
    ) -> mx.array:
        """The velocity for packed latents (B, L_img, in_channels) at sigmas `timestep` (B,) in [0, 1], given
        T5 states (B, L_txt, joint_attention_dim) and pooled CLIP (B, pooled_projection_dim); ids (L, 3).

        Computes in hidden_states' dtype. `guidance` (B,) is the distilled guidance scale of dev models;
        models without a guidance embedding (schnell) ignore it.
        """
        batch = hidden_states.shape[0]
        x = self.x_embedder(hidden_states)

        def per_sample(t):
            return mx.broadcast_to(mx.array(t, dtype=mx.float32).reshape(-1), (batch,))

        guidance = None if guidance is None else per_sample(guidance)
        temb = self.time_text_embed(per_sample(timestep), guidance, pooled_projections, x.dtype)
        cond = silu(temb)  # every modulation's input
        context = self.context_embedder(encoder_hidden_states)
        rope = rope_angles(mx.concatenate([txt_ids, img_ids], axis=0), self.config.axes_dims_rope)

        for block in self.transformer_blocks:
            context, x = block(x, context, cond, rope)
        text = context.shape[1]
        x = mx.concatenate([context, x], axis=1)
        for single_block in self.single_transformer_blocks:
            x = single_block(x, cond, rope)
        x = x[:, text:]

        scale, shift = self.norm_out(cond)  # AdaLayerNormContinuous: scale first
        return self.proj_out(modulate(x, shift, scale))
