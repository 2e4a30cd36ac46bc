"""3x3 convolutions on the CPU by Winograd's F(2x2, 3x3): 16 multiplies per 2x2 outputs instead of 36.

MLX's CPU convolution copies its input nine times over (im2col) and runs one GEMM: at SD's shapes 1.5-3x
torch's (oneDNN) convolution (bench/conv.py). Winograd's transform needs 2.25x fewer multiplies: each 4x4
input tile d (stride 2) becomes V = B^T d B, each kernel g becomes U = G g G^T, the 16 positions of the
tiles are 16 GEMMs (tiles x C) @ (C x O), and the 2x2 outputs come back as A^T M A. The transforms are only
additions (and halves, exact in binary), so float32 results stay within ~1e-6 of a direct convolution
(tests/test_winograd.py).

Each worker thread (cpu_kernels' pool, one per core) takes groups of tile rows through all three stages
in its own scratch, sized to stay near its caches: the zero-padded input rows (the padding, a 2x nearest
upsampling, or a preceding GroupNorm and SiLU are applied while copying them in), the input transform,
16 GEMMs on numpy's BLAS (one thread each: faster than one multi-threaded GEMM at these sizes), the output
transform plus the bias, written straight into the MLX result. No padded, upsampled, normalised or
transformed copy of the whole input exists, so full-resolution VAE layers need no bands.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from . import cpu_kernels

# G, the kernel transform of F(2, 3) (B^T and A^T are written out as additions below).
KERNEL_TRANSFORM = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)
# Transformed-input floats per group (16 x tiles x channels): 16 MB, GEMMs of hundreds of rows or more.
GROUP_ELEMENTS = 4 * 1024 * 1024

_scratch = threading.local()


class TransformedKernel(NamedTuple):
    """A conv weight (O, 3, 3, C) and its transform U (16, C, O) float32; `source` says which weight."""

    source: mx.array
    u: np.ndarray


def transform_kernel(weight: mx.array) -> TransformedKernel:
    """U = G g G^T for each (output, input) channel pair of an OHWI 3x3 weight, as (16, C, O) float32."""
    g = np.asarray(weight.astype(mx.float32))
    u = np.einsum("ai,oijc,bj->abco", KERNEL_TRANSFORM, g, KERNEL_TRANSFORM, optimize=True)
    return TransformedKernel(weight, np.ascontiguousarray(u.reshape(16, g.shape[-1], g.shape[0]), np.float32))


def fits(height: int, width: int) -> bool:
    """Whether a padding-1 3x3 convolution's output of this size tiles by 2x2 (both sides even)."""
    return height % 2 == 0 and width % 2 == 0


def conv3x3(
    x: mx.array,
    kernel: TransformedKernel,
    bias: mx.array | None = None,
    upsample: bool = False,
    norm_silu: tuple[np.ndarray, np.ndarray] | None = None,
) -> mx.array:
    """The padding-1, stride-1 3x3 convolution of NHWC `x` (of its 2x nearest upsampling with `upsample`),
    plus `bias`, as float32. The output's sides must be even (`fits`).

    `norm_silu`, a (batch, channels) scale and shift: the convolution of silu(x * scale + shift) instead (a
    GroupNorm, `cpu_kernels.group_norm_affine`, and the SiLU before a resnet's convolutions), applied to the
    rows as they are copied in, so the normalised activations never exist in full.
    """
    xn = np.asarray(x.astype(mx.float32))
    batch, in_h, in_w, channels = xn.shape
    height, width = (2 * in_h, 2 * in_w) if upsample else (in_h, in_w)
    outputs = kernel.u.shape[-1]
    tile_rows, tile_cols = height // 2, width // 2
    per_group = max(1, GROUP_ELEMENTS // (16 * channels * tile_cols))
    groups = math.ceil(tile_rows / per_group)
    per_group = math.ceil(tile_rows / groups)
    units = [(b, r, min(r + per_group, tile_rows)) for b in range(batch) for r in range(0, tile_rows, per_group)]
    result, out = cpu_kernels.new_output((batch, height, width, outputs))
    shift = None if bias is None else np.asarray(bias.astype(mx.float32))

    def work(start: int, stop: int) -> None:
        for b, first, last in units[start:stop]:
            rows, tiles = last - first, (last - first) * tile_cols
            slab = _buffer("slab", (2 * rows + 2, width + 2, channels))
            _fill_slab(
                slab, xn[b], 2 * first - 1, upsample, None if norm_silu is None else (norm_silu[0][b], norm_silu[1][b])
            )
            v = _buffer("v", (4, 4, rows, tile_cols, channels))
            d = _buffer("d", (4, rows, width + 2, channels))
            _bt([slab[k : k + 2 * rows : 2] for k in range(4)], d)  # B^T along the rows...
            for a in range(4):  # ...then along the columns
                _bt([d[a][:, k : k + 2 * tile_cols : 2] for k in range(4)], v[a])
            v16, m = v.reshape(16, tiles, channels), _buffer("m", (16, tiles, outputs))
            for i in range(16):
                np.matmul(v16[i], kernel.u[i], out=m[i])
            s = _buffer("s", (2, 4, rows, tile_cols, outputs))
            _at(m.reshape(4, 4, rows, tile_cols, outputs), s)  # A^T along the rows...
            for r in range(2):  # ...then along the columns, into every other row and column of the output
                dst = out[b, 2 * first + r : 2 * last : 2]
                _at(s[r], (dst[:, 0::2], dst[:, 1::2]))
                if shift is not None:
                    dst += shift

    cpu_kernels.in_parallel(work, len(units))
    return result


def _fill_slab(
    slab: np.ndarray, image: np.ndarray, top: int, upsample: bool, norm_silu: tuple[np.ndarray, np.ndarray] | None
) -> None:
    """slab[k] = padded row `top + k` of the (upsampled) image, silu(row * scale + shift) with `norm_silu`:
    zero outside the image, a zero column either side."""
    height = 2 * image.shape[0] if upsample else image.shape[0]
    slab[:, 0] = 0
    slab[:, -1] = 0
    first, last = max(0, -top), min(slab.shape[0], height - top)  # the slab rows inside the image
    slab[:first] = 0
    slab[last:] = 0
    if upsample:
        for k in range(first, last):
            source = image[(top + k) // 2]
            slab[k, 1:-1:2] = source
            slab[k, 2::2] = source
    else:
        slab[first:last, 1:-1] = image[top + first : top + last]
    if norm_silu is not None:
        inside = slab[first:last, 1:-1]
        scale, shift = norm_silu
        inside *= scale
        inside += shift
        cpu_kernels.silu_in_place(inside, _buffer("silu", inside.shape))


def _buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """This thread's scratch array `name` of `shape` (float32), kept and grown across calls: the pages of a
    fresh buffer would fault in on every group."""
    size = math.prod(shape)
    kept = getattr(_scratch, name, None)
    if kept is None or kept.size < size:
        kept = np.empty(size, np.float32)
        setattr(_scratch, name, kept)
    return kept[:size].reshape(shape)


def _bt(d: Sequence[np.ndarray] | np.ndarray, out: Sequence[np.ndarray] | np.ndarray) -> None:
    """B^T (d0, d1, d2, d3) = (d0 - d2, d1 + d2, d2 - d1, d1 - d3), into the 4 arrays of `out`."""
    d0, d1, d2, d3 = d
    np.subtract(d0, d2, out=out[0])
    np.add(d1, d2, out=out[1])
    np.subtract(d2, d1, out=out[2])
    np.subtract(d1, d3, out=out[3])


def _at(m: Sequence[np.ndarray] | np.ndarray, out: Sequence[np.ndarray] | np.ndarray) -> None:
    """A^T (m0, m1, m2, m3) = (m0 + m1 + m2, m1 - m2 - m3), into the 2 arrays of `out`."""
    m0, m1, m2, m3 = m
    first, second = out
    np.add(m0, m1, out=first)
    first += m2
    np.subtract(m1, m2, out=second)
    second -= m3
