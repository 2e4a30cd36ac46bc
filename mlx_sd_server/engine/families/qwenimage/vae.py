"""Qwen-Image's autoencoder in MLX: diffusers' AutoencoderKLQwenImage (Wan 2.1's causal 3D video VAE, fine-tuned)
run on single frames, NHWC.

Images are (B, H, W, 3) in [-1, 1]; latents (B, H/8, W/8, z_dim) for the released model (8 = 2 ** the number of
downsampling levels). The interface is our other VAEs' (`engine/vae.py`): `encode` -> the posterior's (mean,
logvar), `decode`, `decode_tiled`/`encode_tiled`, and the sampler's latent space (`to_latents`/`from_latents`,
`latent_shape`, `latent_downscale`), so the shared pipeline uses it unchanged.

One frame of a causal video VAE is a 2D VAE, exactly:
- a causal 3D convolution pads time with 2p zeros *before* the frames (kernel 3 with p = 1, kernel 1 with p = 0),
  so on one frame every temporal tap but the last reads zeros: it is the 2D convolution with the kernel's last
  temporal slice (`map_qwenimage_vae_weight` keeps that slice);
- the temporal resamplers' `time_conv`s never run on the first chunk of Wan's feature cache: the decoder's
  "upsample3d" marks its cache "Rep" and skips it, the encoder's "downsample3d" only caches its input; and the
  whole image is that first (only) chunk. So "upsample3d"/"downsample3d" are "upsample2d"/"downsample2d" here,
  and the `time_conv` weights are not loaded;
- the RMS norms (`QwenImageRMS_norm`: x / ||x|| over channels * sqrt(C) * gamma) and the attention blocks
  already work frame by frame.

The latent space the sampler works in is what Qwen-Image's pipelines feed the transformer, before packing:
(z - latents_mean) / latents_std per channel, z the posterior mean (the edit pipelines' `retrieve_latents(...,
sample_mode="argmax")`). The 2x2 packing into tokens is the transformer's, as for FLUX.1.

`decode` clamps to [-1, 1], as diffusers' `_decode` does. diffusers' `dropout` (inactive in inference) is not
a parameter here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.layers import Conv2d, Linear
from mlx_sd_server.engine.vae import BandedConv2d, run_tiled, split_moments

# AutoencoderKLQwenImage's defaults (Qwen-Image's released VAE): per-channel statistics of its latents
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

UPSAMPLE_MODES = ("upsample2d", "upsample3d")
DOWNSAMPLE_MODES = ("downsample2d", "downsample3d")


@dataclass
class QwenImageVAEConfig:
    """AutoencoderKLQwenImage's config.json, with its defaults."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # must be empty (see __post_init__)
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (diffusers' spelling) time only: no effect here
    input_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            # diffusers reads the downscale from temperal_downsample and the levels from dim_mult: they must agree
            raise ValueError(
                f"AutoencoderKLQwenImage: {len(self.temperal_downsample)} temperal_downsample flags for "
                f"{len(self.dim_mult)} levels (dim_mult); expected {len(self.dim_mult) - 1}"
            )
        if self.attn_scales:
            # diffusers' encoder would put attention blocks in its levels, but then cannot run: its `encode` passes
            # the feature cache to every level's block and the attention block's forward takes none (Wan's too)
            raise ValueError(
                f"AutoencoderKLQwenImage: attn_scales {list(self.attn_scales)} (attention in the encoder's levels) "
                "is not supported: diffusers cannot run it either, and no released model has it"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"AutoencoderKLQwenImage: {name} has {len(getattr(self, name))} values, z_dim is {self.z_dim}"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenImageVAEConfig:
        """From a diffusers vae/config.json dict (unknown keys ignored, lists as tuples)."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known and v is not None
        }
        return cls(**kwargs)

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel along each side (diffusers' `spatial_compression_ratio`): 8 as released."""
        return 2 ** len(self.temperal_downsample)


class QwenImageRMSNorm(nn.Module):
    """diffusers' QwenImageRMS_norm over the channel (last) axis: x / ||x|| * sqrt(C) * gamma, i.e. x / rms(x) * gamma.

    F.normalize divides by max(||x||, 1e-12); rms_norm's eps of 1e-24 / C is that clamp squared, per channel, which
    differs only for vectors of norm ~1e-12 (zero stays zero). Half-precision inputs are normalised in float32,
    as diffusers does."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))
        self.eps = 1e-24 / dim

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.gamma.astype(x.dtype), self.eps)


class QwenImageResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = QwenImageRMSNorm(in_dim)
        self.conv1 = BandedConv2d(in_dim, out_dim)
        self.norm2 = QwenImageRMSNorm(out_dim)
        self.conv2 = BandedConv2d(out_dim, out_dim)
        if in_dim != out_dim:
            self.conv_shortcut = Conv2d(in_dim, out_dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class QwenImageAttentionBlock(nn.Module):
    """Single-head self-attention over the frame's pixels, with a residual connection (diffusers' 1x1
    convolutions `to_qkv` and `proj` as linears, so that they quantize)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = QwenImageRMSNorm(dim)
        self.to_qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, h * w, 3 * c)
        q, k, v = mx.split(qkv, 3, axis=-1)
        return x + self.proj(attention(q, k, v).reshape(b, h, w, c))


class QwenImageResample(nn.Module):
    """A spatial 2x resampler. Up: nearest 2x (diffusers' "nearest-exact", the same at 2x) then a 3x3 conv that
    halves the channels; down: zero padding at the bottom and right, then a stride-2 3x3 conv. `resample` keeps
    diffusers' Sequential indices (0: the upsampling or padding, 1: the conv), so the weights keep their names.
    The "3d" modes' `time_conv` does not run on a single frame (see the module docstring)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode in UPSAMPLE_MODES:
            self.resample = [nn.Identity(), BandedConv2d(dim, dim // 2)]
        elif mode in DOWNSAMPLE_MODES:
            self.resample = [nn.Identity(), Conv2d(dim, dim, 3, stride=2)]
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.upsample = mode in UPSAMPLE_MODES

    def __call__(self, x: mx.array) -> mx.array:
        conv = self.resample[1]
        if self.upsample:
            return conv(x, upsample=True)  # never holds the whole upsampled image on the CPU
        return conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class QwenImageMidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [QwenImageResidualBlock(dim, dim) for _ in range(2)]
        self.attentions = [QwenImageAttentionBlock(dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class QwenImageEncoder3d(nn.Module):
    def __init__(self, config: QwenImageVAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = BandedConv2d(config.input_channels, dims[0])
        # one flat list as in diffusers: each level's residual blocks, then its resampler (all but the last)
        self.down_blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(config.num_res_blocks):
                self.down_blocks.append(QwenImageResidualBlock(out_dim if j else in_dim, out_dim))
            if i != len(config.dim_mult) - 1:
                self.down_blocks.append(QwenImageResample(out_dim, "downsample2d"))
        self.mid_block = QwenImageMidBlock(dims[-1])
        self.norm_out = QwenImageRMSNorm(dims[-1])
        self.conv_out = Conv2d(dims[-1], 2 * config.z_dim, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for layer in self.down_blocks:  # evaluated layer by layer: the full-resolution activations are the peak
            x = layer(x)
            mx.eval(x)
        return self.conv_out(nn.silu(self.norm_out(self.mid_block(x))))


class QwenImageUpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = [QwenImageResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:])]
        self.upsamplers = [QwenImageResample(out_dim, "upsample2d")] if upsample else []

    @property
    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.upsamplers]


class QwenImageDecoder3d(nn.Module):
    def __init__(self, config: QwenImageVAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *reversed(mult))]
        self.conv_in = Conv2d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = QwenImageMidBlock(dims[0])
        # after the first, each block's input has half the channels: the upsampler's conv halves them
        self.up_blocks = [
            QwenImageUpBlock(in_dim // 2 if i else in_dim, out_dim, config.num_res_blocks, i != len(mult) - 1)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
        ]
        self.norm_out = QwenImageRMSNorm(dims[-1])
        self.conv_out = BandedConv2d(dims[-1], config.input_channels)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            for layer in block.layers:  # evaluated layer by layer, as in the encoder
                x = layer(x)
                mx.eval(x)
        return self.conv_out(nn.silu(self.norm_out(x)))


class AutoencoderKLQwenImage(nn.Module):
    """Qwen-Image's VAE on single images (see the module docstring), with our VAEs' interface."""

    def __init__(self, config: QwenImageVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = QwenImageEncoder3d(config)
        self.quant_conv = Conv2d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = Conv2d(config.z_dim, config.z_dim, 1)
        self.decoder = QwenImageDecoder3d(config)

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return self.config.latent_scale

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    # --- the latent space the sampler works in ---------------------------------------------------------

    @property
    def latent_downscale(self) -> int:
        """Image pixels per pixel of the sampler's latents (`to_latents`' output) along each side."""
        return self.latent_scale

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape of n images' latents in the sampler's space: (n, height/d, width/d, z_dim)."""
        d = self.latent_downscale
        return n, height // d, width // d, self.config.z_dim

    def _statistics(self) -> tuple[mx.array, mx.array]:
        return mx.array(self.config.latents_mean, dtype=mx.float32), mx.array(self.config.latents_std, mx.float32)

    def to_latents(self, mean: mx.array) -> mx.array:
        """Posterior means (B, h, w, z_dim), as `encode` gives them -> the sampler's latents, float32:
        (mean - latents_mean) / latents_std per channel, as the pipelines normalise encoded images."""
        latents_mean, latents_std = self._statistics()
        return (mean.astype(mx.float32) - latents_mean) / latents_std

    def from_latents(self, latents: mx.array) -> mx.array:
        """The inverse of `to_latents`: the sampler's (float32) latents -> the latents `decode` takes."""
        latents_mean, latents_std = self._statistics()
        return latents.astype(mx.float32) * latents_std + latents_mean

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Images (B, H, W, 3) in [-1, 1] -> the latent distribution's (mean, logvar), unnormalised."""
        return split_moments(self._moments(x))

    def decode(self, z: mx.array) -> mx.array:
        """Unnormalised latents (B, h, w, z_dim) -> images (B, h*f, w*f, 3), clamped to [-1, 1] as diffusers does."""
        return mx.clip(self.decoder(self.post_quant_conv(z.astype(self.dtype))), -1.0, 1.0)

    def decode_tiled(self, z: mx.array, tile: int = 64, overlap: int = 16) -> mx.array:
        """`decode` in overlapping `tile`x`tile` latent tiles (`overlap` latent pixels shared), cross-faded."""
        return run_tiled(self.decode, z, tile, overlap, in_step=1, out_step=self.latent_scale)

    def encode_tiled(self, x: mx.array, tile: int = 64, overlap: int = 16) -> tuple[mx.array, mx.array]:
        """`encode` in overlapping tiles; `tile` and `overlap` are in latent pixels, as in `decode_tiled`."""
        f = self.latent_scale
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of {f}")
        return split_moments(run_tiled(self._moments, x, tile, overlap, in_step=f, out_step=1))

    def _moments(self, x: mx.array) -> mx.array:
        """The encoder's output through quant_conv: mean and logvar concatenated along channels."""
        return self.quant_conv(self.encoder(x.astype(self.dtype)))


# --- weights: diffusers' names are ours; the layouts change and the temporal parts go --------------------


def map_qwenimage_vae_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers AutoencoderKLQwenImage state-dict entry as our (key, value) pairs.

    - causal 3D conv weights (O, I, T, H, W) -> the last temporal slice as a 2D conv, OHWI: on one frame the
      causal padding puts zeros under every other tap (module docstring), so this is exact;
    - the resamplers' `time_conv`s: dropped (they never run on a first frame);
    - the attention's 1x1 conv `to_qkv`/`proj` (O, I, 1, 1) -> linear (O, I); the RMS norms' `gamma` (C, 1, 1[, 1])
      -> (C,); the resamplers' 2D convs (O, I, H, W) -> OHWI.
    """
    if ".time_conv." in key:
        return []
    if key.endswith(".gamma"):
        return [(key, value.reshape(-1))]
    if value.ndim == 5:
        value = value[:, :, -1]
    if value.ndim == 4:
        attention_projection = key.endswith((".to_qkv.weight", ".proj.weight"))
        value = value[:, :, 0, 0] if attention_projection else value.transpose(0, 2, 3, 1)
    return [(key, value)]


AUTOENCODER_KL_QWENIMAGE = ComponentKind(
    ("AutoencoderKLQwenImage",), QwenImageVAEConfig, AutoencoderKLQwenImage, map_qwenimage_vae_weight
)
