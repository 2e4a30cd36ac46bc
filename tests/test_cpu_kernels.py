"""The numpy CPU kernels (SiLU, GELUs, GroupNorm) against float64 references and MLX's own ops.

Tolerances: SiLU and quick-GELU are a float32 exp and divide (a few ulps: 1e-6 relative to the output's
scale); the GELU's erf approximation has absolute error <= 1.5e-7 (Abramowitz & Stegun 7.1.26), so its
bound is absolute, 2e-7 * |x|. GroupNorm on values offset by 1000 (float32 resolution there: 6e-5, 2e-5
of the spread): 1e-4 of the output's scale, where a one-pass float32 variance (E[x^2] ~ 1e6) is off by
~1e-2 (the reason for two passes).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd_server.engine import activations, cpu_kernels
from mlx_sd_server.engine.group_norm import GroupNorm


def sample(shape=(2, 9, 11, 24), scale=6.0, seed=0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    x.reshape(-1)[:6] = [0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30]  # exp overflow/underflow edges
    return x


@pytest.fixture(params=[cpu_kernels.ELEMENTS_PER_BLOCK, 7], ids=["default-blocks", "7-element-blocks"])
def block(request, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ELEMENTS_PER_BLOCK", request.param)
    return request.param


def silu64(x, slope=1.0):
    return x / (1.0 + np.exp(-slope * x))


def gelu64(x):
    return x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize("name, reference", [("silu", silu64), ("quick_gelu", lambda x: silu64(x, 1.702))])
def test_sigmoid_family_matches_float64(name, reference, block):
    x = sample()
    out = np.asarray(getattr(cpu_kernels, name)(mx.array(x)))
    expected = reference(x.astype(np.float64))
    assert out.shape == x.shape and np.isfinite(out).all()
    assert np.max(np.abs(out - expected)) <= 1e-6 * np.max(np.abs(expected))


def test_gelu_matches_erf_gelu(block):
    x = sample()
    out = np.asarray(cpu_kernels.gelu(mx.array(x)))
    expected = gelu64(x.astype(np.float64))
    assert np.isfinite(out).all()
    assert np.all(np.abs(out - expected) <= 2e-7 * np.maximum(np.abs(x), 1.0))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_reduced_precision_in_and_out(dtype):
    x = mx.array(sample(scale=2.0)).astype(dtype)
    for name, ours in [("silu", cpu_kernels.silu), ("gelu", cpu_kernels.gelu)]:
        out = ours(x)
        assert out.dtype == dtype, name
        expected = (silu64 if name == "silu" else gelu64)(np.asarray(x.astype(mx.float32), dtype=np.float64))
        assert np.max(np.abs(np.asarray(out.astype(mx.float32)) - expected)) <= 2e-2 * np.max(np.abs(expected))


def test_activations_dispatch_to_the_kernels_on_the_cpu():
    x = mx.array(sample(scale=3.0))
    assert mx.default_device() == mx.cpu
    for ours, mlx_op in [(activations.silu, nn.silu), (activations.gelu, nn.gelu),
                         (activations.quick_gelu, lambda t: t * mx.sigmoid(1.702 * t))]:
        assert np.allclose(np.asarray(ours(x)), np.asarray(mlx_op(x)), rtol=1e-5, atol=1e-6)


def group_norm64(x, groups, weight, bias, eps):
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(np.float64).reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    out = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return out * weight + bias if weight is not None else out


@pytest.mark.parametrize("shape, groups", [((2, 9, 11, 24), 4), ((1, 5, 7, 32), 32), ((3, 77, 16), 8)],
                         ids=["nhwc", "one-channel-groups", "sequence"])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_float64(shape, groups, affine, block):
    x = sample(shape, scale=3.0) + 1000.0  # a large offset: a one-pass float32 variance would fail
    x.reshape(-1)[:6] = 1000.0
    rng = np.random.default_rng(1)
    weight = rng.standard_normal(shape[-1]).astype(np.float32) if affine else None
    bias = rng.standard_normal(shape[-1]).astype(np.float32) if affine else None
    out = np.asarray(cpu_kernels.group_norm(mx.array(x), groups, None if weight is None else mx.array(weight),
                                            None if bias is None else mx.array(bias), 1e-5))
    expected = group_norm64(x, groups, weight, bias, 1e-5)
    assert np.max(np.abs(out - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_group_norm_module_uses_the_kernel_and_keeps_dtype():
    norm = GroupNorm(4, 24)
    norm.weight, norm.bias = mx.arange(24) / 24.0, mx.ones(24)
    x = mx.array(sample(scale=2.0))
    expected = group_norm64(np.asarray(x), 4, np.asarray(norm.weight), np.asarray(norm.bias), norm.eps)
    assert np.max(np.abs(np.asarray(norm(x)) - expected)) <= 1e-5
    assert norm(x.astype(mx.float16)).dtype == mx.float16


def test_geglu_is_first_half_times_gelu_of_second(block):
    h = sample((2, 7, 2 * 12))
    out = np.asarray(cpu_kernels.geglu(mx.array(h)))
    a, gate = h[..., :12].astype(np.float64), h[..., 12:].astype(np.float64)
    expected = a * gelu64(gate)
    assert out.shape == (2, 7, 12)
    assert np.all(np.abs(out - expected) <= 2e-7 * np.maximum(np.abs(a * gate), 1.0) + 1e-6 * np.abs(expected))
    assert np.allclose(np.asarray(activations.geglu(mx.array(h))), out)


def test_group_norm_then_silu_is_fused_exactly(block):
    norm = GroupNorm(4, 24)
    norm.weight, norm.bias = mx.arange(24) / 12.0 - 1.0, mx.ones(24) * 0.5
    x = mx.array(sample(scale=2.0))
    expected = silu64(group_norm64(np.asarray(x), 4, np.asarray(norm.weight), np.asarray(norm.bias), norm.eps))
    assert np.max(np.abs(np.asarray(norm.with_silu(x)) - expected)) <= 1e-5
