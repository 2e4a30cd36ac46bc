"""Hires fix's latent upscaling: A1111's "Latent" modes, which enlarge the first pass's latents by
`torch.nn.functional.interpolate` before the second pass re-noises them.

Computed in numpy as torch computes it (align_corners=False, the size given, so the scale is in/out; bicubic's
A = -0.75), one axis at a time. A1111's antialiased variants equal these when enlarging, except the bicubic
one (torch's antialiased bicubic uses A = -0.5), which has no mode here.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# our hr_upscaler name -> torch's interpolate mode
LATENT_UPSCALE_MODES = {
    "latent": "bilinear",
    "latent-bicubic": "bicubic",
    "latent-nearest": "nearest",
    "latent-nearest-exact": "nearest-exact",
}
BICUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 neighbours at fractional offsets t, shape (len(t), 4)."""
    a = BICUBIC_A
    distances = np.stack([t + 1, t, 1 - t, 2 - t], axis=1)
    near = ((a + 2) * distances - (a + 3)) * distances * distances + 1
    far = ((a * distances - 5 * a) * distances + 8 * a) * distances - 4 * a
    return np.where(distances <= 1, near, far)


def _resize_axis(x: np.ndarray, axis: int, size: int, mode: str) -> np.ndarray:
    length = x.shape[axis]
    scale = length / size
    out = np.arange(size, dtype=np.float64)
    if mode in ("nearest", "nearest-exact"):
        source = np.floor((out + (0.5 if mode == "nearest-exact" else 0.0)) * scale).astype(np.int64)
        return np.take(x, np.minimum(source, length - 1), axis=axis)
    centre = (out + 0.5) * scale - 0.5
    shape = [1] * x.ndim
    shape[axis] = size
    if mode == "bilinear":
        centre = np.maximum(centre, 0.0)
        low = np.floor(centre).astype(np.int64)
        high = np.minimum(low + 1, length - 1)
        weight = (centre - low).astype(np.float32).reshape(shape)
        return np.take(x, low, axis=axis) * (1 - weight) + np.take(x, high, axis=axis) * weight
    if mode == "bicubic":
        floor = np.floor(centre)
        weights = _cubic_weights(centre - floor).astype(np.float32)
        result = np.zeros([size if i == axis else n for i, n in enumerate(x.shape)], np.float32)
        for k in range(4):
            index = np.clip(floor.astype(np.int64) - 1 + k, 0, length - 1)
            result += np.take(x, index, axis=axis) * weights[:, k].reshape(shape)
        return result
    raise ValueError(f"unknown latent upscale mode {mode!r}")


def upscale_latents(latents: mx.array, height: int, width: int, upscaler: str) -> mx.array:
    """(n, h, w, C) latents -> (n, height, width, C) by the `LATENT_UPSCALE_MODES` mode `upscaler` names."""
    mode = LATENT_UPSCALE_MODES[upscaler]
    x = np.array(latents.astype(mx.float32))
    x = _resize_axis(_resize_axis(x, 1, height, mode), 2, width, mode)
    return mx.array(x).astype(latents.dtype)
