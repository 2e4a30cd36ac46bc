"""GroupNorm that keeps float32 precision at full image resolution.

`mlx.nn.GroupNorm(pytorch_compatible=True)` computes each group's statistics in one pass; over the
hundreds of thousands of values a VAE group holds at 512x512 its float32 error grows to ~2.4e-4 (1.8e-3 at
1024x1024), 8x per doubling of the side (bench/realsize_parity.py). Two passes — the mean, then the
variance of the centred values — stay at ~1e-5, as torch does. Statistics are taken in float32 whatever
the input dtype, so float16 models do not overflow in the sum of squares. On the CPU the numpy kernel in
cpu_kernels.py does the same 3-6x faster than MLX's CPU backend (bench/kernel_speed.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernels
from .layers import Conv2d


class GroupNorm(nn.GroupNorm):
    """Same parameters (`weight`, `bias`) and semantics as `nn.GroupNorm(..., pytorch_compatible=True)`."""

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, dims, eps=eps, affine=affine, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        if cpu_kernels.on_cpu():
            return self._cpu(x, then_silu=False)
        batch, channels = x.shape[0], x.shape[-1]
        groups = x.astype(mx.float32).reshape(batch, -1, self.num_groups, channels // self.num_groups)
        centred = groups - groups.mean(axis=(1, 3), keepdims=True)
        variance = mx.square(centred).mean(axis=(1, 3), keepdims=True)
        out = (centred * mx.rsqrt(variance + self.eps)).reshape(x.shape).astype(x.dtype)
        return out * self.weight + self.bias if "weight" in self else out

    def with_silu(self, x: mx.array) -> mx.array:
        """silu(self(x)), in one pass on the CPU."""
        return self._cpu(x, then_silu=True) if cpu_kernels.on_cpu() else nn.silu(self(x))

    def silu_conv(self, conv: nn.Module, x: mx.array) -> mx.array:
        """conv(silu(self(x))), a resnet's way in. On the CPU, before a Winograd convolution, the norm and
        SiLU are applied as the convolution reads its input: one full-size buffer fewer, one pass fewer."""
        if not isinstance(conv, Conv2d) or not conv.takes_winograd(x.shape[1], x.shape[2]):  # e.g. a LoRA's branch
            return conv(self.with_silu(x))
        affine = "weight" in self
        factors = cpu_kernels.group_norm_affine(
            x, self.num_groups, self.weight if affine else None, self.bias if affine else None, self.eps
        )
        return conv.winograd(x, norm_silu=factors)

    def _cpu(self, x: mx.array, then_silu: bool) -> mx.array:
        affine = "weight" in self
        return cpu_kernels.group_norm(
            x, self.num_groups, self.weight if affine else None, self.bias if affine else None, self.eps, then_silu
        )
