"""Attention at SD 1.5's shapes: MLX variants against torch's scaled_dot_product_attention, same run.

    python bench/attention.py [--dtypes float32,bfloat16] [--repeats 3]
    python bench/attention.py --smoke       # one tiny shape, one repeat: that it runs

The script re-execs itself with OpenBLAS preloaded (mlx_sd_server.blas), as the CLI does; torch is timed
first in a child process without the preload (see `torch_times`). Times are the best of --repeats, in ms;
the ratio column is MLX time / torch float32 time (below 1 = faster than torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import best_ms, run_child  # noqa: E402
from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

# (name, batch, heads, query tokens, key tokens, head_dim): SD 1.5's UNet at a 64x64 latent, cfg batch 2.
SHAPES = [
    ("self 64x64", 2, 8, 4096, 4096, 40),
    ("cross 64x64", 2, 8, 4096, 77, 40),
    ("self 32x32", 2, 8, 1024, 1024, 80),
]
SMOKE_SHAPES = [("smoke", 1, 2, 64, 64, 16)]


def mlx_variants():
    import mlx.core as mx

    from mlx_sd_server.engine.ops.attention import attention

    def explicit(q, k, v):
        scores = (q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)
        return mx.softmax(scores, axis=-1, precise=True) @ v

    def query_chunked(q, k, v, chunk=1024):
        return mx.concatenate([explicit(q[:, :, i:i + chunk], k, v) for i in range(0, q.shape[2], chunk)], axis=2)

    return {
        "mx.fast sdpa": lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5),
        "explicit": explicit,
        "explicit compiled": mx.compile(explicit),
        "query-chunked 1024": query_chunked,
        "attention() [ours, numpy]": attention,
    }


def torch_times(shapes: list, repeats: int) -> dict[str, dict[str, float]]:
    """torch's SDPA in ms per shape and dtype. Run in a child without our OpenBLAS preload: with it, torch's
    CPU attention calls the preloaded BLAS from its own threads and runs ~20x slower (3.8 s, not 0.2 s, at
    SD 1.5's 64x64 self-attention here), which made MLX look far ahead."""
    import numpy as np
    import torch

    times: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, batch, heads, queries, keys, head_dim in shapes:
            q, k, v = (np.random.default_rng(i).standard_normal((batch, heads, n, head_dim), dtype=np.float32)
                       for i, n in enumerate([queries, keys, keys]))
            times[name] = {}
            for dtype in [torch.float32, torch.bfloat16]:
                tq, tk, tv = (torch.from_numpy(x).to(dtype) for x in (q, k, v))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                times[name][str(dtype).split(".")[-1]] = best_ms(lambda: sdpa(tq, tk, tv), repeats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32", help="MLX dtypes to try (float16/bfloat16 are slow on the CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, one repeat")
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.torch_child:
        print(json.dumps(torch_times(shapes, args.repeats)))
        return
    ensure_fast_blas()
    torch_ms = run_child([__file__, "--torch-child", "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else []),
                         with_fast_blas=False)

    import mlx.core as mx
    import numpy as np

    print(f"MLX {mx.__version__} on {mx.default_device()}; torch in a child process without the OpenBLAS preload")
    print(f"{'shape':14} {'variant':26} {'dtype':9} {'ms':>9} {'/torch f32':>11}")
    for name, batch, heads, queries, keys, head_dim in shapes:
        q, k, v = (np.random.default_rng(i).standard_normal((batch, heads, n, head_dim), dtype=np.float32)
                   for i, n in enumerate([queries, keys, keys]))
        reference = torch_ms[name]["float32"]
        for dtype, ms in torch_ms[name].items():
            print(f"{name:14} {'torch sdpa':26} {dtype:9} {ms:9.1f} {ms / reference:11.2f}")
        for dtype_name in args.dtypes.split(","):
            mq, mk, mv = (mx.array(x).astype(getattr(mx, dtype_name)) for x in (q, k, v))
            mx.eval(mq, mk, mv)
            for variant, function in mlx_variants().items():
                ms = best_ms(lambda: mx.eval(function(mq, mk, mv)), args.repeats)
                print(f"{name:14} {variant:26} {dtype_name:9} {ms:9.1f} {ms / reference:11.2f}", flush=True)


if __name__ == "__main__":
    main()
