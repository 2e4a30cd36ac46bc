"""Upscaler memory: a 4x RRDBNet at ESRGAN's released width (64 features, 23 RRDBs; random weights) enlarging a
1024x1024 image to 4096x4096 in tiles, through the library a server uses (UpscalerLibrary.upscale).

    python bench/upscale_memory.py                      # 1024x1024 -> 4096x4096 (2 CPU cores: ~30 min)
    python bench/upscale_memory.py --num-block 1        # the same tiles and output, one RRDB: ~the same peak
    python bench/upscale_memory.py --smoke              # 96x96 -> 384x384 in 64-pixel tiles, seconds

The child process reports mx.get_peak_memory() over the upscale (after a reset; the weights, 67 MB in
float32, included) and its max RSS (the input, the float32 output the tiles are blended into, the PIL images).
The peak is one tile's activations plus the weights: it does not grow with the image, and barely with the
depth (the RRDBs run at the input's resolution, a tile's largest tensors are its 4x-resolution tail).
Re-execs with OpenBLAS preloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import load_average, print_table, run_child  # noqa: E402

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

# What the MLX peak should stay under with 256-pixel tiles, whatever the image (bench/README.md): a tile's
# 1024x1024x64 float32 tail (268 MB a tensor, a few alive; on the CPU its convolutions run in bands) + weights.
BOUND_GB = 1.5


def random_upscaler(folder: Path, num_feat: int, num_block: int) -> None:
    """A converted 4x RRDBNet with random weights (N(0, 1/fan_in), biases zero) at `folder`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_sd_server.upscale.networks import ESRGAN, RRDBNet, RRDBNetConfig
    from mlx_sd_server.upscale.weights import UpscalerWeights, write_converted

    config = RRDBNetConfig(num_feat=num_feat, num_block=num_block, scale=4)
    weights = {}
    for key, value in tree_flatten(RRDBNet(config).parameters()):
        fan_in = value[0].size if value.ndim == 4 else 1
        weights[key] = mx.random.normal(value.shape) / fan_in**0.5 if value.ndim == 4 else mx.zeros(value.shape)
    write_converted(UpscalerWeights(ESRGAN, config, weights), folder, dtype="float32")


def measure(folder: Path, size: int, tile: int, overlap: int) -> dict:
    """The upscale's MLX peak and this process's max RSS (a child of main)."""
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from mlx_sd_server.upscale.library import UpscalerLibrary

    library = UpscalerLibrary(folder.parent, tile=tile, overlap=overlap)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    library.network(library.info(folder.name))  # read before the peak is reset: the weights stay in it anyway
    mx.reset_peak_memory()
    start = time.perf_counter()
    made = library.upscale(folder.name, image, 4)
    seconds = time.perf_counter() - start
    return {
        "output": f"{made.width}x{made.height}",
        "seconds": seconds,
        "peak_bytes": mx.get_peak_memory(),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="the input's side (the output is 4x)")
    parser.add_argument("--num-feat", type=int, default=64)
    parser.add_argument("--num-block", type=int, default=23)
    parser.add_argument("--tile", type=int, help="input pixels a tile (default: the library's)")
    parser.add_argument("--overlap", type=int, help="input pixels tiles share (default: the library's)")
    parser.add_argument("--smoke", action="store_true", help="96x96 -> 384x384, 64-pixel tiles, 2 RRDBs")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the converted upscaler's folder
    args = parser.parse_args()
    ensure_fast_blas()
    from mlx_sd_server.upscale.library import OVERLAP, TILE

    if args.smoke:
        args.size, args.num_block, args.tile, args.overlap = 96, 2, args.tile or 64, args.overlap or 24
    tile, overlap = args.tile or TILE, args.overlap or OVERLAP
    if args.child:
        print(json.dumps(measure(args.child, args.size, tile, overlap)))
        return
    folder = Path(tempfile.mkdtemp()) / "rrdbnet-x4"
    random_upscaler(folder, args.num_feat, args.num_block)
    child = [str(Path(__file__).resolve()), "--child", str(folder), "--size", str(args.size)]
    result = run_child(child + ["--tile", str(tile), "--overlap", str(overlap)])
    title = (
        f"RRDBNet x4 ({args.num_feat} features, {args.num_block} RRDBs, random weights, float32): "
        f"{args.size}x{args.size} -> {result['output']}, tiles of {tile} sharing {overlap}; "
        f"{result['load_average']}"
    )
    peak_gb = result["peak_bytes"] / 1e9
    rows = [
        ("MLX peak (GB)", [peak_gb], ".2f"),
        ("max RSS (GB)", [result["max_rss_bytes"] / 1e9], ".2f"),
        ("upscale (s)", [result["seconds"]], ".1f"),
    ]
    print_table(title, ["MLX"], rows)
    if tile == TILE:
        verdict = "yes" if peak_gb < BOUND_GB else "NO"
        print(f"bound: MLX peak under {BOUND_GB:.1f} GB for {TILE}-pixel tiles: {verdict}")


if __name__ == "__main__":
    main()
