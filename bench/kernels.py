"""SiLU, GELU, quick GELU and GroupNorm at SD's shapes: MLX's op, our CPU kernel, torch; same run.

    python bench/kernels.py [--repeats 5]

Times are the best of --repeats, in ms; the ratio columns are against torch float32. MLX's CPU backend
computes exp/sigmoid/erf with scalar code, which is why the engine uses the numpy kernels of
mlx_sd_server/engine/cpu_kernels.py on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import best_ms  # noqa: E402
from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

# (name, NHWC shape, GroupNorm groups): the UNet's first level with CFG batch 2, the VAE decoder's last.
SHAPES = [("unet 64x64x320 b2", (2, 64, 64, 320), 32), ("vae 512x512x128", (1, 512, 512, 128), 32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ensure_fast_blas()

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    import torch

    from mlx_sd_server.engine import cpu_kernels

    torch.set_grad_enabled(False)
    print(f"MLX {mx.__version__} on {mx.default_device()}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    print(f"{'shape':19} {'op':11} {'mlx ms':>9} {'ours ms':>9} {'torch ms':>9} {'mlx/torch':>10} {'ours/torch':>11}")
    for name, shape, groups in SHAPES:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        mx_x, torch_x = mx.array(x), torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        mlx_norm = nn.GroupNorm(groups, shape[-1], pytorch_compatible=True)
        torch_norm = torch.nn.GroupNorm(groups, shape[-1])
        ones, zeros = mx.ones(shape[-1]), mx.zeros(shape[-1])
        ops = {
            "silu": (nn.silu, cpu_kernels.silu, torch.nn.functional.silu),
            "gelu": (nn.gelu, cpu_kernels.gelu, torch.nn.functional.gelu),
            "quick_gelu": (lambda a: a * mx.sigmoid(1.702 * a), cpu_kernels.quick_gelu,
                           lambda a: a * torch.sigmoid(1.702 * a)),
            "group_norm": (mlx_norm, lambda a: cpu_kernels.group_norm(a, groups, ones, zeros, 1e-5), torch_norm),
        }
        for op, (mlx_op, ours, torch_op) in ops.items():
            mlx_ms = best_ms(lambda: mx.eval(mlx_op(mx_x)), args.repeats)
            ours_ms = best_ms(lambda: mx.eval(ours(mx_x)), args.repeats)
            torch_ms = best_ms(lambda: torch_op(torch_x), args.repeats)
            print(f"{name:19} {op:11} {mlx_ms:9.1f} {ours_ms:9.1f} {torch_ms:9.1f} {mlx_ms / torch_ms:10.1f} "
                  f"{ours_ms / torch_ms:11.1f}", flush=True)


if __name__ == "__main__":
    main()
