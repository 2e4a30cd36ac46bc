"""Hires fix memory: an SDXL 1024x1024 job enlarged 2x to 2048x2048, MLX's peak at real size (random weights).

    python bench/hires_memory.py [--dtype float16] [--upscaler latent] [--low-memory] [--cache DIR]
    python bench/hires_memory.py --smoke     # the tiny random-weight SD model, 64 -> 128, seconds

One step per pass (memory does not grow with steps), classifier-free guidance on. The child process reports
mx.get_peak_memory() for the first pass alone and for the whole hires job (each after a reset), and its
max RSS; the weights' own bytes are printed beside them. The model is built and converted once into --cache
by bench/models.py (SDXL: ~7 GB diffusers folder + the conversion). Re-execs with OpenBLAS preloaded.
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

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, print_table, run_child  # noqa: E402
from models import DEFAULT_CACHE  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, highly detailed"


def measure(folder: Path, dtype: str | None, size: int, scale: float, upscaler: str, low_memory: bool) -> dict:
    """The first pass's and the whole hires job's MLX peaks, in this process (a child of main)."""
    import mlx.core as mx

    from mlx_sd_server.engine.model_io import load_model
    from mlx_sd_server.engine.pipeline import DiffusionPipeline, drive
    from mlx_sd_server.job import build_job
    from mlx_sd_server.upscale.library import UPSCALER_FOLDER, UpscalerLibrary

    upscalers = UpscalerLibrary(folder.parent / UPSCALER_FOLDER)
    pipeline = DiffusionPipeline(
        load_model(folder, dtype=dtype, low_memory=low_memory), upscale=upscalers.upscale
    )
    pipeline.materialize()
    fields = {"prompt": PROMPT, "width": size, "height": size, "steps": 1, "cfg_scale": 7.0, "seed": 1,
              "sample_method": "euler", "scheduler": "discrete"}
    hires = build_job({**fields, "hr_scale": scale, "hr_upscaler": upscaler, "hr_strength": 0.5},
                      upscalers=upscalers.names())
    results: dict = {"weights_bytes": pipeline.memory_bytes(), "hires_size": f"{hires.hr_width}x{hires.hr_height}"}
    for label, job in (("first_pass", hires.first_pass()), ("hires", hires)):
        mx.reset_peak_memory()
        start = time.perf_counter()
        drive(pipeline.generate(job))
        results[f"{label}_s"] = time.perf_counter() - start
        results[f"{label}_peak_bytes"] = mx.get_peak_memory()
    results["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["load_average"] = load_average()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float16", "float32", "bfloat16"], default="float16")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--upscaler", default="latent", help="a latent mode, lanczos, or a converted upscaler")
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="the tiny random-weight SD model, 64x64 -> 128x128")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the model folder
    parser.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_fast_blas()
    if args.child:
        dtype = None if args.smoke else args.dtype
        print(json.dumps(measure(args.child, dtype, args.size, args.scale, args.upscaler, args.low_memory)))
        return
    if args.smoke:
        from mlx_sd_server.engine.tiny import ensure_tiny_model

        folder, size, label = ensure_tiny_model(Path(tempfile.mkdtemp()) / "tiny"), 64, "tiny SD"
    else:
        command = [str(ROOT / "bench" / "models.py"), "--model", "sdxl", "--dtype", args.dtype, "--cache", str(args.cache)]
        folder, size, label = Path(run_child(command)["folder"]), 1024, f"SDXL (random weights) {args.dtype}"
    child = [str(Path(__file__).resolve()), "--child", str(folder), "--size", str(size), "--dtype", args.dtype,
             "--scale", str(args.scale), "--upscaler", args.upscaler]
    child += ["--smoke"] * args.smoke + ["--low-memory"] * args.low_memory
    result = run_child(child)
    title = (f"{label}: {size}x{size} -> {result['hires_size']} by {args.upscaler}, 1 step per pass"
             + (", --low-memory" if args.low_memory else "") + f"; {result['load_average']}")
    rows = [
        ("weights (GB)", [result["weights_bytes"] / 1e9], ".2f"),
        ("first pass: MLX peak (GB)", [result["first_pass_peak_bytes"] / 1e9], ".2f"),
        ("hires job: MLX peak (GB)", [result["hires_peak_bytes"] / 1e9], ".2f"),
        ("max RSS (GB)", [result["max_rss_bytes"] / 1e9], ".2f"),
        ("first pass (s)", [result["first_pass_s"]], ".1f"),
        ("hires job (s)", [result["hires_s"]], ".1f"),
    ]
    print_table(title, ["MLX"], rows)


if __name__ == "__main__":
    main()
