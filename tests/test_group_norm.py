"""Our GroupNorm against a float64 reference, at the sizes where MLX's one-pass GroupNorm loses precision."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd_server.engine.ops.group_norm import GroupNorm
from parity import max_rel_err


def reference(x: np.ndarray, groups: int, eps: float, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    b, h, w, c = x.shape
    g = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    normed = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + eps)
    return normed.reshape(x.shape) * weight + bias


@pytest.mark.parametrize("side", [64, 512])
def test_group_norm_matches_float64_at_image_resolution(side):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, side, side, 64)) * 3 + 5).astype(np.float32)  # offset: where one pass suffers
    norm = GroupNorm(32, 64, eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, 64).astype(np.float32))
    norm.bias = mx.array(rng.standard_normal(64).astype(np.float32))
    expected = reference(x, 32, 1e-6, np.array(norm.weight), np.array(norm.bias))
    assert max_rel_err(norm(mx.array(x)), expected) < 2e-5
    norm.set_dtype(mx.float16)  # a float16 model: statistics still in float32, result in float16
    half = norm(mx.array(x).astype(mx.float16))
    assert half.dtype == mx.float16 and max_rel_err(half, expected) < 5e-3
