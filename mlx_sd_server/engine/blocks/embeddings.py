"""Embeddings more than one family uses: sinusoidal timesteps and their MLPs (the UNet, FLUX.1, SD3, FLUX.2), the
timestep + pooled-text embedding of the DiTs (FLUX.1, SD3), and rotary position embeddings (FLUX.1, FLUX.2).

Parameter names are diffusers' (`linear_1`, `timestep_embedder`, ...), so the families' weights load as they are.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.layers import Linear

TIME_CHANNELS = 256  # sinusoidal channels of the DiTs' timestep and guidance embeddings
ROPE_THETA = 10000


# --- timesteps --------------------------------------------------------------------------------------


def timestep_embedding(t: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float, scale: float = 1.0) -> mx.array:
    """Sinusoidal embedding of (possibly fractional) timesteps (N,) -> (N, dim), float32. `scale` multiplies the
    angles t * freq (diffusers' Timesteps(scale=...), Qwen-Image's 1000: not the same rounding as scaling t)."""
    half = dim // 2
    # The exponents in float32 as diffusers computes them, their exp in float64 rounded once: MLX's float32 exp
    # puts most of these a step away from torch's (2 of 128 differ this way), which cost every family's time
    # embedding, and so its parity with diffusers, up to ~1e-4 relative.
    exponents = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = mx.array(np.exp(exponents.astype(np.float64)).astype(np.float32))
    args = t.astype(mx.float32)[:, None] * freqs[None]
    if scale != 1.0:
        args = args * scale
    sin, cos = mx.sin(args), mx.cos(args)
    return mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def sigma_sinusoids(sigma: mx.array, dtype: mx.Dtype, channels: int = TIME_CHANNELS) -> mx.array:
    """The DiTs' timestep (and guidance) sinusoids: sigmas (N,) in [0, 1] scaled by 1000, cos first, in `dtype`.

    Computed in float32 (diffusers first rounds the sigma to the model dtype: 0.7 in bfloat16 is 0.69921875).
    """
    return timestep_embedding(sigma * 1000, channels, flip_sin_to_cos=True, freq_shift=0).astype(dtype)


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear; with `cond_proj_dim`, a projected condition (LCM's guidance embedding) is added first.
    `bias` is diffusers' sample_proj_bias (FLUX.2's have none)."""

    def __init__(self, in_channels: int, dim: int, cond_proj_dim: int | None = None, bias: bool = True):
        super().__init__()
        if cond_proj_dim is not None:
            self.cond_proj = Linear(cond_proj_dim, in_channels, bias=False)
        self.linear_1 = Linear(in_channels, dim, bias=bias)
        self.linear_2 = Linear(dim, dim, bias=bias)

    def __call__(self, x: mx.array, condition: mx.array | None = None) -> mx.array:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """diffusers' CombinedTimestep(Guidance)TextProjEmbeddings: timestep (+ guidance) + pooled text."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # PixArtAlphaTextProjection: the same MLP

    def __call__(self, timestep: mx.array, guidance: mx.array | None, pooled: mx.array, dtype: mx.Dtype) -> mx.array:
        """The embedding of sigmas `timestep` (B,) in [0, 1] (scaled by 1000 here), guidance (B,) and pooled text."""
        emb = self.timestep_embedder(sigma_sinusoids(timestep, dtype))
        if "guidance_embedder" in self:
            if guidance is None:
                raise ValueError("this model embeds a guidance scale (FLUX.1 dev): pass guidance")
            emb = emb + self.guidance_embedder(sigma_sinusoids(guidance, dtype))
        return emb + self.text_embedder(pooled)


# --- rotary position embeddings ---------------------------------------------------------------------


def rope_angles(ids: mx.array, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> tuple[mx.array, mx.array]:
    """cos and sin (L, head_dim/2), float32, of the rotation angles of each token's pairs of channels:
    per axis i, ids[:, i] * theta^(-2k/dim_i) for k < dim_i/2 (diffusers' FluxPosEmbed and Flux2PosEmbed
    (theta 2000, 4 axes), without the repeat-interleave: `apply_rope` uses each angle for both channels of
    its pair)."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** (-mx.arange(0, dim, 2, dtype=mx.float32) / dim)
        angles.append(ids[:, axis : axis + 1].astype(mx.float32) * freqs)
    joined = mx.concatenate(angles, axis=-1)
    return mx.cos(joined), mx.sin(joined)


@mx.compile
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the channel pairs (2i, 2i+1) of x (B, heads, L, D) by the angles of `rope_angles`, in float32
    (as diffusers' apply_rotary_emb); compiled, so each half is one fused kernel with no float32 copy of x."""
    pairs = x.reshape(*x.shape[:-1], -1, 2).astype(mx.float32)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = [(a * cos - b * sin).astype(x.dtype), (b * cos + a * sin).astype(x.dtype)]
    return mx.stack(rotated, axis=-1).reshape(x.shape)
