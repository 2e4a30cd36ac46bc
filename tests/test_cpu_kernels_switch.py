"""$MLX_SD_CPU_KERNELS=0 turns the numpy CPU kernels off: every op module then calls MLX's own ops, as on
Metal and CUDA (what .ci/run's second pass of the pipeline parity tests relies on)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd_server.engine.ops import activations, attention, cpu_kernels, layers
from mlx_sd_server.engine.ops.group_norm import GroupNorm

KERNELS = (
    "silu",
    "gelu",
    "gelu_tanh",
    "geglu",
    "quick_gelu",
    "attention",
    "group_norm",
    "group_norm_affine",
    "dequantize",
    "new_output",
)


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True), (None, True)])
def test_the_variable_is_read_at_import(value, expected):
    env = {k: v for k, v in os.environ.items() if k != cpu_kernels.SWITCH_ENV}
    if value is not None:
        env[cpu_kernels.SWITCH_ENV] = value
    code = "from mlx_sd_server.engine.ops import cpu_kernels as k; print(k.ENABLED, k.on_cpu())"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.split() == [str(expected), str(expected)]


@pytest.fixture
def kernels_off(monkeypatch):
    """The switch off, and every numpy kernel made to fail if anything still calls it."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a numpy CPU kernel ran with MLX_SD_CPU_KERNELS=0")

    for name in KERNELS:
        monkeypatch.setattr(cpu_kernels, name, refuse)


def test_kernels_off_runs_mlxs_own_ops(kernels_off):
    assert mx.default_device() == mx.cpu and not cpu_kernels.on_cpu()
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 8, 8, 16)).astype(np.float32))
    assert mx.allclose(activations.silu(x), nn.silu(x)).item()
    assert mx.allclose(activations.gelu(x), nn.gelu(x)).item()
    assert mx.allclose(activations.quick_gelu(x), x * mx.sigmoid(1.702 * x)).item()
    assert activations.gelu_approx(x).shape == x.shape
    assert activations.geglu(x).shape == (2, 8, 8, 8)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 5, 8)).astype(np.float32)) for _ in range(3))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=8**-0.5, mask="causal")
    assert mx.array_equal(attention.attention(q, k, v, mask="causal"), expected).item()
    norm = GroupNorm(4, 16)
    assert norm(x).shape == norm.with_silu(x).shape == x.shape
    half = layers.Linear(16, 32)
    half.set_dtype(mx.float16)
    assert mx.array_equal(half(x.astype(mx.float16)), nn.Linear.__call__(half, x.astype(mx.float16))).item()
    quantized = layers.Linear(64, 32).to_quantized(group_size=64, bits=4)
    rows = mx.array(rng.standard_normal((16, 64)).astype(np.float32))  # above QMM_MAX_ROWS: dequantized if on
    assert mx.array_equal(quantized(rows), nn.QuantizedLinear.__call__(quantized, rows)).item()
    conv = layers.Conv2d(16, 8, 1)
    conv.set_dtype(mx.float16)
    assert mx.array_equal(conv(x.astype(mx.float16)), nn.Conv2d.__call__(conv, x.astype(mx.float16))).item()
    conv3 = layers.Conv2d(16, 8, 3, padding=1)  # no Winograd (engine/ops/winograd.py): MLX's convolution
    big = mx.array(rng.standard_normal((1, 32, 32, 16)).astype(np.float32))
    assert not conv3.takes_winograd(32, 32)
    assert mx.array_equal(norm.silu_conv(conv3, big), conv3(nn.silu(norm(big)))).item()
