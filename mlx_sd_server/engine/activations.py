"""SiLU and the GELUs, on MLX's kernels on the GPU and on numpy's on the CPU (see cpu_kernels.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernels
from .cpu_kernels import on_cpu


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return cpu_kernels.silu(x) if on_cpu() else nn.silu(x)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf-based) GELU."""
    return cpu_kernels.gelu(x) if on_cpu() else nn.gelu(x)


def geglu(h: mx.array) -> mx.array:
    """a * gelu(gate) for h = [a, gate] (halves of the last axis), the UNet's gated feed-forward."""
    if on_cpu():
        return cpu_kernels.geglu(h)
    a, gate = mx.split(h, 2, axis=-1)
    return a * nn.gelu(gate)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x), OpenAI CLIP's activation."""
    return cpu_kernels.quick_gelu(x) if on_cpu() else x * mx.sigmoid(1.702 * x)
