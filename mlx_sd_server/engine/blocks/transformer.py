"""Transformer pieces more than one family uses: adaLN modulation (FLUX.1, SD3) and diffusers' FeedForward
(GELU in the DiTs, GEGLU in the UNet's transformer blocks).

Parameter names are diffusers' (`linear`, `net.0.proj`, `net.2`), so the families' weights load as they are.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.ops.activations import geglu, gelu_approx
from mlx_sd_server.engine.ops.layers import Linear


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """The adaLN of every DiT block: a LayerNorm without affine (eps 1e-6), scaled and shifted per sample."""
    return mx.fast.layer_norm(x, None, None, 1e-6) * (1 + scale[:, None]) + shift[:, None]


class Modulation(nn.Module):
    """The `linear` of diffusers' AdaLayerNormZero(-Single) and AdaLayerNormContinuous: n vectors per sample
    from silu(temb), which the model computes once for all blocks."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = Linear(dim, n * dim)
        self.n = n

    def __call__(self, cond: mx.array) -> list[mx.array]:
        return self.linear(cond).split(self.n, axis=-1)


class GELU(nn.Module):
    """diffusers' GELU(approximate="tanh"): a projection, then the tanh GELU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.proj = Linear(dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_approx(self.proj(x))


class GEGLU(nn.Module):
    """diffusers' GEGLU: one projection to twice the width, its halves as value and (exact GELU) gate."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.proj = Linear(dim, 2 * hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return geglu(self.proj(x))


ACTIVATIONS = {"gelu-approximate": GELU, "geglu": GEGLU}  # by diffusers' activation_fn names


class FeedForward(nn.Module):
    """diffusers' FeedForward with 4x width: `activation` is its activation_fn."""

    def __init__(self, dim: int, activation: str = "gelu-approximate"):
        super().__init__()
        # diffusers' layout is [activation, Dropout, Linear]; the identity keeps the names `net.0` and `net.2`.
        self.net = [ACTIVATIONS[activation](dim, 4 * dim), nn.Identity(), Linear(4 * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x
