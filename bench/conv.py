"""3x3 convolutions at SD 1.5's UNet and VAE shapes: MLX formulations against torch's conv2d, same run.

    python bench/conv.py [--repeats 3]
    python bench/conv.py --smoke      # one tiny shape, one repeat: that it runs

MLX's CPU conv2d already lowers to im2col + one BLAS gemm in float32; this measures it against two
explicit formulations on the same BLAS, our Winograd F(2x2, 3x3) (engine/ops/winograd.py, what the
engine's layers run on the CPU), and torch (NCHW, its own oneDNN kernels). The script
re-execs itself with OpenBLAS preloaded (mlx_sd_server.blas). Ratio = MLX time / torch float32 time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import best_ms  # noqa: E402
from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

# (batch, height, width, channels): the cfg batch of 2 at each UNet level of a 64x64 latent.
# Then one image at the VAE decoder's three largest levels (512x512 output).
SHAPES = [(2, 64, 64, 320), (2, 32, 32, 640), (2, 16, 16, 1280), (2, 8, 8, 1280),
          (1, 128, 128, 512), (1, 256, 256, 256), (1, 512, 512, 128)]
SMOKE_SHAPES = [(1, 8, 8, 32)]


def mlx_variants():
    import mlx.core as mx

    def im2col_matmul(x, weight):
        """Concatenate the 9 shifted windows along channels, then one (B*H*W, 9C) x (9C, O) gemm."""
        batch, height, width, _ = x.shape
        padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
        columns = mx.concatenate([padded[:, dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)],
                                 axis=-1)
        return (columns.reshape(-1, columns.shape[-1]) @ weight.reshape(weight.shape[0], -1).T).reshape(
            batch, height, width, -1)

    def shifted_matmuls(x, weight):
        """Nine (B*H*W, C) x (C, O) gemms, one per kernel tap, summed: no 9x-sized column buffer."""
        height, width = x.shape[1:3]
        padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
        out = None
        for dy in range(3):
            for dx in range(3):
                tap = padded[:, dy:dy + height, dx:dx + width] @ weight[:, dy, dx].T
                out = tap if out is None else out + tap
        return out

    from mlx_sd_server.engine.ops import winograd

    kernels = {}

    def winograd_conv(x, weight):
        """engine/ops/winograd.py (the layers' CPU path from 32x32 up); the kernel transform, which the
        layers keep, is made once per weight, outside the timing."""
        if id(weight) not in kernels:
            kernels[id(weight)] = winograd.transform_kernel(weight)
        return winograd.conv3x3(x, kernels[id(weight)])

    return {
        "winograd [ours]": winograd_conv,
        "mx.conv2d": lambda x, w: mx.conv2d(x, w, padding=1),
        "mx.conv2d compiled": mx.compile(lambda x, w: mx.conv2d(x, w, padding=1)),
        "im2col + matmul": im2col_matmul,
        "9 shifted matmuls": shifted_matmuls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32", help="MLX dtypes to try (float16/bfloat16 are slow on the CPU)")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, one repeat")
    args = parser.parse_args()
    ensure_fast_blas()
    if args.smoke:
        args.repeats = 1

    import mlx.core as mx
    import numpy as np
    import torch

    print(f"MLX {mx.__version__} on {mx.default_device()}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    print(f"{'shape (NHWC)':18} {'variant':20} {'dtype':9} {'ms':>8} {'GFLOP/s':>8} {'/torch f32':>11}")
    for batch, height, width, channels in SMOKE_SHAPES if args.smoke else SHAPES:
        name = f"{batch}x{height}x{width}x{channels}"
        gflop = 2 * batch * height * width * channels * channels * 9 / 1e9
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, height, width, channels), dtype=np.float32)
        weight = rng.standard_normal((channels, 3, 3, channels), dtype=np.float32) * 0.02  # OHWI

        def row(variant, dtype, ms, reference):
            print(f"{name:18} {variant:20} {dtype:9} {ms:8.1f} {gflop / ms * 1000:8.1f} {ms / reference:11.2f}",
                  flush=True)

        with torch.inference_mode():
            tx, tw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(weight.transpose(0, 3, 1, 2).copy())
            reference = best_ms(lambda: torch.nn.functional.conv2d(tx, tw, padding=1), args.repeats)
            row("torch conv2d", "float32", reference, reference)
            bx, bw = tx.bfloat16(), tw.bfloat16()
            row("torch conv2d", "bfloat16", best_ms(lambda: torch.nn.functional.conv2d(bx, bw, padding=1), args.repeats),
                reference)
        expected = None
        for dtype_name in args.dtypes.split(","):
            mx_x, mx_w = mx.array(x).astype(getattr(mx, dtype_name)), mx.array(weight).astype(getattr(mx, dtype_name))
            mx.eval(mx_x, mx_w)
            for variant, function in mlx_variants().items():
                out = function(mx_x, mx_w)
                if dtype_name == "float32":  # the formulations must agree before their times mean anything
                    expected = out if expected is None else expected
                    assert mx.allclose(out, expected, rtol=1e-4, atol=1e-4).item(), variant
                row(variant, dtype_name, best_ms(lambda: mx.eval(function(mx_x, mx_w)), args.repeats), reference)
            expected = None


if __name__ == "__main__":
    main()
