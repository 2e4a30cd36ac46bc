"""The numpy CPU kernels (SiLU, GELUs, GroupNorm, dequantize) against float64 references and MLX's own ops.

Tolerances: SiLU and quick-GELU are a float32 exp and divide (a few ulps: 1e-6 relative to the output's
scale); the GELU's erf approximation has absolute error <= 1.5e-7 (Abramowitz & Stegun 7.1.26), so its
bound is absolute, 2e-7 * |x|. The tanh GELU is x sigmoid(2u) in float32: against float64 a few ulps of
max(|x|, 1) (the exp's argument carries float32's relative error), against torch's float32
gelu(approximate="tanh") 1e-6 of the output's scale. Dequantization is exact: the same q * scale + bias in
float32 as mx.dequantize. GroupNorm on values offset by 1000 (float32 resolution there: 6e-5, 2e-5
of the spread): 1e-4 of the output's scale, where a one-pass float32 variance (E[x^2] ~ 1e6) is off by
~1e-2 (the reason for two passes).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd_server.engine.ops import activations, cpu_kernels
from mlx_sd_server.engine.ops.group_norm import GroupNorm


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


def gelu_tanh64(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_gelu_tanh_matches_float64_and_torch(block):
    import torch

    x = sample()
    out = np.asarray(cpu_kernels.gelu_tanh(mx.array(x)))
    expected = gelu_tanh64(x.astype(np.float64))
    assert out.shape == x.shape and np.isfinite(out).all()
    assert np.all(np.abs(out - expected) <= 5e-7 * np.maximum(np.abs(x), 1.0))
    assert out.reshape(-1)[2] == 90.0 and out.reshape(-1)[3] == 0.0  # exp overflow: x for large x, -0 for large negative x
    theirs = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.max(np.abs(out - theirs)) <= 1e-6 * np.max(np.abs(theirs))
    # and MLX's own formula, what runs off the CPU, to the same precision
    mlx_formula = np.asarray(activations._gelu_approx_float32(mx.array(x)))
    assert np.max(np.abs(mlx_formula - theirs)) <= 1e-6 * np.max(np.abs(theirs))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_gelu_tanh_in_half_precision_is_the_rounded_float32_result(dtype):
    import torch

    x = mx.array(sample(scale=8.0)).astype(dtype)  # beyond |x| = 40 x^3 would overflow float16
    x = mx.concatenate([x.reshape(-1), mx.array([60.0, -60.0], dtype)])
    out = cpu_kernels.gelu_tanh(x)
    assert out.dtype == dtype
    x32 = np.asarray(x.astype(mx.float32))
    expected = gelu_tanh64(x32.astype(np.float64))
    ulp = 2.0**-10 if dtype == mx.float16 else 2.0**-7
    assert np.all(np.abs(np.asarray(out.astype(mx.float32)) - expected) <= ulp * np.maximum(np.abs(expected), 1e-3))
    torch_dtype = torch.float16 if dtype == mx.float16 else torch.bfloat16
    theirs = torch.nn.functional.gelu(torch.from_numpy(x32).to(torch_dtype), approximate="tanh").float().numpy()
    assert np.max(np.abs(np.asarray(out.astype(mx.float32)) - theirs)) <= ulp * np.max(np.abs(theirs))
    # MLX's float32 formula (what runs off the CPU) rounds to the same values, or 1 ulp apart at a tie
    mlx_formula = np.asarray(activations._gelu_approx_float32(x).astype(mx.float32))
    out32 = np.asarray(out.astype(mx.float32))
    assert np.all(np.abs(mlx_formula - out32) <= ulp * np.maximum(np.abs(expected), 1e-3))


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
                         (activations.quick_gelu, lambda t: t * mx.sigmoid(1.702 * t)),
                         (activations.gelu_approx, nn.gelu_approx)]:
        assert np.allclose(np.asarray(ours(x)), np.asarray(mlx_op(x)), rtol=1e-5, atol=1e-6)


def test_gelu_approx_dispatches_on_the_device(monkeypatch):
    x = mx.array(sample(scale=3.0))
    assert mx.array_equal(activations.gelu_approx(x), cpu_kernels.gelu_tanh(x))
    calls = []
    monkeypatch.setattr(cpu_kernels, "gelu_tanh", lambda t: calls.append(t) or t)
    activations.gelu_approx(x)
    assert len(calls) == 1
    monkeypatch.setattr(activations, "on_cpu", lambda: False)
    assert mx.array_equal(activations.gelu_approx(x), activations._gelu_approx_float32(x)) and len(calls) == 1


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


def quantized(shape, group_size, bits, seed=0):
    w = mx.random.normal(shape, key=mx.random.key(seed)) * 0.05
    return mx.quantize(w, group_size, bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_is_mlx_dequantize_in_float32(bits, group_size, block):
    w, scales, biases = quantized((40, 256), group_size, bits)
    out = cpu_kernels.dequantize(w, scales, biases, group_size, bits)
    assert out.dtype == mx.float32 and out.shape == (40, 256)
    assert mx.array_equal(out, mx.dequantize(w, scales, biases, group_size, bits))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_dequantize_with_half_scales_is_float32(dtype):
    w, scales, biases = quantized((24, 128), 64, 4, seed=1)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    out = cpu_kernels.dequantize(w, scales, biases, 64, 4)
    assert out.dtype == mx.float32
    assert mx.array_equal(out, mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), 64, 4))


@pytest.mark.parametrize("bits", [3, 6])
def test_dequantize_falls_back_to_mlx_for_other_widths(bits):
    w, scales, biases = quantized((8, 128), 64, bits, seed=2)
    out = cpu_kernels.dequantize(w, scales, biases, 64, bits)
    assert out.dtype == mx.float32 and mx.array_equal(out, mx.dequantize(w, scales, biases, 64, bits))
