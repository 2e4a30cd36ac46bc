"""Linear/Conv2d: half-precision weights are computed in float32 on the CPU and rounded back.

The reference is the same product done by hand in float32 and rounded to the half dtype, so the match is
to the rounding of the last bit (0 or 1 ulp: 2^-11 relative for float16, 2^-8 for bfloat16). float32
layers must be exactly mlx.nn's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd_server.engine.layers import Conv2d, Linear
from mlx_sd_server.engine.vae import BandedConv2d

ULP = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


def max_rel(a: mx.array, b: mx.array) -> float:
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_linear_is_a_rounded_float32_product(dtype):
    layer = Linear(48, 24)
    layer.set_dtype(dtype)
    x = mx.random.normal((3, 5, 48), key=mx.random.key(0)).astype(dtype)
    out = layer(x)
    expected = (x.astype(mx.float32) @ layer.weight.astype(mx.float32).T + layer.bias.astype(mx.float32)).astype(dtype)
    assert out.dtype == dtype
    assert max_rel(out, expected) <= ULP[dtype]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (1, 0)])
def test_half_conv_is_a_rounded_float32_convolution(dtype, stride, padding):
    layer = Conv2d(8, 16, 3, stride=stride, padding=padding)
    layer.set_dtype(dtype)
    x = mx.random.normal((2, 11, 9, 8), key=mx.random.key(1)).astype(dtype)
    out = layer(x)
    expected = (mx.conv2d(x.astype(mx.float32), layer.weight.astype(mx.float32), stride, padding)
                + layer.bias.astype(mx.float32)).astype(dtype)
    assert out.dtype == dtype
    assert max_rel(out, expected) <= ULP[dtype]


def test_float32_layers_are_mlx_nn_layers():
    x = mx.random.normal((2, 7, 6, 8), key=mx.random.key(2))
    ours, theirs = Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
    theirs.update(ours.parameters())
    assert mx.array_equal(ours(x), theirs(x))
    ours, theirs = Linear(8, 4), nn.Linear(8, 4)
    theirs.update(ours.parameters())
    assert mx.array_equal(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_banded_conv_matches_plain_conv(dtype, monkeypatch):
    monkeypatch.setattr(BandedConv2d, "BAND_PIXELS", 20)  # bands of 2 rows on a 10-wide image
    banded = BandedConv2d(4, 6)
    plain = Conv2d(4, 6, 3, padding=1)
    plain.update(banded.parameters())
    banded.set_dtype(dtype)
    plain.set_dtype(dtype)
    x = mx.random.normal((1, 9, 10, 4), key=mx.random.key(3)).astype(dtype)
    assert banded(x).dtype == dtype
    assert max_rel(banded(x), plain(x)) <= (1e-6 if dtype == mx.float32 else ULP[dtype])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_pointwise_conv_is_a_matmul_with_conv_results(dtype):
    ours, theirs = Conv2d(6, 5, 1), nn.Conv2d(6, 5, 1)
    theirs.update(ours.parameters())
    x = mx.random.normal((2, 7, 3, 6), key=mx.random.key(4))
    expected = theirs(x)
    ours.set_dtype(dtype)
    out = ours(x.astype(dtype))
    assert out.dtype == dtype and out.shape == expected.shape
    assert max_rel(out, expected) <= (1e-6 if dtype == mx.float32 else 2 * ULP[dtype])


@pytest.mark.parametrize("height", [9, 10])
def test_banded_conv_of_the_upsampled_input(height, monkeypatch):
    """Bands that read only their source rows give the convolution of the whole 2x upsampled image."""
    from mlx_sd_server.engine.vae import upsample_2x

    monkeypatch.setattr(BandedConv2d, "BAND_PIXELS", 3 * 14)  # 3-row bands of a 14-wide output: odd offsets
    banded = BandedConv2d(4, 6)
    x = mx.random.normal((2, height, 7, 4), key=mx.random.key(5))
    expected = Conv2d.__call__(banded, upsample_2x(x))
    assert max_rel(banded(x, upsample=True), expected) <= 1e-6
