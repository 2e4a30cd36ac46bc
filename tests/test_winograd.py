"""Winograd's F(2x2, 3x3) on the CPU (engine/ops/winograd.py) against MLX's own convolution.

The reference is mx.conv2d in float32 on the same input; the bound is 2e-6 of the output's scale (measured:
4-8e-7 at SD's shapes, bench/conv.py), far inside the 1e-4 the component parity tests allow.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd_server.engine import adapters
from mlx_sd_server.engine.ops import layers, winograd
from mlx_sd_server.engine.ops.group_norm import GroupNorm
from mlx_sd_server.engine.ops.group_norm import GroupNorm
from mlx_sd_server.engine.ops.layers import Conv2d
from mlx_sd_server.engine.vae import BandedConv2d


def max_rel(a: mx.array, b: mx.array) -> float:
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def upsampled(x: mx.array) -> mx.array:
    return mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)


@pytest.mark.parametrize(
    "shape, out_channels",
    [((1, 2, 2, 3), 5), ((2, 6, 10, 16), 8), ((1, 34, 64, 32), 32), ((2, 32, 32, 40), 24), ((1, 8, 300, 8), 4)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv3x3_matches_mlx_convolution(shape, out_channels, bias, monkeypatch):
    monkeypatch.setattr(winograd, "GROUP_ELEMENTS", 16 * shape[-1] * 64)  # several groups per image: seams
    x = mx.random.normal(shape, key=mx.random.key(0))
    weight = mx.random.normal((out_channels, 3, 3, shape[-1]), key=mx.random.key(1)) / (3 * shape[-1] ** 0.5)
    b = mx.random.normal((out_channels,), key=mx.random.key(2)) if bias else None
    expected = mx.conv2d(x, weight, padding=1) + (b if bias else 0)
    out = winograd.conv3x3(x, winograd.transform_kernel(weight), b)
    assert out.shape == expected.shape and out.dtype == mx.float32
    assert max_rel(out, expected) <= 2e-6


def test_conv3x3_of_the_upsampled_input():
    x = mx.random.normal((2, 5, 7, 6), key=mx.random.key(3))
    weight = mx.random.normal((4, 3, 3, 6), key=mx.random.key(4))
    out = winograd.conv3x3(x, winograd.transform_kernel(weight), upsample=True)
    assert max_rel(out, mx.conv2d(upsampled(x), weight, padding=1)) <= 2e-6


def test_layers_take_winograd_only_where_it_applies():
    conv = Conv2d(8, 8, 3, padding=1)
    assert conv.takes_winograd(32, 32) and conv.takes_winograd(64, 16)
    assert not conv.takes_winograd(31, 64)  # odd side: 2x2 tiles do not cover it
    assert not conv.takes_winograd(16, 16)  # small: MLX's own convolution is as fast
    assert not Conv2d(8, 8, 3, padding=1, stride=2).takes_winograd(64, 64)
    assert not Conv2d(8, 8, 3).takes_winograd(64, 64)  # padding 0
    assert not Conv2d(8, 8, 1).takes_winograd(64, 64)
    wide = Conv2d(1280, 1280, 3, padding=1)
    assert not wide.takes_winograd(64, 64)  # its transform would be 105 MB
    assert Conv2d(640, 640, 3, padding=1).takes_winograd(64, 64)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_conv2d_and_banded_conv_use_it(dtype):
    x = mx.random.normal((1, 32, 40, 8), key=mx.random.key(5)).astype(dtype)
    tolerance = 2e-6 if dtype == mx.float32 else 2.0**-10  # float16: the float32 result's rounding
    for layer in (Conv2d(8, 6, 3, padding=1), BandedConv2d(8, 6)):
        layer.set_dtype(dtype)
        assert layer.takes_winograd(32, 40)
        out = layer(x)
        layer.set_dtype(mx.float32)
        assert out.dtype == dtype
        assert max_rel(out, nn.Conv2d.__call__(layer, x.astype(mx.float32))) <= tolerance
    banded = BandedConv2d(8, 6)
    half = x[:, :16, :20].astype(mx.float32)
    assert max_rel(banded(half, upsample=True), nn.Conv2d.__call__(banded, upsampled(half))) <= 2e-6


def test_new_weights_get_a_new_transform():
    """A load or a fused LoRA replaces the weight array: the kept transform must not outlive it."""
    conv = Conv2d(8, 8, 3, padding=1)
    x = mx.random.normal((1, 32, 32, 8), key=mx.random.key(6))
    conv(x)
    delta = adapters.Adapter(mx.ones((2, 3, 3, 8)) * 0.1, mx.ones((8, 2)), 1.0)
    fused = adapters.fused(conv, [delta])
    assert max_rel(fused(x), nn.Conv2d.__call__(fused, x)) <= 2e-6
    assert max_rel(conv(x), nn.Conv2d.__call__(conv, x)) <= 2e-6  # the original keeps its own
    conv.weight = conv.weight * 2
    assert max_rel(conv(x), nn.Conv2d.__call__(conv, x)) <= 2e-6


def test_off_the_cpu_kernels_it_is_mlx(monkeypatch):
    monkeypatch.setattr(layers, "on_cpu", lambda: False)
    assert not Conv2d(8, 8, 3, padding=1).takes_winograd(64, 64)


@pytest.mark.parametrize("height", [32, 33])  # 33: odd, the plain GroupNorm then convolution
def test_group_norm_silu_conv_is_the_three_in_a_row(height):
    norm, conv = GroupNorm(4, 16, eps=1e-6), Conv2d(16, 8, 3, padding=1)
    norm.weight = mx.random.normal((16,), key=mx.random.key(7))
    norm.bias = mx.random.normal((16,), key=mx.random.key(8))
    x = mx.random.normal((2, height, 34, 16), key=mx.random.key(9)) * 3 + 1
    expected = nn.Conv2d.__call__(conv, nn.silu(nn.GroupNorm.__call__(norm, x)))
    assert conv.takes_winograd(height, 34) == (height == 32)
    assert max_rel(norm.silu_conv(conv, x), expected) <= 2e-5


def test_low_memory_keeps_no_transforms():
    """transform_each_call (what load_model does in low-memory mode): same results, nothing kept."""
    conv = Conv2d(8, 8, 3, padding=1)
    x = mx.random.normal((1, 32, 32, 8), key=mx.random.key(10))
    kept = conv(x)
    assert "_winograd_kernel" in conv.__dict__
    layers.transform_each_call(nn.Sequential(conv))
    assert "_winograd_kernel" not in conv.__dict__
    assert mx.array_equal(conv(x), kept).item() and "_winograd_kernel" not in conv.__dict__
    assert adapters.fused(conv, []).keeps_winograd_kernel is False  # a fused LoRA's copy keeps the setting
