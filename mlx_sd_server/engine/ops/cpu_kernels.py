"""numpy kernels for the ops that MLX's CPU backend runs slowly: attention, SiLU, the GELUs, GroupNorm,
and the dequantization of quantized weights.

MLX's CPU backend evaluates exp, sigmoid, erf and tanh with scalar code, one stream on one thread: 14-26 ns
per element on x86 (numpy's vectorized exp: ~0.9 ns). At SD's shapes that is most of a UNet step — the
softmax over 2 x 8 x 4096 x 4096 attention scores alone takes ~2.7 s per layer. These kernels evaluate
their MLX inputs, compute in float32 numpy on one thread per core (numpy releases the GIL) in blocks that
stay in the L2 cache, and write their result straight into an MLX array (returned in the input's dtype).
bench/kernel_speed.py, bench/attention.py and bench/engine.py measure them against torch. Used only when MLX
runs on the CPU (see activations.py, attention.py and layers.py); on Metal and CUDA MLX's own kernels are
fast.

`on_cpu()` is the one place that decides, for every op module (and the VAE's banded convolution).
$MLX_SD_CPU_KERNELS=0, read once at import, turns the kernels off: MLX's own ops then run on the CPU too, as
they do on Metal and CUDA, so that the code path users run on a GPU is tested on a CPU-only machine (.ci/run
runs the pipeline parity tests a second time with it), at MLX's CPU speed.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

# Scores per block: 256K float32 (1 MB) stay in a core's L2 cache through max, exp, sum and the matmul.
SCORES_PER_BLOCK = 256 * 1024
# Elements per block of an elementwise kernel (1 MB of float32: fewer numpy calls, still in L2).
ELEMENTS_PER_BLOCK = 256 * 1024
# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ...)) exp(-z^2), t = 1 / (1 + p z), z >= 0;
# absolute error <= 1.5e-7, float32's own resolution near 1.
ERF_P = 0.3275911
ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)

# The tanh GELU's sqrt(2/pi) (torch's approximate="tanh", transformers' gelu_new).
GELU_TANH_C = math.sqrt(2 / math.pi)

WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    """One worker per core; numpy's own BLAS is held to one thread so the workers do not oversubscribe."""
    global _pool
    if _pool is None:
        _limit_numpy_blas_threads()
        _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="cpu-kernel")
    return _pool


def _limit_numpy_blas_threads() -> None:
    # Only numpy's bundled OpenBLAS: the BLAS that MLX uses (preloaded, see blas.py) keeps its threads.
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and lib.filepath.startswith(numpy_dir):
            lib.set_num_threads(1)


def in_parallel(work: Callable[[int, int], None], total: int) -> None:
    """Run work(start, stop) over [0, total) split evenly across the worker threads."""
    pool = _threads()
    parts = min(WORKERS, total)
    bounds = [total * i // parts for i in range(parts + 1)]
    for future in [pool.submit(work, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]:
        future.result()


SWITCH_ENV = "MLX_SD_CPU_KERNELS"
ENABLED = os.environ.get(SWITCH_ENV, "1") != "0"  # "0": MLX's own ops everywhere (see the module docstring)


def on_cpu() -> bool:
    """Whether these kernels replace MLX's own: MLX computes on the CPU and $MLX_SD_CPU_KERNELS is not 0."""
    return ENABLED and mx.default_device() == mx.cpu


def _to_numpy(x: mx.array) -> np.ndarray:
    return np.asarray(x.astype(mx.float32))  # a view when x is already float32 (astype to its dtype is free)


def new_output(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
    """A float32 MLX array and a writable numpy view of its memory (MLX's buffer protocol shares it).

    Kernels write their result straight into MLX's memory: no numpy result plus an MLX copy of it, which
    at full image resolution would be two 268 MB buffers where one does.
    """
    out = mx.zeros(shape, mx.float32)
    mx.eval(out)
    return out, np.asarray(out)


def attention(
    q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None, heads_last: bool = False
) -> mx.array:
    """softmax(q k^T / sqrt(D) + mask) v for (B, heads, L, D) arrays, or (B, L, heads, D) ones with
    `heads_last` (the result in the same layout); `mask` boolean (True = attend) or additive, broadcastable
    to (B, heads, Lq, Lk).

    Heads are numpy views of the inputs (with `heads_last`, the layer needs no transposes); each worker
    copies the keys (transposed) and values of the head it is on, which BLAS multiplies faster than views,
    and scales each block of queries as it goes.
    """
    dtype = q.dtype
    qn, kn, vn = (_to_numpy(t) for t in (q, k, v))
    result, out = new_output(q.shape)
    if heads_last:  # as (B, heads, L, D) views
        qn, kn, vn, out = (t.transpose(0, 2, 1, 3) for t in (qn, kn, vn, out))
    B, H, Lq, D = qn.shape
    Lk = kn.shape[-2]
    scale = np.float32(D**-0.5)
    if mask is not None:
        additive = mask if mask.dtype != mx.bool_ else mx.where(mask, 0.0, -math.inf)
        maskn = np.broadcast_to(_to_numpy(additive), (B, H, Lq, Lk))  # a view: never B*H*Lq*Lk in memory
    rows = max(1, min(Lq, SCORES_PER_BLOCK // Lk))
    # (image, head, first query row) blocks: a single head (the VAE's) still keeps every core busy
    blocks = [(b, h, r) for b in range(B) for h in range(H) for r in range(0, Lq, rows)]

    def work(start: int, stop: int) -> None:
        head, kt, vh = None, None, None
        for b, h, r in blocks[start:stop]:
            if head != (b, h):  # this head's k^T and [v, 1], contiguous: BLAS multiplies them faster than views
                head, kt = (b, h), np.ascontiguousarray(kn[b, h].T)
                vh = np.ones((Lk, D + 1), np.float32)
                vh[:, :D] = vn[b, h]
            scores = (qn[b, h, r : r + rows] * scale) @ kt
            if mask is not None:
                scores += maskn[b, h, r : r + rows]
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            # The weights times [v, 1]: the unnormalised output and, in its last column, the weights' sums
            # (no pass of its own over the scores); normalise the (rows, D) output, not the weights.
            weighted = scores @ vh
            np.divide(weighted[:, :D], weighted[:, D:], out=out[b, h, r : r + rows])

    in_parallel(work, len(blocks))
    return result.astype(dtype)


def _elementwise(kernel: Callable[[np.ndarray, np.ndarray], None], x: mx.array) -> mx.array:
    """Apply kernel(block_in, block_out) over x in cache-sized float32 blocks, on every core."""
    flat = _to_numpy(x).reshape(-1)
    result, out = new_output(flat.shape)

    def work(start: int, stop: int) -> None:
        for i in range(start * ELEMENTS_PER_BLOCK, min(stop * ELEMENTS_PER_BLOCK, flat.size), ELEMENTS_PER_BLOCK):
            kernel(flat[i : i + ELEMENTS_PER_BLOCK], out[i : i + ELEMENTS_PER_BLOCK])

    in_parallel(work, -(-flat.size // ELEMENTS_PER_BLOCK))
    return result.reshape(x.shape).astype(x.dtype)


def _sigmoid_times_x(x: np.ndarray, out: np.ndarray, slope: float, scratch: np.ndarray) -> None:
    """out = x * sigmoid(slope x) = x / (1 + exp(-slope x)); `out` may be `x`, `scratch` may be `out` if it is not.

    exp overflows to inf for very negative x, giving -0.
    """
    np.multiply(x, -slope, out=scratch)
    with np.errstate(over="ignore"):
        np.exp(scratch, out=scratch)
    scratch += 1.0
    np.divide(x, scratch, out=out)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return _elementwise(lambda a, out: _sigmoid_times_x(a, out, 1.0, out), x)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x) (OpenAI CLIP)."""
    return _elementwise(lambda a, out: _sigmoid_times_x(a, out, 1.702, out), x)


def _gelu_into(x: np.ndarray, out: np.ndarray, scratch: np.ndarray, poly: np.ndarray) -> None:
    """out = x Phi(x) = x/2 + |x| (1/2 - Phi(-|x|)), with Phi(-|x|) = (1 - erf(|x|/sqrt 2)) / 2 by A&S 7.1.26.

    Written as in-place passes over cache-sized blocks; no branch on the sign, no allocation.
    """
    np.abs(x, out=scratch)
    np.multiply(scratch, ERF_P / math.sqrt(2), out=out)
    out += 1.0
    np.reciprocal(out, out=out)  # t
    a1, a2, a3, a4, a5 = ERF_A
    np.multiply(out, a5, out=poly)
    for a in (a4, a3, a2, a1):  # Horner: t (a1 + t (a2 + ...))
        poly += a
        poly *= out
    np.multiply(x, x, out=out)
    out *= -0.5
    np.exp(out, out=out)
    poly *= out  # 1 - erf(|x|/sqrt 2) = 2 Phi(-|x|)
    poly *= -0.5
    poly += 0.5
    poly *= scratch
    np.multiply(x, 0.5, out=out)
    out += poly


def _gelu_block(x: np.ndarray, out: np.ndarray) -> None:
    _gelu_into(x, out, np.empty_like(x), np.empty_like(x))


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU, x * Phi(x), as torch's default `gelu`."""
    return _elementwise(_gelu_block, x)


def _gelu_tanh_into(x: np.ndarray, out: np.ndarray) -> None:
    """out = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written as x sigmoid(2u) = x / (1 + exp(-2u)).

    The same value without a tanh (and without the cancellation in 1 + tanh(u) for negative x); `out`
    is the scratch, so it must not be `x`. Overflow gives x for large positive x and -0 for large negative.
    """
    np.multiply(x, x, out=out)
    out *= -2 * GELU_TANH_C * 0.044715
    out -= 2 * GELU_TANH_C
    out *= x  # -2u
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += 1.0
    np.divide(x, out, out=out)


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh-approximate GELU: torch's gelu(approximate="tanh"), transformers' gelu_new."""
    return _elementwise(_gelu_tanh_into, x)


def geglu(h: mx.array) -> mx.array:
    """a * gelu(gate) for h = [a, gate] split in halves along the last axis (the UNet's GEGLU)."""
    hidden = h.shape[-1] // 2
    hn = _to_numpy(h).reshape(-1, 2 * hidden)
    result, out = new_output((hn.shape[0], hidden))
    rows = max(1, ELEMENTS_PER_BLOCK // hidden)

    def work(start: int, stop: int) -> None:
        scratch, poly = np.empty((rows, hidden), np.float32), np.empty((rows, hidden), np.float32)
        for r in range(start * rows, min(stop * rows, hn.shape[0]), rows):
            block = out[r : r + rows]
            n = len(block)
            _gelu_into(hn[r : r + rows, hidden:], block, scratch[:n], poly[:n])
            block *= hn[r : r + rows, :hidden]

    in_parallel(work, -(-hn.shape[0] // rows))
    return result.reshape(*h.shape[:-1], hidden).astype(h.dtype)


def group_norm(
    x: mx.array, groups: int, weight: mx.array | None, bias: mx.array | None, eps: float, then_silu: bool = False
) -> mx.array:
    """GroupNorm over an NHWC (or N...C) array: x * scale + shift with `group_norm_affine`'s per-channel
    factors, one multiply-add per element; `then_silu` applies SiLU in the same pass (a resnet's
    norm-then-activation, without a second full-size buffer)."""
    scale, shift = group_norm_affine(x, groups, weight, bias, eps)
    batch, channels = x.shape[0], x.shape[-1]
    xn = _to_numpy(x).reshape(batch, -1, channels)
    block = max(1, ELEMENTS_PER_BLOCK // channels)
    blocks = [(b, r) for b in range(batch) for r in range(0, xn.shape[1], block)]
    result, out = new_output(xn.shape)

    def normalise(start: int, stop: int) -> None:
        scratch = np.empty((block, channels), np.float32) if then_silu else None
        for i in range(start, stop):
            b, r = blocks[i]
            values = out[b, r : r + block]
            np.multiply(xn[b, r : r + block], scale[b], out=values)
            values += shift[b]
            if scratch is not None:
                _sigmoid_times_x(values, values, 1.0, scratch[: len(values)])

    in_parallel(normalise, len(blocks))
    return result.reshape(x.shape).astype(x.dtype)


def group_norm_affine(
    x: mx.array, groups: int, weight: mx.array | None, bias: mx.array | None, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """GroupNorm(x) as x * scale + shift: the (batch, channels) float32 scale and shift, from two-pass
    statistics (the mean, then the variance of the centred values).

    Block sums are float32, their totals float64, so precision holds over the ~10^6 values a VAE group has
    at 1024x1024; the weight and bias fold into the two factors.
    """
    batch, channels = x.shape[0], x.shape[-1]
    xn = _to_numpy(x).reshape(batch, -1, channels)
    rows = xn.shape[1]
    block = max(1, ELEMENTS_PER_BLOCK // channels)
    blocks = [(b, r) for b in range(batch) for r in range(0, rows, block)]
    per_group = rows * (channels // groups)

    def channel_sums(centre: np.ndarray | None) -> np.ndarray:
        partial = np.zeros((len(blocks), channels))

        def work(start: int, stop: int) -> None:
            for i in range(start, stop):
                b, r = blocks[i]
                values = xn[b, r : r + block]
                if centre is not None:
                    values = values - centre[b]
                    values *= values
                partial[i] = values.sum(axis=0)

        in_parallel(work, len(blocks))
        totals = np.zeros((batch, channels))
        np.add.at(totals, [b for b, _ in blocks], partial)
        return totals.reshape(batch, groups, -1).sum(axis=-1) / per_group  # (batch, groups)

    mean = channel_sums(None)
    mean_c = np.repeat(mean, channels // groups, axis=1).astype(np.float32)
    variance = channel_sums(mean_c)
    scale = np.repeat(1.0 / np.sqrt(variance + eps), channels // groups, axis=1)
    if weight is not None:
        scale = scale * np.asarray(weight.astype(mx.float32), dtype=np.float64)
    shift = -mean_c * scale
    if bias is not None:
        shift = shift + np.asarray(bias.astype(mx.float32), dtype=np.float64)
    return scale.astype(np.float32), shift.astype(np.float32)


def silu_in_place(values: np.ndarray, scratch: np.ndarray) -> None:
    """values = silu(values); `scratch` of the same shape."""
    _sigmoid_times_x(values, values, 1.0, scratch)


def dequantize(
    w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str = "affine"
) -> mx.array:
    """`mx.dequantize(w, scales, biases, group_size, bits, mode)` in float32, for a 2-D packed weight.

    MLX's CPU dequantize runs 7-20 ns per weight (a 3072x3072 4-bit weight: 75-190 ms); this unpacks
    each byte of affine 2/4/8-bit weights with numpy shifts and masks and applies scale and bias per
    group in one multiply and one add: 1.6-1.8 ns per weight on 2 cores (bench/kernel_speed.py). MLX packs
    element i of a uint32 into
    bits [i*bits, (i+1)*bits), so on a little-endian machine byte j holds elements j*8/bits onwards, the
    first in the low bits. Other modes and bit widths fall back to MLX.
    """
    if mode != "affine" or biases is None or bits not in (2, 4, 8) or w.ndim != 2 or sys.byteorder != "little":
        return mx.dequantize(w, scales, biases, group_size, bits, mode=mode, dtype=mx.float32)
    per_byte = 8 // bits
    rows, groups = scales.shape
    columns = groups * group_size
    packed = np.ascontiguousarray(np.asarray(w)).view(np.uint8).reshape(rows, groups, group_size // per_byte)
    scale = _to_numpy(scales).reshape(rows, groups, 1)
    bias = _to_numpy(biases).reshape(rows, groups, 1)
    result, out = new_output((rows, columns))
    out = out.reshape(rows, groups, group_size)
    block = max(1, ELEMENTS_PER_BLOCK // columns)
    mask = (1 << bits) - 1

    def work(start: int, stop: int) -> None:
        scratch = np.empty((block, groups, group_size // per_byte), np.uint8)
        for r in range(start * block, min(stop * block, rows), block):
            source, target = packed[r : r + block], out[r : r + block]
            for j in range(per_byte):
                values = source
                if per_byte > 1:
                    values = scratch[: len(source)]
                    np.right_shift(source, j * bits, out=values)
                    values &= mask
                np.multiply(values, scale[r : r + block], out=target[..., j::per_byte])
            target += bias[r : r + block]

    in_parallel(work, -(-rows // block))
    return result
