"""Linear and Conv2d that compute half-precision weights in float32 on the CPU.

MLX's CPU backend has no fast float16/bfloat16 matmul or convolution (a 1024^3 float16 matmul: ~1.6
GFLOP/s, against ~90 in float32 on OpenBLAS). A model loaded in float16 there keeps its weights and
activations in float16 — half the memory — while each product runs in float32 on upcast copies (one
layer's weight at a time) and is rounded back. On Metal and CUDA, and for float32 weights, these are
mlx.nn's own layers; parameters and results are the same. On the CPU a 1x1 convolution is a plain
matmul (see `Conv2d.convolve`).

Quantized linears (`QuantizedLinear`, what `nn.quantize` makes of our `Linear`) likewise compute in
float32 on the CPU: MLX's CPU `quantized_matmul` runs at ~3 GFLOP/s (~0.07 with a half-precision result), so
for more than a few rows the weight is dequantized to float32 (a numpy kernel, `cpu_kernels.dequantize`)
and multiplied by BLAS.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.ops.cpu_kernels import on_cpu

from . import cpu_kernels, winograd

# Where Winograd's 3x3 convolution replaces MLX's on the CPU (bench/conv.py): outputs of at least 32x32
# pixels, and kernels up to 640x640 channels (transform: 26 MB), so the kept transforms add ~0.5 GB to
# SD 1.5 and none of SDXL's 1280-channel layers (~5 GB).
WINOGRAD_MIN_PIXELS = 32 * 32
WINOGRAD_MAX_KERNEL_BYTES = 32 * 1024 * 1024


def _half_on_cpu(weight: mx.array) -> bool:
    return weight.dtype in (mx.float16, mx.bfloat16) and on_cpu()


def _with_bias(module: nn.Module, y: mx.array, dtype: mx.Dtype) -> mx.array:
    if "bias" in module:
        y = y + module.bias.astype(mx.float32)
    return y.astype(dtype)


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if not _half_on_cpu(self.weight):
            return super().__call__(x)
        return _with_bias(self, x.astype(mx.float32) @ self.weight.astype(mx.float32).T, x.dtype)

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", quantize_input: bool = False
    ) -> nn.Module:
        """Our `QuantizedLinear` (what `nn.quantize` calls); quantized activations stay mlx.nn's QQLinear."""
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        # mlx annotates from_linear's group_size and bits as int, though None (the mode's default) is what it takes
        return QuantizedLinear.from_linear(self, group_size, bits, mode)  # type: ignore[arg-type]


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (same parameters, same files) that, on the CPU, multiplies by the dequantized weight.

    A 4608x3072 @ 3072x9216 4-bit product (FLUX's q, k and v together at 1024x1024) takes ~80 s with
    MLX's CPU `quantized_matmul` and ~0.8 s as a dequantize plus a float32 BLAS matmul (bench/kernel_speed.py).
    quantized_matmul costs ~0.7 ns per weight per row in float32, a dequantize ~1.7 ns per weight, so up to
    QMM_MAX_ROWS rows (FLUX's modulations, the embedders) it stays quantized_matmul, on float32 inputs and
    scales: with a half-precision result MLX's CPU kernel is ~40x slower. The float32 weight lives only for
    the product; the result is rounded to x's dtype. On Metal and CUDA this is mlx.nn's layer.
    """

    QMM_MAX_ROWS = 4

    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu():
            return super().__call__(x)
        weight, scales, biases = self["weight"], self["scales"], self.get("biases")
        if x.size <= self.QMM_MAX_ROWS * x.shape[-1]:
            y = mx.quantized_matmul(
                x.astype(mx.float32),
                weight,
                scales.astype(mx.float32),
                None if biases is None else biases.astype(mx.float32),
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            )
        else:
            weight = cpu_kernels.dequantize(weight, scales, biases, self.group_size, self.bits, self.mode)
            y = x.astype(mx.float32) @ weight.T
        return _with_bias(self, y, x.dtype)


class Conv2d(nn.Conv2d):
    # Whether `winograd` keeps the kernel's transform for the next call (see `transform_each_call`).
    keeps_winograd_kernel = True

    def __call__(self, x: mx.array) -> mx.array:
        if self.takes_winograd(x.shape[1], x.shape[2]):
            return self.winograd(x)
        if not on_cpu() or (not _half_on_cpu(self.weight) and not self._pointwise):
            return super().__call__(x)
        return _with_bias(self, self.convolve(x, self.padding), x.dtype)

    def takes_winograd(self, height: int, width: int) -> bool:
        """Whether, on the CPU, this layer's output of this size comes from `winograd.conv3x3`: a padding-1
        3x3, from 32x32 outputs up (below, MLX's convolution is as fast), weights whose transform (kept
        while the weight is, 16/9 of its float32 size) is at most WINOGRAD_MAX_KERNEL_BYTES."""
        out_channels, kh, kw, in_channels = self.weight.shape
        return (
            on_cpu()
            and (kh, kw) == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation in (1, (1, 1))
            and self.groups == 1
            and height * width >= WINOGRAD_MIN_PIXELS
            and winograd.fits(height, width)
            and 16 * in_channels * out_channels * 4 <= WINOGRAD_MAX_KERNEL_BYTES
        )

    def winograd(
        self, x: mx.array, upsample: bool = False, norm_silu: tuple[np.ndarray, np.ndarray] | None = None
    ) -> mx.array:
        """This convolution by Winograd's algorithm, in x's dtype: of x's 2x nearest upsampling with
        `upsample`, of silu(x * scale + shift) with `norm_silu` (see `winograd.conv3x3`)."""
        kernel = self.__dict__.get("_winograd_kernel")
        if kernel is None or kernel.source is not self.weight:  # new weights (a load, a fused LoRA): again
            kernel = winograd.transform_kernel(self.weight)
            if self.keeps_winograd_kernel:
                object.__setattr__(self, "_winograd_kernel", kernel)
        return winograd.conv3x3(x, kernel, self.get("bias"), upsample, norm_silu).astype(x.dtype)

    @property
    def _pointwise(self) -> bool:
        return (
            self.weight.shape[1:3] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1
        )

    def convolve(self, x: mx.array, padding: tuple[int, int]) -> mx.array:
        """The convolution without the bias, in float32 for half weights on the CPU.

        A 1x1 convolution is a matmul over the flattened pixels: MLX's CPU convolution would first copy its
        input (268 MB for a 512x512x256 VAE activation).
        """
        weight = self.weight.astype(mx.float32) if _half_on_cpu(self.weight) else self.weight
        x = x.astype(weight.dtype)
        if self._pointwise and padding == (0, 0):
            out = x.reshape(-1, x.shape[-1]) @ weight.reshape(weight.shape[0], -1).T
            return out.reshape(*x.shape[:-1], weight.shape[0])
        return mx.conv2d(x, weight, self.stride, padding, self.dilation, self.groups)


def transform_each_call(module: nn.Module) -> None:
    """Make every Conv2d in `module` transform its kernel for each Winograd call instead of keeping the
    transform (low-memory mode: SD 1.5 in float32 peaks ~0.6 GB lower, at the transforms' time per call;
    the results are the same)."""
    for _, layer in module.named_modules():
        if isinstance(layer, Conv2d):
            object.__setattr__(layer, "keeps_winograd_kernel", False)
            layer.__dict__.pop("_winograd_kernel", None)
