"""The SD3 / SD3.5 transformer (MMDiT) in MLX: diffusers' SD3Transformer2DModel.

Parameter names are diffusers' state-dict names, so `mapping.py` only moves the patch embedding's
convolution to NHWC. Latents are NHWC (B, H, W, C) in and out; the model cuts them into 2x2 patches, adds a
2D sin-cos position embedding cropped from the centre of a `pos_embed_max_size`-square table (a buffer
diffusers saves with the weights), and runs joint blocks in which image and text keep their own weights and
meet in one attention. SD3.5 normalises queries and keys (`qk_norm="rms_norm"`); SD3.5-medium's MMDiT-X
blocks (`dual_attention_layers`) add an image-only attention `attn2`. The last block is `context_pre_only`:
the text stream only feeds its attention.

The pieces FLUX.1 shares with it (adaLN modulation, the GELU feed-forward, the timestep + pooled-text
embedding) are in `engine/blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.blocks.embeddings import TimeTextEmbedding
from mlx_sd_server.engine.blocks.transformer import FeedForward, Modulation, modulate
from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.layers import Conv2d, Linear

QK_NORMS = (None, "rms_norm")  # SD3's and SD3.5's


@dataclass
class SD3TransformerConfig:
    """diffusers' SD3Transformer2DModel arguments (less sample_size, which only shaped the saved position table);
    defaults are diffusers' own."""

    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> SD3TransformerConfig:
        """From a diffusers transformer config.json dict (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        if "dual_attention_layers" in values:
            values["dual_attention_layers"] = tuple(values["dual_attention_layers"])
        return cls(**values)


class PatchEmbed(nn.Module):
    """diffusers' PatchEmbed with SD3's cropping: a patch-size convolution, then the centre crop of the
    position table that fits the latent's patch grid."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, max_size: int):
        super().__init__()
        self.patch_size, self.max_size = patch_size, max_size
        self.proj = Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # diffusers computes this table (2D sin-cos) and saves it with the weights: it is loaded from them.
        self.pos_embed = mx.zeros((1, max_size * max_size, dim))

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) latents -> (B, H/p * W/p, dim) tokens, row-major over patches."""
        b, h, w, _ = x.shape
        p, size = self.patch_size, self.max_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} must be a multiple of the patch size {p}")
        h, w = h // p, w // p
        if h > size or w > size:
            raise ValueError(
                f"a latent of {h}x{w} patches is beyond this model's position embeddings ({size}x{size} patches)"
            )
        top, left = (size - h) // 2, (size - w) // 2
        table = self.pos_embed.reshape(size, size, -1)[top : top + h, left : left + w]
        tokens = self.proj(x).reshape(b, h * w, -1)
        return tokens + table.reshape(1, h * w, -1).astype(tokens.dtype)


class SD3Attention(nn.Module):
    """diffusers' Attention with JointAttnProcessor2_0. `joint`: the text stream's projections too (`attn` of a
    joint block), with an output projection unless the block is `context_pre_only`; else image only (`attn2`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, joint: bool, context_out: bool):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = Linear(dim, inner), Linear(dim, inner), Linear(dim, inner)
        self.to_out = [Linear(inner, dim)]  # a list, so the name is diffusers' `to_out.0`
        if qk_norm:
            self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        if joint:
            self.add_q_proj, self.add_k_proj = Linear(dim, inner), Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            if qk_norm:
                self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
            if context_out:
                self.to_add_out = Linear(inner, dim)

    def _qkv(
        self,
        x: mx.array,
        to_q: Linear,
        to_k: Linear,
        to_v: Linear,
        norm_q: nn.RMSNorm | None,
        norm_k: nn.RMSNorm | None,
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(B, L, heads, head_dim) queries, keys and values; the norms (SD3.5's) act per head."""

        def heads(t: mx.array) -> mx.array:
            return t.reshape(*x.shape[:2], self.heads, -1)

        q, k, v = heads(to_q(x)), heads(to_k(x)), heads(to_v(x))
        if norm_q is not None and norm_k is not None:  # (both or neither: __init__ makes them together)
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def __call__(self, x: mx.array, context: mx.array | None = None):
        """Image only: attention over x. Joint: over [x, context] (image first, as diffusers), returning the
        image part through `to_out` and the text part through `to_add_out` (None in a context_pre_only block)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.get("norm_q"), self.get("norm_k"))
        if context is not None:
            cq, ck, cv = self._qkv(
                context,
                self.add_q_proj,
                self.add_k_proj,
                self.add_v_proj,
                self.get("norm_added_q"),
                self.get("norm_added_k"),
            )
            q, k, v = (mx.concatenate([a, b], axis=1) for a, b in ((q, cq), (k, ck), (v, cv)))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = attention(q, k, v).transpose(0, 2, 1, 3).reshape(x.shape[0], q.shape[2], -1)
        image = self.to_out[0](out[:, : x.shape[1]])
        if context is None:
            return image
        text = self.to_add_out(out[:, x.shape[1] :]) if "to_add_out" in self else None
        return image, text


class JointTransformerBlock(nn.Module):
    """diffusers' JointTransformerBlock: adaLN-Zero on both streams, joint attention, GELU feed-forwards."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_pre_only: bool, qk_norm: str | None, use_dual_attention: bool
    ):
        super().__init__()
        self.context_pre_only, self.use_dual_attention = context_pre_only, use_dual_attention
        self.norm1 = Modulation(dim, 9 if use_dual_attention else 6)  # SD35AdaLayerNormZeroX: 3 more for attn2
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)  # AdaLayerNormContinuous: scale, shift
        self.attn = SD3Attention(dim, heads, head_dim, qk_norm, joint=True, context_out=not context_pre_only)
        if use_dual_attention:
            self.attn2 = SD3Attention(dim, heads, head_dim, qk_norm, joint=False, context_out=False)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array, cond: mx.array) -> tuple[mx.array | None, mx.array]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(cond)
        if self.context_pre_only:
            c_scale_msa, c_shift_msa = self.norm1_context(cond)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(cond)
        attn, context_attn = self.attn(modulate(x, shift_msa, scale_msa), modulate(context, c_shift_msa, c_scale_msa))
        block_input = x
        x = x + gate_msa[:, None] * attn
        if self.use_dual_attention:  # attn2 reads the block's input, with its own shift, scale and gate
            shift_msa2, scale_msa2, gate_msa2 = dual
            x = x + gate_msa2[:, None] * self.attn2(modulate(block_input, shift_msa2, scale_msa2))
        x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp))
        if self.context_pre_only:
            return None, x
        context = context + c_gate_msa[:, None] * context_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp))
        return context, x


class SD3Transformer2DModel(nn.Module):
    def __init__(self, config: SD3TransformerConfig):
        super().__init__()
        c = self.config = config
        if c.qk_norm not in QK_NORMS:
            raise ValueError(f"unsupported qk_norm {c.qk_norm!r} (SD3 has none, SD3.5 rms_norm)")
        dim = c.num_attention_heads * c.attention_head_dim
        if c.caption_projection_dim != dim:
            raise ValueError(f"caption_projection_dim {c.caption_projection_dim} must be the transformer's width {dim}")
        self.pos_embed = PatchEmbed(c.in_channels, dim, c.patch_size, c.pos_embed_max_size)
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim, guidance=False)
        self.context_embedder = Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = [
            JointTransformerBlock(
                dim,
                c.num_attention_heads,
                c.attention_head_dim,
                qk_norm=c.qk_norm,
                context_pre_only=i == c.num_layers - 1,
                use_dual_attention=i in c.dual_attention_layers,
            )
            for i in range(c.num_layers)
        ]
        self.norm_out = Modulation(dim, 2)
        self.proj_out = Linear(dim, c.patch_size**2 * c.out_channels)

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        pooled_projections: mx.array,
        timestep: mx.array | float,
    ) -> mx.array:
        """The velocity (B, H, W, out_channels) for latents (B, H, W, in_channels) at sigmas `timestep` (B,)
        in [0, 1], given text states (B, L, joint_attention_dim) and pooled text (B, pooled_projection_dim).

        diffusers' SD3 transformer takes the timestep sigma * 1000; ours takes the sigma, as our FLUX
        transformer does (the embedding scales it by 1000, in float32). Computes in hidden_states' dtype.
        """
        b, h, w, _ = hidden_states.shape
        x = self.pos_embed(hidden_states)
        timestep = mx.broadcast_to(mx.array(timestep, dtype=mx.float32).reshape(-1), (b,))
        cond = silu(self.time_text_embed(timestep, None, pooled_projections, x.dtype))  # every modulation's input
        context = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            block_context, x = block(x, context, cond)
            if block_context is not None:  # the last block (context_pre_only) returns no text stream
                context = block_context
        scale, shift = self.norm_out(cond)  # AdaLayerNormContinuous: scale first
        x = self.proj_out(modulate(x, shift, scale))
        # unpatchify: each token's channels are (patch row, patch col, channel)
        p = self.config.patch_size
        x = x.reshape(b, h // p, w // p, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, -1)
