"""ControlNet (SD 1.x, 2.x, XL) in MLX, NHWC.

A ControlNet is a trainable copy of the UNet's down half (`UNetEncoder`: time embedding, conv_in, down and mid
blocks) whose input also gets an embedding of the control image, and whose skip connections and mid output
pass through zero-initialised 1x1 convs to become residuals added to the UNet's own (see UNetModel.__call__).
Parameter names follow diffusers' ControlNetModel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.families.sd.unet import UNetConfig, UNetEncoder
from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.layers import Conv2d


@dataclass
class ControlNetConfig(UNetConfig):
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr" models expect the channels flipped
    global_pool_conditions: bool = False  # residuals averaged over space (e.g. the shuffle ControlNet)

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        """From a diffusers ControlNetModel config.json dict (unknown keys ignored)."""
        return dataclasses.replace(
            super().from_dict(d),
            conditioning_channels=d.get("conditioning_channels", 3),
            conditioning_embedding_out_channels=tuple(
                d.get("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels)
            ),
            controlnet_conditioning_channel_order=d.get("controlnet_conditioning_channel_order", "rgb"),
            global_pool_conditions=d.get("global_pool_conditions", False),
        )


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (full resolution) -> latent-resolution features: 3x3 convs, every other one strided."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = Conv2d(channels[-1], out_channels, 3, padding=1)

    def __call__(self, image: mx.array) -> mx.array:
        h = silu(self.conv_in(image))
        for conv in self.blocks:
            h = silu(conv(h))
        return self.conv_out(h)


class ControlNetModel(UNetEncoder):
    config: ControlNetConfig  # (UNetEncoder stores the config it is given)

    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        c = config
        channels = c.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c.conditioning_channels, c.conditioning_embedding_out_channels, channels[0]
        )
        # One zero conv per skip connection the down blocks leave (conv_in's output, each resnet, each
        # downsampler), in the order UNetEncoder.encode returns them.
        skip_channels = [channels[0]]
        for i, layers in enumerate(c.layers_per_block):
            skip_channels += [channels[i]] * (layers + (i < len(channels) - 1))
        self.controlnet_down_blocks = [Conv2d(ch, ch, 1) for ch in skip_channels]
        self.controlnet_mid_block = Conv2d(channels[-1], channels[-1], 1)

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array,
        encoder_hidden_states: mx.array,
        controlnet_cond: mx.array,
        *,
        conditioning_scale: float = 1.0,
        text_embeds: mx.array | None = None,
        time_ids: mx.array | None = None,
    ) -> tuple[list[mx.array], mx.array]:
        """Residuals for UNetModel's down_block_additional_residuals / mid_block_additional_residual.

        x, timestep, encoder_hidden_states, text_embeds, time_ids are as for the UNet; controlnet_cond is the
        control image (B, 8*H, 8*W, 3) in [0, 1], RGB.
        """
        c = self.config
        if c.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        emb = self.embed_time(timestep, x.shape[0], x.dtype, text_embeds, time_ids, None)
        h = self.conv_in(x) + self.controlnet_cond_embedding(controlnet_cond)
        h, skips = self.encode(h, emb, encoder_hidden_states)
        down = [conv(skip) * conditioning_scale for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h) * conditioning_scale
        if c.global_pool_conditions:
            down = [r.mean(axis=(1, 2), keepdims=True) for r in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return down, mid
