"""SiLU, the GELUs, GroupNorm and quantized linears on the CPU: MLX's op, our kernel, a reference; same run.

    python bench/kernel_speed.py [--repeats 5] [--only activations|quantized]
    python bench/kernel_speed.py --smoke      # tiny shapes, one repeat: that it runs

Activations (SD's and FLUX's shapes): MLX's op, our numpy kernel, torch float32; times are the best of
--repeats, in ms, and the ratio columns are against torch. MLX's CPU backend computes exp/sigmoid/erf/tanh
with scalar code, which is why the engine uses the numpy kernels of mlx_sd_server/engine/cpu_kernels.py on
the CPU.

Quantized linears (FLUX's and T5-XXL's sizes, affine, group 64): x @ W^T for a packed W, as
`mx.quantized_matmul` (what nn.QuantizedLinear runs; timed once, it takes minutes at FLUX's sizes), as
`mx.dequantize` + a float32 matmul, and as our `QuantizedLinear` (engine/layers.py: numpy dequantize + the
float32 matmul, or for up to 4 rows quantized_matmul on float32 inputs); `deq ms` is our dequantize alone,
the last column qmm / ours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import best_ms, load_average  # noqa: E402
from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

# (name, NHWC shape, GroupNorm groups): the UNet's first level with CFG batch 2, the VAE decoder's last.
SHAPES = [("unet 64x64x320 b2", (2, 64, 64, 320), 32), ("vae 512x512x128", (1, 512, 512, 128), 32)]
# The tanh GELU's input in a FLUX single-stream block at 1024x1024 (4096 image + 512 text tokens).
FLUX_GELU_SHAPE = ("flux 4608x12288", (1, 4608, 12288))
# (name, rows, input size, output size, bits, activation dtype name)
QUANTIZED = [
    ("flux qkv 4608x3072>9216", 4608, 3072, 9216, 4, "float32"),
    ("t5-xxl wi 512x4096>10240", 512, 4096, 10240, 8, "float32"),
    ("flux mod 1x3072>18432", 1, 3072, 18432, 4, "float32"),
    ("flux mod 1x3072>18432", 1, 3072, 18432, 4, "float16"),
    ("flux ctx 64x3072>3072", 64, 3072, 3072, 4, "float16"),
]
# --smoke: the same code on tiny shapes
SMOKE_SHAPES = [("smoke 8x8x64", (1, 8, 8, 64), 32)]
SMOKE_GELU_SHAPE = ("smoke 16x256", (1, 16, 256))
SMOKE_QUANTIZED = [("smoke 8x128>256", 8, 128, 256, 4, "float32"), ("smoke 1x128>256", 1, 128, 256, 4, "float16")]


def once_ms(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000


def activations(repeats: int, shapes=SHAPES, gelu_shape=FLUX_GELU_SHAPE) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    import torch

    from mlx_sd_server.engine.ops import cpu_kernels

    F = torch.nn.functional
    print(f"{'shape':19} {'op':11} {'mlx ms':>9} {'ours ms':>9} {'torch ms':>9} {'mlx/torch':>10} {'ours/torch':>11}")
    cases = [(name, shape, groups, None) for name, shape, groups in shapes] + [(*gelu_shape, 0, ["gelu_tanh"])]
    for name, shape, groups, only in cases:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        mx_x, torch_x = mx.array(x), torch.from_numpy(x)
        if len(shape) == 4:
            torch_x = torch_x.permute(0, 3, 1, 2).contiguous()
        ops = {
            "silu": (nn.silu, cpu_kernels.silu, F.silu),
            "gelu": (nn.gelu, cpu_kernels.gelu, F.gelu),
            "gelu_tanh": (nn.gelu_approx, cpu_kernels.gelu_tanh, lambda a: F.gelu(a, approximate="tanh")),
            "quick_gelu": (lambda a: a * mx.sigmoid(1.702 * a), cpu_kernels.quick_gelu,
                           lambda a: a * torch.sigmoid(1.702 * a)),
        }
        if groups:
            ones, zeros = mx.ones(shape[-1]), mx.zeros(shape[-1])
            ops["group_norm"] = (nn.GroupNorm(groups, shape[-1], pytorch_compatible=True),
                                 lambda a: cpu_kernels.group_norm(a, groups, ones, zeros, 1e-5),
                                 torch.nn.GroupNorm(groups, shape[-1]))
        for op, (mlx_op, ours, torch_op) in ops.items():
            if only and op not in only:
                continue
            mlx_ms = best_ms(lambda: mx.eval(mlx_op(mx_x)), repeats)
            ours_ms = best_ms(lambda: mx.eval(ours(mx_x)), repeats)
            torch_ms = best_ms(lambda: torch_op(torch_x), repeats)
            print(f"{name:19} {op:11} {mlx_ms:9.1f} {ours_ms:9.1f} {torch_ms:9.1f} {mlx_ms / torch_ms:10.1f} "
                  f"{ours_ms / torch_ms:11.1f}", flush=True)


def quantized(repeats: int, cases=QUANTIZED) -> None:
    import mlx.core as mx

    from mlx_sd_server.engine.ops import cpu_kernels
    from mlx_sd_server.engine.ops.layers import Linear

    print(f"{'shape':25} {'bits':>4} {'x':>7} {'qmm ms':>10} {'mx deq+mm':>10} {'ours ms':>9} {'deq ms':>8} "
          f"{'ours GFLOP/s':>13} {'qmm/ours':>9}")
    for name, rows, inputs, outputs, bits, dtype_name in cases:
        dtype = getattr(mx, dtype_name)
        linear = Linear(inputs, outputs, bias=True)
        linear.set_dtype(dtype)
        layer = linear.to_quantized(group_size=64, bits=bits)
        x = mx.random.normal((rows, inputs)).astype(dtype)
        mx.eval(layer.parameters(), x)
        w, scales, biases = layer.weight, layer.scales, layer.biases

        def qmm():
            mx.eval(mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=bits) + layer.bias)

        def mx_dequantize_matmul():
            weight = mx.dequantize(w, scales, biases, 64, bits, dtype=mx.float32)
            mx.eval(((x.astype(mx.float32) @ weight.T) + layer.bias.astype(mx.float32)).astype(dtype))

        ours_ms = best_ms(lambda: mx.eval(layer(x)), repeats)
        deq_ms = best_ms(lambda: mx.eval(cpu_kernels.dequantize(w, scales, biases, 64, bits)), repeats)
        mx_ms = best_ms(mx_dequantize_matmul, max(1, repeats // 2))
        qmm_ms = once_ms(qmm)
        gflops = 2 * rows * inputs * outputs / ours_ms / 1e6
        print(f"{name:25} {bits:4} {dtype_name:>7} {qmm_ms:10.1f} {mx_ms:10.1f} {ours_ms:9.1f} {deq_ms:8.1f} "
              f"{gflops:13.1f} {qmm_ms / ours_ms:9.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["activations", "quantized"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    args = parser.parse_args()
    ensure_fast_blas()
    if args.smoke:
        args.repeats = 1

    import mlx.core as mx
    import torch

    torch.set_grad_enabled(False)
    print(f"MLX {mx.__version__} on {mx.default_device()}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads; {load_average()}")
    if args.only != "quantized":
        activations(args.repeats, *((SMOKE_SHAPES, SMOKE_GELU_SHAPE) if args.smoke else (SHAPES, FLUX_GELU_SHAPE)))
    if args.only != "activations":
        quantized(args.repeats, SMOKE_QUANTIZED if args.smoke else QUANTIZED)
    print(load_average())


if __name__ == "__main__":
    main()
