"""The Stable Diffusion UNet (SD 1.x, 2.x, XL; LCM and inpainting variants) in MLX, NHWC.

Parameter names follow diffusers' UNet2DConditionModel, so `mapping.py` is nearly the identity.
The down half (time embedding, conv_in, down blocks, mid block) lives in `UNetEncoder`, which the
ControlNet subclasses as well: a ControlNet is a copy of exactly that half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.blocks.embeddings import TimestepEmbedding, timestep_embedding
from mlx_sd_server.engine.blocks.transformer import FeedForward
from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.attention import attention_heads_last
from mlx_sd_server.engine.ops.group_norm import GroupNorm
from mlx_sd_server.engine.ops.layers import Conv2d, Linear

# --- config -----------------------------------------------------------------------------------------


def _per_block(value, n: int) -> tuple:
    """diffusers accepts one value for all blocks or a tuple with one per block."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _per_layer(value, n: int) -> tuple[int, ...]:
    """Transformer depth per resnet layer of a block: one int for all layers, or a list per layer."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


_Config = TypeVar("_Config", bound="UNetConfig")  # from_dict builds the class it is called on (ControlNetConfig)


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    # Attention heads per down block. diffusers calls this `attention_head_dim` in most configs (a naming
    # bug it keeps for compatibility): `num_attention_heads or attention_head_dim` is the head count.
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
    # Transformer blocks per resnet layer: down blocks, then up blocks (in up-block order).
    down_transformer_layers: tuple[tuple[int, ...], ...] = ((1, 1),) * 4
    up_transformer_layers: tuple[tuple[int, ...], ...] = ((1, 1, 1),) * 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    mid_block_scale_factor: float = 1.0
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None  # LCM guidance embedding

    @classmethod
    def from_dict(cls: type[_Config], d: dict) -> _Config:
        """From a diffusers UNet2DConditionModel config.json dict (unknown keys ignored)."""
        block_out = tuple(d.get("block_out_channels", cls.block_out_channels))
        n = len(block_out)
        layers = _per_block(d.get("layers_per_block", 2), n)
        heads = _per_block(d.get("num_attention_heads") or d.get("attention_head_dim", 8), n)
        depth = _per_block(d.get("transformer_layers_per_block", 1), n)
        down_depth = tuple(_per_layer(depth[i], layers[i]) for i in range(n))
        reverse_depth = d.get("reverse_transformer_layers_per_block") or tuple(reversed(depth))
        up_layers = tuple(reversed(layers))
        up_depth = tuple(_per_layer(reverse_depth[i], up_layers[i] + 1) for i in range(n))
        addition = d.get("addition_embed_type")
        if addition not in (None, "text_time"):
            raise ValueError(f"unsupported addition_embed_type {addition!r}")
        if d.get("mid_block_type", cls.mid_block_type) != cls.mid_block_type:
            raise ValueError(f"unsupported mid_block_type {d['mid_block_type']!r}")
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=block_out,
            down_block_types=tuple(d.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            layers_per_block=layers,
            num_attention_heads=heads,
            cross_attention_dim=_per_block(d.get("cross_attention_dim", 1280), n),
            down_transformer_layers=down_depth,
            up_transformer_layers=up_depth,
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            mid_block_scale_factor=d.get("mid_block_scale_factor", 1.0),
            addition_embed_type=addition,
            addition_time_embed_dim=d.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
            time_cond_proj_dim=d.get("time_cond_proj_dim"),
        )


# --- attention and transformer ----------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim or dim, dim, bias=False)
        self.to_v = Linear(context_dim or dim, dim, bias=False)
        self.to_out = [Linear(dim, dim)]  # a list, so the name is diffusers' `to_out.0`

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        batch, tokens, dim = x.shape

        def split_heads(t: mx.array) -> mx.array:
            return t.reshape(batch, t.shape[1], self.heads, -1)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        out = attention_heads_last(q, k, v)
        return self.to_out[0](out.reshape(batch, tokens, dim))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, activation="geglu")

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel over an NHWC feature map.

    In NHWC a 1x1 conv is a linear layer over channels, so SD1's conv proj_in/proj_out and SD2/XL's linear
    ones are the same nn.Linear here (the converter squeezes the 1x1 conv weights).
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, channels)
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = Linear(channels, channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        h = self.proj_in(self.norm(x)).reshape(batch, height * width, channels)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).reshape(batch, height, width, channels)


# --- resnets and resampling -------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        h = self.norm1.silu_conv(self.conv1, x)
        h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        h = self.norm2.silu_conv(self.conv2, h)
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return (shortcut + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


def upsample_nearest(x: mx.array, size: tuple[int, ...]) -> mx.array:
    """Nearest-neighbour resize of NHWC `x` to `size`, indexing like torch's F.interpolate(mode="nearest").

    Usually exactly 2x; odd latent sizes need the skip connection's size instead (as diffusers does).
    """
    for axis, (old, new) in zip((1, 2), zip(x.shape[1:3], size)):
        x = mx.take(x, (mx.arange(new) * old) // new, axis=axis)
    return x


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, ...]) -> mx.array:
        return self.conv(upsample_nearest(x, size))


# --- blocks -----------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (heads given) or DownBlock2D (heads None): resnets[, attentions][, downsampler]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        heads: int | None,
        context_dim: int,
        depths: tuple[int, ...],
        groups: int,
        eps: float,
        add_downsample: bool,
    ):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        ]
        self.attentions = (
            []
            if heads is None
            else [Transformer2D(out_channels, heads, context_dim, depths[i], groups) for i in range(num_layers)]
        )
        self.downsamplers = [Downsample2D(out_channels)] if add_downsample else []

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> tuple[mx.array, list[mx.array]]:
        """Returns the output and the skip connections it leaves for the up blocks."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) pairs."""

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        heads: int,
        context_dim: int,
        depth: int,
        groups: int,
        eps: float,
        output_scale_factor: float,
    ):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, output_scale_factor) for _ in range(2)
        ]
        self.attentions = [Transformer2D(channels, heads, context_dim, depth, groups)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> mx.array:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (heads given) or UpBlock2D (heads None): each resnet eats one skip connection."""

    def __init__(
        self,
        in_channels: int,
        prev_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        heads: int | None,
        context_dim: int,
        depths: tuple[int, ...],
        groups: int,
        eps: float,
        add_upsample: bool,
    ):
        super().__init__()
        self.resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, groups, eps))
        self.attentions = (
            []
            if heads is None
            else [Transformer2D(out_channels, heads, context_dim, depths[i], groups) for i in range(num_layers)]
        )
        self.upsamplers = [Upsample2D(out_channels)] if add_upsample else []

    def __call__(
        self,
        x: mx.array,
        temb: mx.array,
        context: mx.array,
        skips: list[mx.array],
        upsample_size: tuple[int, ...] | None,
    ) -> mx.array:
        # Skips are consumed last-first, mirroring the order the down block produced them.
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = resnet(mx.concatenate([x, skip], axis=-1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsampler in self.upsamplers:
            assert upsample_size is not None, "an upsampling block needs the next skip's size"
            x = upsampler(x, upsample_size)
        return x


# --- the model --------------------------------------------------------------------------------------


class UNetEncoder(nn.Module):
    """The down half of a UNet: time embedding, conv_in, down blocks, mid block (shared with the ControlNet)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        channels = c.block_out_channels
        temb = 4 * channels[0]
        self.conv_in = Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb, c.time_cond_proj_dim)
        if c.addition_embed_type == "text_time":
            if c.projection_class_embeddings_input_dim is None or c.addition_time_embed_dim is None:
                raise ValueError(
                    "addition_embed_type text_time needs projection_class_embeddings_input_dim and "
                    "addition_time_embed_dim"
                )
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
        self.down_blocks = [
            DownBlock(
                channels[max(i - 1, 0)],
                channels[i],
                temb,
                c.layers_per_block[i],
                c.num_attention_heads[i] if block_type == "CrossAttnDownBlock2D" else None,
                c.cross_attention_dim[i],
                c.down_transformer_layers[i],
                c.norm_num_groups,
                c.norm_eps,
                add_downsample=i < len(channels) - 1,
            )
            for i, block_type in enumerate(c.down_block_types)
        ]
        self.mid_block = MidBlock(
            channels[-1],
            temb,
            c.num_attention_heads[-1],
            c.cross_attention_dim[-1],
            c.down_transformer_layers[-1][0],
            c.norm_num_groups,
            c.norm_eps,
            c.mid_block_scale_factor,
        )

    def embed_time(
        self,
        timestep: mx.array | float,
        batch: int,
        dtype: mx.Dtype,
        text_embeds: mx.array | None,
        time_ids: mx.array | None,
        timestep_cond: mx.array | None,
    ) -> mx.array:
        """The embedding every resnet receives: timestep (+ LCM guidance) (+ SDXL text/size conditioning)."""
        c = self.config
        t = mx.broadcast_to(mx.array(timestep, dtype=mx.float32).reshape(-1), (batch,))
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).astype(dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        if c.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet needs text_embeds and time_ids (SDXL micro-conditioning)")
            assert c.addition_time_embed_dim is not None  # (__init__ refuses a text_time config without it)
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift
            ).reshape(batch, -1)
            emb = emb + self.add_embedding(mx.concatenate([text_embeds, time_embeds.astype(dtype)], axis=-1))
        return emb

    def encode(self, h: mx.array, emb: mx.array, context: mx.array) -> tuple[mx.array, list[mx.array]]:
        """Down blocks and mid block over conv_in's output; returns the mid output and all skip connections."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips.extend(block_skips)
        return self.mid_block(h, emb, context), skips


class UNetModel(UNetEncoder):
    def __init__(self, config: UNetConfig):
        super().__init__(config)
        c = config
        channels = tuple(reversed(c.block_out_channels))
        heads = tuple(reversed(c.num_attention_heads))
        context_dims = tuple(reversed(c.cross_attention_dim))
        layers = tuple(reversed(c.layers_per_block))
        temb = 4 * c.block_out_channels[0]
        self.up_blocks = [
            UpBlock(
                channels[min(i + 1, len(channels) - 1)],
                channels[max(i - 1, 0)],
                channels[i],
                temb,
                layers[i] + 1,
                heads[i] if block_type == "CrossAttnUpBlock2D" else None,
                context_dims[i],
                c.up_transformer_layers[i],
                c.norm_num_groups,
                c.norm_eps,
                add_upsample=i < len(channels) - 1,
            )
            for i, block_type in enumerate(c.up_block_types)
        ]
        self.conv_norm_out = GroupNorm(c.norm_num_groups, c.block_out_channels[0], eps=c.norm_eps)
        self.conv_out = Conv2d(c.block_out_channels[0], c.out_channels, 3, padding=1)

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array,
        encoder_hidden_states: mx.array,
        *,
        text_embeds: mx.array | None = None,
        time_ids: mx.array | None = None,
        timestep_cond: mx.array | None = None,
        down_block_additional_residuals: list[mx.array] | None = None,
        mid_block_additional_residual: mx.array | None = None,
    ) -> mx.array:
        """Predict noise (or v) for latents x (B,H,W,C) at timesteps (B,) given text states (B,L,D).

        text_embeds (B,P) and time_ids (B,6) are SDXL's pooled text and size conditioning; timestep_cond
        (B,time_cond_proj_dim) is LCM's guidance embedding; the residuals are a ControlNet's output.
        """
        emb = self.embed_time(timestep, x.shape[0], x.dtype, text_embeds, time_ids, timestep_cond)
        h, skips = self.encode(self.conv_in(x), emb, encoder_hidden_states)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            # Upsample to the next skip's size, which is 2x except after odd sizes on the way down.
            h = block(h, emb, encoder_hidden_states, block_skips, skips[-1].shape[1:3] if skips else None)
        return self.conv_norm_out.silu_conv(self.conv_out, h)
