"""The Stable Diffusion VAE (diffusers' AutoencoderKL) and FLUX.2's (AutoencoderKLFlux2) in MLX, NHWC.

Images are (B, H, W, 3) in [-1, 1]; latents are (B, H/f, W/f, C) with f = `latent_scale` (8 for SD).
`encode`/`decode` work on *unscaled* latents. The autoencoder also owns the latent space the sampler works in:
`to_latents` takes posterior means there ((mean - shift_factor) * scaling_factor), `from_latents` back, and
`latent_shape` gives its shape for an image size; the pipeline asks these, never the factors.

Precision: SDXL's VAE overflows in float16. Its config says so with `force_upcast`; the loader then keeps
the VAE's weights in float32 (`model_io.load_model`), and `encode`/`decode` cast their input to the dtype of
the weights, so float16 latents from a float16 UNet decode in float32.

Large images: `decode_tiled`/`encode_tiled` run the model on overlapping tiles and cross-fade them linearly,
bounding peak memory by the tile size. `should_tile` says when the pipeline should use them.

FLUX.2's autoencoder is the same network (other defaults, 32 latent channels, optionally other decoder
widths) plus the running statistics of a batch norm over its 2x2-patchified latents. diffusers' pipelines,
not its VAE, patchify and normalise with them; here that is its latent space (`Flux2Autoencoder.to_latents`:
128 channels at 1/16 of the image for the released 8x VAE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.ops import cpu_kernels
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.group_norm import GroupNorm
from mlx_sd_server.engine.ops.layers import Conv2d, Linear

# Above this many latent pixels (a 1024x1024 image at f=8) decoding switches to tiles: the full-size
# decoder's activations (128 channels at full image resolution) and its mid-block attention (one head over
# every latent pixel, quadratic in their count) grow past a few GB beyond this point, while below it the
# untiled decode fits comfortably and is exact.
MAX_UNTILED_LATENT_PIXELS = 128 * 128
# In low-memory mode, anything above SD 1.5's 512x512: SDXL's 1024x1024 decode goes from ~2.7 GB over the
# weights to a 512x512 tile's ~0.7 GB.
MAX_UNTILED_LATENT_PIXELS_LOW_MEMORY = 64 * 64


def should_tile(latent_h: int, latent_w: int, low_memory: bool = False) -> bool:
    """Whether a latent of this size should go through `decode_tiled`/`encode_tiled`."""
    limit = MAX_UNTILED_LATENT_PIXELS_LOW_MEMORY if low_memory else MAX_UNTILED_LATENT_PIXELS
    return latent_h * latent_w > limit


_Config = TypeVar("_Config", bound="VAEConfig")


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    force_upcast: bool = False  # run in float32 even when the rest of the model is float16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    decoder_block_out_channels: tuple[int, ...] | None = None  # (AutoencoderKLFlux2) None: block_out_channels

    @classmethod
    def from_dict(cls: type[_Config], d: dict) -> _Config:
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known and v is not None
        }
        return cls(**kwargs)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels


@dataclass
class Flux2VAEConfig(VAEConfig):
    """AutoencoderKLFlux2's config, with its defaults. It has no scaling or shift factor: the batch-norm
    statistics stand in for them, so they are the identity here."""

    latent_channels: int = 32
    scaling_factor: float = 1.0
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)


class BandedConv2d(Conv2d):
    """A 3x3, padding-1 convolution that works through large images in bands of rows, on the CPU.

    There a convolution's workspace is ~9x its input; at full image resolution that is the VAE's memory
    peak (a 512x512x256 conv: 2.4 GB as one op, 38 MB a band). Each band is cut from the input
    with its one-row halo, padded on its own, and written into the output, so neither a full-size padded
    copy nor a list of bands to concatenate exists. Same parameters and results as
    `Conv2d(in, out, 3, padding=1)`; small inputs, and GPUs, take the plain path.
    """

    BAND_PIXELS = 4096  # 8 rows at 512 wide: ~40 MB of workspace for 256 channels, GEMMs still large

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array, upsample: bool = False) -> mx.array:
        """The convolution of x, or with `upsample` of x's 2x nearest upsampling, built band by band."""
        batch, height, width, _ = x.shape
        if upsample:
            height, width = 2 * height, 2 * width
        if self.takes_winograd(height, width):  # no bands needed: it works through the image in groups of rows
            return self.winograd(x, upsample)
        if height * width <= self.BAND_PIXELS or not cpu_kernels.on_cpu():
            return super().__call__(upsample_2x(x) if upsample else x)
        rows = max(1, self.BAND_PIXELS // width)
        result, out = cpu_kernels.new_output((batch, height, width, self.weight.shape[0]))
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            first, last = max(top - 1, 0), min(bottom + 1, height)  # the band's input rows, with halo
            if upsample:  # upsample only the source rows this band reads
                with_halo = upsample_2x(x[:, first // 2 : (last - 1) // 2 + 1])[:, first % 2 :][:, : last - first]
            else:
                with_halo = x[:, first:last]
            # zero rows only where the halo falls outside the image
            padded = mx.pad(with_halo, [(0, 0), (int(top == 0), int(bottom == height)), (1, 1), (0, 0)])
            out[:, top:bottom] = self.convolve(padded, (0, 0)) + self.bias.astype(mx.float32)
        return result.astype(x.dtype)


def upsample_2x(x: mx.array) -> mx.array:
    """Nearest-neighbour 2x upsampling of NHWC x."""
    B, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = BandedConv2d(in_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = BandedConv2d(out_channels, out_channels)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.norm1.silu_conv(self.conv1, x)
        h = self.norm2.silu_conv(self.conv2, h)
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=1e-6)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = [Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = attention(q, k, v)
        return x + self.to_out[0](h).reshape(B, H, W, C)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for layer in self.attentions:
            x = layer(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # Asymmetric padding (bottom/right only), as in the original LDM encoder.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = BandedConv2d(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x, upsample=True)  # never holds the whole upsampled image on the CPU


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * layers
        self.resnets = [ResnetBlock(channels[i], channels[i + 1], groups) for i in range(layers)]
        self.downsamplers = [Downsample(out_channels)] if downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.downsamplers:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * layers
        self.resnets = [ResnetBlock(channels[i], channels[i + 1], groups) for i in range(layers)]
        self.upsamplers = [Upsample(out_channels)] if upsample else []

    @property
    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.upsamplers]


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = BandedConv2d(config.in_channels, widths[0])
        self.down_blocks = [
            EncoderBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups, i < len(widths) - 1)
            for i in range(len(widths))
        ]
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_norm_out.silu_conv(self.conv_out, x)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.decoder_widths)), config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            DecoderBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, i < len(widths) - 1)
            for i in range(len(widths))
        ]
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = BandedConv2d(widths[-1], config.out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        # Evaluated layer by layer: as one lazy graph the decoder keeps many full-resolution intermediates
        # alive at once (SD's VAE at 256x256: 2.6 GB over the weights as one graph, 1.6 GB staged).
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            for layer in block.layers:
                x = layer(x)
                mx.eval(x)
        return self.conv_norm_out.silu_conv(self.conv_out, x)


class Autoencoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * latent, 2 * latent, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(latent, latent, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    # --- the latent space the sampler works in ---------------------------------------------------------

    @property
    def latent_downscale(self) -> int:
        """Image pixels per pixel of the sampler's latents (`to_latents`' output) along each side."""
        return self.latent_scale

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape of n images' latents in the sampler's space: (n, height/d, width/d, channels)."""
        d = self.latent_downscale
        return n, height // d, width // d, self.config.latent_channels

    def to_latents(self, mean: mx.array) -> mx.array:
        """Posterior means (B, h, w, C), as `encode` gives them -> the sampler's latents, float32:
        (mean - shift_factor) * scaling_factor."""
        return (mean.astype(mx.float32) - self.shift_factor) * self.scaling_factor

    def from_latents(self, latents: mx.array) -> mx.array:
        """The inverse of `to_latents`: the sampler's (float32) latents -> the latents `decode` takes."""
        return latents / self.scaling_factor + self.shift_factor

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Images (B, H, W, 3) in [-1, 1] -> the latent distribution's (mean, logvar), unscaled."""
        return split_moments(self._moments(x))

    def decode(self, z: mx.array) -> mx.array:
        """Unscaled latents (B, h, w, C) -> images (B, h*f, w*f, 3), roughly in [-1, 1] (not clipped)."""
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

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
        """The encoder's output: mean and logvar concatenated along channels."""
        moments = self.encoder(x.astype(self.dtype))
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        return moments


class LatentBatchNorm(nn.Module):
    """diffusers' `bn` of AutoencoderKLFlux2 (a BatchNorm2d without affine parameters), as FLUX.2's pipelines
    use it: only its running statistics, per channel of the patchified latents, never batch statistics."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))

    def _mean_std(self) -> tuple[mx.array, mx.array]:
        # float32 whatever the weights' dtype: the latents the denoiser sees are float32
        mean, var = self.running_mean.astype(mx.float32), self.running_var.astype(mx.float32)
        return mean, mx.sqrt(var + self.eps)

    def normalize(self, x: mx.array) -> mx.array:
        """(x - mean) / sqrt(var + eps) over the last (channel) axis, in float32."""
        mean, std = self._mean_std()
        return (x.astype(mx.float32) - mean) / std

    def denormalize(self, x: mx.array) -> mx.array:
        """The inverse of `normalize`, in float32."""
        mean, std = self._mean_std()
        return x.astype(mx.float32) * std + mean


class Flux2Autoencoder(Autoencoder):
    """AutoencoderKLFlux2: `encode`/`decode` as diffusers' (unnormalised, unpatchified latents) plus the
    batch-norm statistics its pipelines apply between the VAE and the transformer.

    In diffusers the normalisation lives in the pipelines (`Flux2KleinPipeline._encode_vae_image` after
    encoding, the end of `__call__` before decoding); the VAE only holds the statistics and never runs `bn`.
    """

    config: Flux2VAEConfig

    def __init__(self, config: Flux2VAEConfig):
        super().__init__(config)
        if config.patch_size[0] != config.patch_size[1]:
            raise ValueError(f"AutoencoderKLFlux2: a {config.patch_size} patch is not square")
        self.bn = LatentBatchNorm(math.prod(config.patch_size) * config.latent_channels, config.batch_norm_eps)

    @property
    def latent_downscale(self) -> int:
        """The VAE's downscale times the patch: 16 for the released autoencoder."""
        return self.latent_scale * self.config.patch_size[0]

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        d = self.latent_downscale
        return n, height // d, width // d, self.config.latent_channels * math.prod(self.config.patch_size)

    def to_latents(self, mean: mx.array) -> mx.array:
        """Posterior means -> the transformer's latents: `normalize_latents` (patchified, normalised), float32."""
        return self.normalize_latents(mean)

    def from_latents(self, latents: mx.array) -> mx.array:
        """The inverse of `to_latents`: `denormalize_latents`."""
        return self.denormalize_latents(latents)

    def normalize_latents(self, z: mx.array) -> mx.array:
        """Posterior means (B, h, w, C) -> the transformer's latents (B, h/p, w/p, C*p*p), p x p the patch:
        patchified, then (z - bn_mean) / sqrt(bn_var + eps). float32."""
        return self.bn.normalize(patchify_latents(z, self.config.patch_size))

    def denormalize_latents(self, latents: mx.array) -> mx.array:
        """The inverse of `normalize_latents`: the transformer's latents -> latents `decode` takes. float32."""
        return unpatchify_latents(self.bn.denormalize(latents), self.config.patch_size)


def patchify_latents(z: mx.array, patch_size: tuple[int, int] = (2, 2)) -> mx.array:
    """(B, h, w, C) -> (B, h/ph, w/pw, C*ph*pw), each patch's channels ordered (c, patch row, patch col),
    as diffusers' `Flux2Pipeline._patchify_latents` orders the NCHW channels."""
    b, h, w, c = z.shape
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch {ph}x{pw}")
    z = z.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(b, h // ph, w // pw, c * ph * pw)


def unpatchify_latents(z: mx.array, patch_size: tuple[int, int] = (2, 2)) -> mx.array:
    """The inverse of `patchify_latents`: (B, h, w, C*ph*pw) -> (B, h*ph, w*pw, C)."""
    b, h, w, cp = z.shape
    ph, pw = patch_size
    z = z.reshape(b, h, w, cp // (ph * pw), ph, pw).transpose(0, 1, 4, 2, 5, 3)
    return z.reshape(b, h * ph, w * pw, cp // (ph * pw))


def split_moments(moments: mx.array) -> tuple[mx.array, mx.array]:
    """An encoder's output (mean and logvar concatenated along channels) -> (mean, clamped logvar)."""
    mean, logvar = mx.split(moments, 2, axis=-1)
    return mean, mx.clip(logvar, -30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the same way


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced starts of `tile`-long tiles covering [0, size), neighbours sharing at least `overlap`
    (the VAE's tiled decode and encode, and the upscalers' tiles)."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _fade_weights(starts: list[int], tile: int, out_step: int) -> list[np.ndarray]:
    """Per tile, output-space weights ramping linearly across each overlap with a neighbour.

    Neighbours share the same ramp over their overlap, so their weights sum to one there.
    """
    out_tile = tile * out_step
    position = np.arange(out_tile) + 0.5
    weights = []
    for i, start in enumerate(starts):
        w = np.ones(out_tile, dtype=np.float32)
        if i > 0:
            w = np.minimum(w, position / ((starts[i - 1] + tile - start) * out_step))
        if i < len(starts) - 1:
            w = np.minimum(w, (out_tile - position) / ((start + tile - starts[i + 1]) * out_step))
        weights.append(w)
    return weights


def run_tiled(
    fn: Callable[[mx.array], mx.array], x: mx.array, tile: int, overlap: int, in_step: int, out_step: int
) -> mx.array:
    """Apply `fn` tile by tile and blend the results.

    Tiles are laid out on the latent grid: one latent pixel is `in_step` pixels of `x` and `out_step`
    pixels of `fn`'s output. Each tile is evaluated before the next, so peak memory is one tile's
    activations plus the output.
    """
    if not 0 < overlap < tile:
        raise ValueError(f"overlap must be in [1, tile), got tile={tile}, overlap={overlap}")
    B, H, W = x.shape[0], x.shape[1] // in_step, x.shape[2] // in_step
    tile_h, tile_w = min(tile, H), min(tile, W)
    rows, cols = tile_starts(H, tile_h, overlap), tile_starts(W, tile_w, overlap)
    total: mx.array | None = None  # made at the first tile, which gives the output's channels
    weight_sum = mx.zeros((H * out_step, W * out_step, 1), dtype=mx.float32)
    for y, wy in zip(rows, _fade_weights(rows, tile_h, out_step)):
        for x0, wx in zip(cols, _fade_weights(cols, tile_w, out_step)):
            out = fn(x[:, y * in_step : (y + tile_h) * in_step, x0 * in_step : (x0 + tile_w) * in_step, :])
            if total is None:
                total = mx.zeros((B, H * out_step, W * out_step, out.shape[-1]), dtype=mx.float32)
            weight = mx.array(wy[:, None, None] * wx[None, :, None])
            oy, ox = y * out_step, x0 * out_step
            total[:, oy : oy + tile_h * out_step, ox : ox + tile_w * out_step, :] += out.astype(mx.float32) * weight
            weight_sum[oy : oy + tile_h * out_step, ox : ox + tile_w * out_step, :] += weight
            mx.eval(total, weight_sum)
    assert total is not None  # (tile_starts gives at least one tile)
    return (total / weight_sum).astype(out.dtype)


# --- weights: diffusers' names are ours; only old-style attention names (diffusers < 0.14) and layouts change

# Old diffusers names of the mid-block attention's projections -> current names.
LEGACY_ATTENTION_NAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}
ATTENTION_PROJECTIONS = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")


def map_vae_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers VAE state-dict entry as our (key, value) pairs (conv weights OIHW -> OHWI)."""
    for old, new in LEGACY_ATTENTION_NAMES.items():
        key = key.replace(old, new)
    if value.ndim == 4:
        # Some checkpoints store the attention projections as 1x1 convolutions.
        projection = any(name in key for name in ATTENTION_PROJECTIONS)
        value = value[:, :, 0, 0] if projection else value.transpose(0, 2, 3, 1)
    return [(key, value)]


def map_flux2_vae_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """`map_vae_weight`, less the batch norm's step counter (only its running statistics are used)."""
    return [] if key == "bn.num_batches_tracked" else map_vae_weight(key, value)


AUTOENCODER_KL = ComponentKind(("AutoencoderKL",), VAEConfig, Autoencoder, map_vae_weight)
AUTOENCODER_KL_FLUX2 = ComponentKind(
    ("AutoencoderKLFlux2",),
    Flux2VAEConfig,
    Flux2Autoencoder,
    map_flux2_vae_weight,
    float32_parameters=("bn.running_mean", "bn.running_var"),
)


def downscale_factor(config: dict) -> int:
    """How many image pixels a latent pixel spans along a side, from the VAE's config (8 for SD's four levels)."""
    return 2 ** (len(config.get("block_out_channels", VAEConfig.block_out_channels)) - 1)
