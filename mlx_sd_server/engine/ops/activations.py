"""SiLU and the GELUs, on MLX's kernels on the GPU and on numpy's on the CPU (see cpu_kernels.py)."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.ops.cpu_kernels import on_cpu

from . import cpu_kernels


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return cpu_kernels.silu(x) if on_cpu() else nn.silu(x)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf-based) GELU."""
    return cpu_kernels.gelu(x) if on_cpu() else nn.gelu(x)


def gelu_approx(x: mx.array) -> mx.array:
    """The tanh-approximate GELU, x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): torch's
    gelu(approximate="tanh"), transformers' gelu_new; the FLUX transformer's and T5 v1.1's activation."""
    return cpu_kernels.gelu_tanh(x) if on_cpu() else _gelu_approx_float32(x)


@partial(mx.compile, shapeless=True)
def _gelu_approx_float32(x: mx.array) -> mx.array:
    """The tanh formula evaluated in float32 and rounded to x's dtype, as torch does for half inputs.

    It is `nn.gelu_approx`'s formula, which on float32 matches torch to float32 precision; nn.gelu_approx
    itself would evaluate a half input in half precision (and x^3 overflows float16 for |x| > 40).
    """
    y = x.astype(mx.float32)
    return (0.5 * y * (1 + mx.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))).astype(x.dtype)


def geglu(h: mx.array) -> mx.array:
    """a * gelu(gate) for h = [a, gate] (halves of the last axis), the UNet's gated feed-forward."""
    if on_cpu():
        return cpu_kernels.geglu(h)
    a, gate = mx.split(h, 2, axis=-1)
    return a * nn.gelu(gate)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x), OpenAI CLIP's activation."""
    return cpu_kernels.quick_gelu(x) if on_cpu() else x * mx.sigmoid(1.702 * x)
