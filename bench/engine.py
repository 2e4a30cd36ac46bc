"""Whole-model benchmark: our MLX engine against diffusers/torch on the same converted real-size model.

    python bench/engine.py --model sd15|sdxl --dtype float32 --steps 4 --runs 3 --size 512x512
        [--engines mlx,torch] [--memory-only] [--low-memory] [--cache DIR]
    python bench/engine.py --smoke     # the tests' tiny SD 1.x at 64x64, 2 steps, 1 run: seconds

The model has random weights at the released shapes (bench/models.py builds and converts it once into
--cache). Each engine then runs in a fresh child process, one after the other, so that their peaks and
max RSS are their own and only one copy of the weights is in memory at a time. torch runs the same
converted folder through `TorchPipeline`, in the same dtype. Rows:

  load             the converted folder to a ready pipeline
  UNet eval        one UNet call with classifier-free guidance (batch 2) at the size's latent
  VAE decode       one latent of the size to pixels (the part of an image that does not scale with steps)
  image            a whole image: text encoding, N euler steps, VAE decode
  MLX peak         mx.get_peak_memory() over the timed generations (weights included)
  max RSS          the child process's maximum resident memory (loading included)

Times are medians of --runs after one warm-up (a 1-step image warms the text encoder and VAE). The last
column is MLX / torch (below 1: MLX is faster or smaller). --memory-only skips the UNet timing and the
warm-ups: one generation, for its peak (float16 on a CPU is slow, and its speed is not the question).
--low-memory loads the MLX model as `serve --low-memory` does (text encoders freed after encoding).
The script re-execs itself with OpenBLAS preloaded (mlx_sd_server.blas), as the CLI does.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, median_seconds, print_table, run_child  # noqa: E402
from models import BENCH_MODELS, DEFAULT_CACHE, TINY  # noqa: E402

ENGINES = ("mlx", "torch")
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def unet_inputs(config: dict, width: int, height: int) -> dict:
    """A CFG batch's UNet inputs (NHWC latents), as float32 numpy; SDXL's added conditions included."""
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((2, height // 8, width // 8, config["in_channels"]), dtype=np.float32),
        "timestep": np.array([500.0, 500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["text_embeds"] = rng.standard_normal((2, pooled_dim), dtype=np.float32)
        inputs["time_ids"] = np.array([[height, width, 0, 0, height, width]] * 2, dtype=np.float32)
    return inputs


def mlx_engine(folder: Path, dtype: str, low_memory: bool = False):
    """(pipeline, a UNet evaluation on given inputs, a VAE decode of a given latent, peak-memory reset and
    read-out): one engine's way of doing each measured thing."""
    import mlx.core as mx

    from mlx_sd_server.engine.model_io import load_model
    from mlx_sd_server.engine.pipeline import DiffusionPipeline

    pipeline = DiffusionPipeline(load_model(folder, dtype=dtype, low_memory=low_memory))
    mx.eval(pipeline.model.unet.parameters(), pipeline.model.vae.parameters(),
            [encoder.parameters() for encoder in pipeline.model.text_encoders.values()])  # loading is lazy

    def unet_call(inputs: dict):
        arrays = {k: mx.array(v).astype(pipeline.model.dtype) for k, v in inputs.items()}
        mx.eval(arrays)
        sample, timestep, context = arrays.pop("sample"), arrays.pop("timestep"), arrays.pop("encoder_hidden_states")
        return lambda: mx.eval(pipeline.model.unet(sample, timestep, context, **arrays))

    def decode_call(latent):
        latent = mx.array(latent)
        return lambda: pipeline.decode_latents(latent)

    return pipeline, unet_call, decode_call, mx.reset_peak_memory, mx.get_peak_memory


def torch_engine(folder: Path, dtype: str, low_memory: bool = False):
    import torch

    from mlx_sd_server.torch_engine import TorchPipeline

    pipeline = TorchPipeline.from_folder(folder, device="cpu", dtype=dtype)
    unet = pipeline.base.unet

    def unet_call(inputs: dict):
        tensors = {k: torch.from_numpy(v).to(unet.dtype) for k, v in inputs.items()}
        sample = tensors.pop("sample").permute(0, 3, 1, 2).contiguous()
        timestep, context = tensors.pop("timestep"), tensors.pop("encoder_hidden_states")

        def call():
            with torch.inference_mode():
                unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=tensors or None)

        return call

    def decode_call(latent):
        vae = pipeline.base.vae
        latent = torch.from_numpy(latent).permute(0, 3, 1, 2).to(vae.dtype) / vae.config.scaling_factor

        def call():
            with torch.inference_mode():
                vae.decode(latent)

        return call

    return pipeline, unet_call, decode_call, lambda: None, lambda: None


def measure(engine: str, folder: Path, dtype: str, steps: int, runs: int, width: int, height: int,
            memory_only: bool, low_memory: bool) -> dict:
    """One engine's numbers, in this process (a child of main)."""
    from mlx_sd_server.engine.model_io import read_manifest
    from mlx_sd_server.engine.pipeline import drive
    from mlx_sd_server.job import build_job

    start = time.perf_counter()
    pipeline, unet_call, decode_call, reset_peak, peak = (mlx_engine if engine == "mlx" else torch_engine)(folder, dtype, low_memory)
    results: dict = {"load_s": time.perf_counter() - start}
    job_fields = {"prompt": PROMPT, "width": width, "height": height, "cfg_scale": 7.0,
                  "sample_method": "euler", "scheduler": "discrete", "seed": 42}
    job = build_job({**job_fields, "steps": steps})
    if memory_only:
        reset_peak()
        start = time.perf_counter()
        drive(pipeline.generate(job))
        results["cold_image_s"] = time.perf_counter() - start
    else:
        config = read_manifest(folder)["components"]["unet"]["config"]
        inputs = unet_inputs(config, width, height)
        results["unet_s"] = median_seconds(unet_call(inputs), runs)
        results["decode_s"] = median_seconds(decode_call(inputs["sample"][:1]), runs)
        warmup = build_job({**job_fields, "steps": 1})
        drive(pipeline.generate(warmup))
        reset_peak()
        results["image_s"] = median_seconds(lambda: drive(pipeline.generate(job)), runs, warmup=lambda: None)
    results["peak_bytes"] = peak()
    results["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["load_average"] = load_average()
    return results


def size(text: str) -> tuple[int, int]:
    width, height = (int(side) for side in text.lower().split("x"))
    return width, height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BENCH_MODELS, default="sd15")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=size, default=None, help="WxH (default: 512x512, SDXL 1024x1024)")
    parser.add_argument("--engines", default="mlx,torch", help="comma-separated, from mlx,torch")
    parser.add_argument("--memory-only", action="store_true", help="one cold generation, for its memory peak")
    parser.add_argument("--low-memory", action="store_true", help="MLX: free the text encoders after encoding")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--smoke", action="store_true", help="the tests' tiny SD 1.x, 64x64, 2 steps, 1 run")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_fast_blas()
    if args.smoke:
        args.model, args.size, args.steps, args.runs = TINY, (64, 64), 2, 1
    width, height = args.size or ((1024, 1024) if args.model == "sdxl" else (512, 512))
    if args.child:
        print(json.dumps(measure(args.child, args.folder, args.dtype, args.steps, args.runs, width, height,
                                 args.memory_only, args.low_memory)))
        return

    import mlx.core as mx
    import torch

    folder = Path(run_child([str(ROOT / "bench" / "models.py"), "--model", args.model, "--dtype", args.dtype,
                             "--cache", str(args.cache)])["folder"])
    engines = [e.strip() for e in args.engines.split(",")]
    print(f"{args.model} {width}x{height} {args.dtype}, {args.steps} steps, median of {args.runs}; "
          f"MLX {mx.__version__} on {mx.default_device()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); at start: {load_average()}", flush=True)
    results = {}
    for engine in engines:
        command = [str(Path(__file__).resolve()), "--child", engine, "--folder", str(folder),
                   "--dtype", args.dtype, "--steps", str(args.steps), "--runs", str(args.runs),
                   "--size", f"{width}x{height}"] + (["--memory-only"] if args.memory_only else []) \
            + (["--low-memory"] if args.low_memory else [])
        results[engine] = run_child(command, with_fast_blas=engine == "mlx")
        print(f"{engine} done; {results[engine]['load_average']}", flush=True)

    def row(label: str, key: str, scale: float, number_format: str):
        values = [results[e][key] / scale if results[e].get(key) is not None else None for e in engines]
        if set(engines) == set(ENGINES) and None not in values:
            values.append(values[engines.index("mlx")] / values[engines.index("torch")])
        return label, values, number_format

    rows = [row("load (s)", "load_s", 1, ".1f")]
    if args.memory_only:
        rows.append(row(f"image, {args.steps} steps, cold (s)", "cold_image_s", 1, ".1f"))
    else:
        rows += [row("UNet eval, CFG batch 2 (s)", "unet_s", 1, ".2f"),
                 row("VAE decode (s)", "decode_s", 1, ".2f"),
                 row(f"image, {args.steps} steps (s)", "image_s", 1, ".1f")]
    rows += [row("MLX peak memory (GB)", "peak_bytes", 1e9, ".2f"), row("max RSS (GB)", "max_rss_bytes", 1e9, ".2f")]
    columns = engines + (["mlx/torch"] if set(engines) == set(ENGINES) else [])
    print_table(f"{args.model} {width}x{height} {args.dtype}", columns, rows)


if __name__ == "__main__":
    main()
