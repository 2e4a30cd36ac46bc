"""LoRA cost: a denoiser step with LoRAs as side branches (how the server applies them) against the same LoRAs
fused into the weights and against no LoRA, and the cost of switching LoRAs between requests.

    python bench/lora.py [--model sd15] [--dtype float32] [--ranks 16,32] [--runs 3] [--size 512x512] [--cache DIR]

The model is bench/models.py's real-size random-weight SD 1.5 (built and converted once into --cache). Each
LoRA is a random diffusers/PEFT file adapting every attention and feed-forward linear of the UNet (what
kohya's trainer targets by default), read through the server's own LoRA folder (mlx_sd_server.loras). Rows:

  UNet step          one UNet call with classifier-free guidance (batch 2) at the size's latent; median of
                     --runs after a warm-up. "fused" adds scale * up @ down into each adapted weight (the
                     weights restored after), which is what baking a LoRA into a model costs at run time.
  bind (first use)   reading a LoRA file and mapping it onto the model's layers (once per LoRA; kept after)
  apply + remove     putting a bound LoRA's branches on and taking them off (every request that uses one)
  fuse + unfuse      adding each delta into its weight and taking it out again (what switching costs if fused)
  model load         loading the base model: what switching would cost if a LoRA needed a reload
  MLX peak           mx.get_peak_memory() over that row's work, weights included

Ratios are against the no-LoRA step (step rows) and against the model load (switching rows).
The script re-execs itself with OpenBLAS preloaded (mlx_sd_server.blas), as the CLI does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, median_seconds, print_table  # noqa: E402
from engine import unet_inputs  # noqa: E402
from models import DEFAULT_CACHE, converted_model  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def write_peft_lora(unet, path: Path, rank: int, seed: int) -> int:
    """A random PEFT-format LoRA over the UNet's attention and feed-forward linears; returns its layer count."""
    import mlx.nn as nn
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(TARGETS) and ("attentions" in name):
            out_dims, in_dims = module.weight.shape
            tensors[f"unet.{name}.lora_A.weight"] = (rng.standard_normal((rank, in_dims)) / in_dims**0.5).astype(np.float32)
            tensors[f"unet.{name}.lora_B.weight"] = (rng.standard_normal((out_dims, rank)) * 0.01).astype(np.float32)
    save_file(tensors, str(path))
    return len(tensors) // 2


def fuse(unet, bound: dict, sign: float) -> None:
    """Add (sign=1) or take out (sign=-1) each branch's delta from its layer's weight."""
    import mlx.core as mx

    from mlx_sd_server.engine.lora import get_layer

    for path, adapter in bound["unet"].items():
        layer = get_layer(unet, path)
        layer.weight = layer.weight + sign * adapter.scale * (adapter.up @ adapter.down).astype(layer.weight.dtype)
        mx.eval(layer.weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15"], default="sd15")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--ranks", default="16,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    ensure_fast_blas()
    import mlx.core as mx

    from mlx_sd_server.engine.lora import applied
    from mlx_sd_server.engine.model_io import load_model
    from mlx_sd_server.loras import LoRALibrary

    width, height = (int(v) for v in args.size.split("x"))
    ranks = [int(r) for r in args.ranks.split(",")]
    folder = converted_model(args.model, args.dtype, args.cache)
    start = time.perf_counter()
    model = load_model(folder, dtype=args.dtype)
    mx.eval(model.unet.parameters())
    load_seconds = time.perf_counter() - start
    unet = model.unet
    inputs = {k: mx.array(v).astype(model.dtype) for k, v in unet_inputs(model.manifest["components"]["unet"]["config"],
                                                                          width, height).items()}

    def step() -> None:
        mx.eval(unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]))

    def measured(run, runs: int = args.runs) -> tuple[float, float]:
        mx.reset_peak_memory()
        seconds = median_seconds(run, runs)
        return seconds, mx.get_peak_memory() / 2**30

    lora_dir = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    layers = {rank: write_peft_lora(unet, lora_dir / f"rank{rank}.safetensors", rank, seed=rank) for rank in ranks}
    library = LoRALibrary(lora_dir)

    none_seconds, none_peak = measured(step)
    step_rows = [("UNet step, no LoRA", [none_seconds, 1.0, none_peak], ".3f")]
    switch_rows = [("model load", [load_seconds, 1.0, None], ".3f")]
    for rank in ranks:
        name = f"rank{rank}"
        start = time.perf_counter()
        bound = library.bound(name, model)
        bind_seconds = time.perf_counter() - start
        with applied(model, [(bound, 0.8)]):
            side_seconds, side_peak = measured(step)
        fuse(unet, bound, 1.0)
        fused_seconds, fused_peak = measured(step)
        fuse(unet, bound, -1.0)

        def apply_and_remove() -> None:
            with applied(model, [(bound, 0.8)]):
                pass

        apply_seconds = median_seconds(apply_and_remove, args.runs * 3)
        fuse_seconds = median_seconds(lambda: (fuse(unet, bound, 1.0), fuse(unet, bound, -1.0)), args.runs)
        step_rows += [(f"UNet step, r{rank} side branch", [side_seconds, side_seconds / none_seconds, side_peak], ".3f"),
                      (f"UNet step, r{rank} fused", [fused_seconds, fused_seconds / none_seconds, fused_peak], ".3f")]
        switch_rows += [(f"r{rank} bind (first use)", [bind_seconds, bind_seconds / load_seconds, None], ".4f"),
                        (f"r{rank} apply + remove", [apply_seconds, apply_seconds / load_seconds, None], ".4f"),
                        (f"r{rank} fuse + unfuse", [fuse_seconds, fuse_seconds / load_seconds, None], ".4f")]
    print(f"{args.model} {args.dtype} {width}x{height}, LoRAs on {layers[ranks[0]]} UNet layers; {load_average()}")
    print_table("denoiser step (seconds, ratio to no LoRA, MLX peak GB)", ["seconds", "ratio", "peak GB"], step_rows)
    print_table("switching LoRAs (seconds, ratio to a model load)", ["seconds", "ratio", ""], switch_rows)


if __name__ == "__main__":
    main()
