"""Linear/Conv2d: half-precision weights are computed in float32 on the CPU and rounded back.

The reference is the same product done by hand in float32 and rounded to the half dtype, so the match is
to the rounding of the last bit (0 or 1 ulp: 2^-11 relative for float16, 2^-8 for bfloat16). float32
layers must be exactly mlx.nn's.

QuantizedLinear: on the CPU a dequantized float32 product. Against mx.quantized_matmul on the same packed
weight: in float32 the summation order only (1e-5 of the output's scale); in float16 MLX's CPU
quantized_matmul accumulates in half precision (2.4e-3 to 4.6e-3 of the scale off the exact product here),
so the bound is 8 ulps, and ours must be within 1 ulp of the exact (float64) product of the dequantized weight.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sd_server.engine import model_io
from mlx_sd_server.engine.ops import cpu_kernels, layers
from mlx_sd_server.engine.ops.layers import Conv2d, Linear, QuantizedLinear
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


def quantized_layer(bits: int, bias: bool, dtype: mx.Dtype, inputs: int = 256, outputs: int = 96) -> QuantizedLinear:
    linear = Linear(inputs, outputs, bias=bias)
    linear.weight = mx.random.normal((outputs, inputs), key=mx.random.key(6)) * 0.05
    if bias:
        linear.bias = mx.random.normal((outputs,), key=mx.random.key(7))
    linear.set_dtype(dtype)
    return linear.to_quantized(group_size=64, bits=bits)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 21])
def test_quantized_linear_matches_quantized_matmul(bits, bias, dtype, rows):
    layer = quantized_layer(bits, bias, dtype)
    assert type(layer) is QuantizedLinear and layer.scales.dtype == dtype
    x = mx.random.normal((rows, 3, 256), key=mx.random.key(8)).astype(dtype)
    expected = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=64,
                                   bits=bits)
    if bias:
        expected = expected + layer.bias
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 3, 96)
    tolerance = 1e-5 if dtype == mx.float32 else 8 * ULP[dtype]
    assert max_rel(out, expected) <= tolerance
    # mlx.nn's own layer (what runs on Metal and CUDA) on the same parameters
    theirs = nn.QuantizedLinear(256, 96, bias, group_size=64, bits=bits)
    theirs.update(layer.parameters())
    assert max_rel(out, theirs(x)) <= tolerance
    # the exact product of x and the dequantized weight
    weight = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32), 64, bits)
    exact = np.asarray(x.astype(mx.float32), np.float64) @ np.asarray(weight, np.float64).T
    if bias:
        exact += np.asarray(layer.bias.astype(mx.float32), np.float64)
    assert max_rel(out, mx.array(exact.astype(np.float32))) <= (1e-6 if dtype == mx.float32 else ULP[dtype])


@pytest.mark.parametrize("rows, dequantized", [(1, False), (QuantizedLinear.QMM_MAX_ROWS, False),
                                                (QuantizedLinear.QMM_MAX_ROWS + 1, True)])
def test_quantized_linear_dequantizes_for_more_than_a_few_rows(rows, dequantized, monkeypatch):
    layer = quantized_layer(4, True, mx.float16)
    calls = []
    real = cpu_kernels.dequantize
    monkeypatch.setattr(cpu_kernels, "dequantize", lambda *a: calls.append(a) or real(*a))
    out = layer(mx.random.normal((rows, 256), key=mx.random.key(10)).astype(mx.float16))
    assert out.dtype == mx.float16 and out.shape == (rows, 96)
    assert bool(calls) == dequantized


def test_quantized_linear_is_mlx_nn_off_the_cpu(monkeypatch):
    layer = quantized_layer(4, True, mx.float32)
    x = mx.random.normal((4, 256), key=mx.random.key(9))
    theirs = nn.QuantizedLinear(256, 96, True, group_size=64, bits=4)
    theirs.update(layer.parameters())
    monkeypatch.setattr(layers, "on_cpu", lambda: False)
    assert mx.array_equal(layer(x), theirs(x))


def test_nn_quantize_of_our_linears_gives_ours_with_mlx_parameters():
    model = nn.Sequential(Linear(128, 64), Linear(64, 32, bias=False), nn.Linear(64, 8))
    reference = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32, bias=False), nn.Linear(64, 8))
    reference.update(model.parameters())
    nn.quantize(model, 64, 4)
    nn.quantize(reference, 64, 4)
    assert [type(m) for m in model.layers] == [QuantizedLinear, QuantizedLinear, nn.QuantizedLinear]
    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(reference.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    # quantized activations are not ours to replace
    assert type(Linear(64, 32, bias=False).to_quantized(mode="mxfp8", quantize_input=True)) is nn.QQLinear


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_save_load_round_trip(bits, tmp_path, monkeypatch):
    """model_io quantizes per tensor with mx.quantize and loads through nn.quantize: our layers, mlx's files."""
    config = {"architectures": ["T5EncoderModel"], "vocab_size": 50, "d_model": 64, "d_kv": 16, "d_ff": 128,
              "num_layers": 1, "num_heads": 4, "feed_forward_proj": "gated-gelu"}
    source = model_io.component_kind("text_encoder_3", config).build(config)
    mx.eval(source.parameters())
    quantization = {"group_size": 64, "bits": bits}
    entry = model_io.save_component(tmp_path, "text_encoder_3", config, tree_flatten(source.parameters()),
                                    mx.float32, quantization)
    model = model_io.load_component(tmp_path, "text_encoder_3", entry, mx.float32)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == 7 and all(type(m) is QuantizedLinear and m.bits == bits for m in quantized)
    saved = mx.load(str(tmp_path / entry["weights"]))
    quantized_paths = {path for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert {k for k in saved if k.endswith((".scales", ".biases"))} == {
        f"{path}.{p}" for path in quantized_paths for p in ("scales", "biases")}
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ours = model(ids)
    nn.quantize(source, 64, bits, class_predicate=model_io.quantizable(64))  # the same weights, never saved
    assert max_rel(ours, source(ids)) <= 1e-6
    monkeypatch.setattr(layers, "on_cpu", lambda: False)  # mlx.nn's quantized_matmul, same weights
    assert max_rel(ours, model(ids)) <= 1e-5
