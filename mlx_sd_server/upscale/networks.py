"""The upscaling networks in MLX (NHWC, images in [0, 1]), with the maths of spandrel 0.4.2's ESRGAN (RRDBNet)
and Compact (SRVGGNetCompact) architectures.

Parameter names are Real-ESRGAN's (basicsr's RRDBNet and SRVGGNetCompact); convolution weights are MLX's
(out, kh, kw, in). Older key layouts are renamed into these by upscale.weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.families.sd.unet import upsample_nearest
from mlx_sd_server.engine.ops.layers import Conv2d
from mlx_sd_server.engine.vae import BandedConv2d, patchify_latents, unpatchify_latents

ESRGAN, SRVGG = "esrgan", "srvgg"
LEAKY_SLOPE = 0.2  # every RRDBNet activation (ESRGAN's and Real-ESRGAN's alike)
RESIDUAL_SCALE = 0.2  # each dense block's and each RRDB's residual is scaled by this

_Config = TypeVar("_Config", bound="RRDBNetConfig | SRVGGConfig")


def config_from_dict(cls: type[_Config], d: dict[str, Any]) -> _Config:
    """A config from its JSON (unknown keys ignored, so that later fields can be added)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class RRDBNetConfig:
    """An RRDBNet as basicsr's `RRDBNet(num_in_ch, num_out_ch, scale, num_feat, num_block, num_grow_ch)` names it.

    `scale` is the image's enlargement. Real-ESRGAN's x2 and x1 models pixel-unshuffle their input by
    `unshuffle` (2, 4) and then upsample 4x, so the network itself always upsamples scale * unshuffle times.
    `plus`: ESRGAN+'s extra 1x1 convolutions in each dense block."""

    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4
    unshuffle: int = 1
    plus: bool = False

    @property
    def upsamples(self) -> int:
        """How many nearest-2x-then-convolve stages the network has."""
        return int(math.log2(self.scale * self.unshuffle))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SRVGGConfig:
    """SRVGGNetCompact (realesr-general-x4v3: 64 features, 32 convolutions; animevideov3: 64, 16), PReLU."""

    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_conv: int = 16
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def leaky_relu(x: mx.array) -> mx.array:
    return mx.maximum(x, LEAKY_SLOPE * x)


def conv3x3(cin: int, cout: int) -> BandedConv2d:
    """A 3x3 convolution that, on the CPU, works through a large input in bands of rows: MLX's CPU convolution
    takes ~9x its input as workspace (2.4 GB for one 1024x1024x64 map of a 256-pixel tile's 4x tail)."""
    return BandedConv2d(cin, cout)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions (`conv1`..`conv5`), the last one's output scaled and added."""

    def __init__(self, num_feat: int, num_grow_ch: int, plus: bool):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", conv3x3(num_feat + i * num_grow_ch, num_grow_ch))
        self.conv5 = conv3x3(num_feat + 4 * num_grow_ch, num_feat)
        if plus:  # ESRGAN+: x2 += conv1x1(x), x4 += x2
            self.conv1x1 = Conv2d(num_feat, num_grow_ch, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x1 = leaky_relu(self.conv1(x))
        x2 = leaky_relu(self.conv2(mx.concatenate([x, x1], axis=-1)))
        if "conv1x1" in self:
            x2 = x2 + self.conv1x1(x)
        x3 = leaky_relu(self.conv3(mx.concatenate([x, x1, x2], axis=-1)))
        x4 = leaky_relu(self.conv4(mx.concatenate([x, x1, x2, x3], axis=-1)))
        if "conv1x1" in self:
            x4 = x4 + x2
        x5 = self.conv5(mx.concatenate([x, x1, x2, x3, x4], axis=-1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int, plus: bool):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch, plus)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch, plus)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch, plus)

    def __call__(self, x: mx.array) -> mx.array:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: a trunk of RRDBs with a long skip, `upsamples` nearest-2x + conv stages, two convs."""

    def __init__(self, config: RRDBNetConfig):
        super().__init__()
        self.config = config
        c = config
        self.conv_first = conv3x3(c.num_in_ch * c.unshuffle**2, c.num_feat)
        self.body = [RRDB(c.num_feat, c.num_grow_ch, c.plus) for _ in range(c.num_block)]
        self.conv_body = conv3x3(c.num_feat, c.num_feat)
        for i in range(c.upsamples):
            setattr(self, f"conv_up{i + 1}", conv3x3(c.num_feat, c.num_feat))
        self.conv_hr = conv3x3(c.num_feat, c.num_feat)
        self.conv_last = conv3x3(c.num_feat, c.num_out_ch)

    @property
    def scale(self) -> int:
        return self.config.scale

    def __call__(self, x: mx.array) -> mx.array:
        c = self.config
        h, w = x.shape[1:3]
        if c.unshuffle > 1:  # as spandrel: reflect-pad the bottom and right to a multiple, crop the result back
            pad_h, pad_w = -h % c.unshuffle, -w % c.unshuffle
            if pad_h or pad_w:
                x = mx.pad(x, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)], mode="reflect")
            x = patchify_latents(x, (c.unshuffle, c.unshuffle))  # = torch's pixel_unshuffle channel order
        feat = self.conv_first(x)
        trunk = feat
        for block in self.body:
            trunk = block(trunk)
        feat = feat + self.conv_body(trunk)
        for i in range(c.upsamples):
            feat = leaky_relu(getattr(self, f"conv_up{i + 1}")(feat, upsample=True))  # of feat upsampled 2x
        out = self.conv_last(leaky_relu(self.conv_hr(feat)))
        return out[:, : h * c.scale, : w * c.scale] if c.unshuffle > 1 else out


class SRVGGNetCompact(nn.Module):
    """A plain stack of 3x3 convs with PReLUs (`body.0`, `body.1`, ...), pixel shuffle, plus the nearest-
    upsampled input: the network learns the residual."""

    def __init__(self, config: SRVGGConfig):
        super().__init__()
        self.config = config
        c = config
        layers: list[nn.Module] = [conv3x3(c.num_in_ch, c.num_feat), nn.PReLU(c.num_feat)]
        for _ in range(c.num_conv):
            layers += [conv3x3(c.num_feat, c.num_feat), nn.PReLU(c.num_feat)]
        layers.append(conv3x3(c.num_feat, c.num_out_ch * c.upscale**2))
        self.body = layers

    @property
    def scale(self) -> int:
        return self.config.upscale

    def __call__(self, x: mx.array) -> mx.array:
        out = x
        for layer in self.body:
            out = layer(out)
        r = self.config.upscale
        out = unpatchify_latents(out, (r, r))  # = torch's pixel_shuffle channel order
        return out + upsample_nearest(x, (x.shape[1] * r, x.shape[2] * r))


UpscaleNetwork = RRDBNet | SRVGGNetCompact


def build_network(arch: str, config: dict[str, Any]) -> UpscaleNetwork:
    """The (uninitialised) network a converted upscaler's config.json describes."""
    if arch == ESRGAN:
        return RRDBNet(config_from_dict(RRDBNetConfig, config))
    if arch == SRVGG:
        return SRVGGNetCompact(config_from_dict(SRVGGConfig, config))
    raise ValueError(f"unknown upscaler architecture {arch!r} (expected {ESRGAN} or {SRVGG})")
