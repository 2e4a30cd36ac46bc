"""LoRA cost: a denoiser step with LoRAs as side branches (how the server applies them) against the same LoRAs
fused into the weights and against no LoRA, and the cost of switching LoRAs between requests.

    python bench/lora.py [--model sd15] [--dtype float32] [--ranks 16,32] [--runs 3] [--size 512x512] [--cache DIR]
    python bench/lora.py --smoke      # the tests' tiny SD 1.x at 64x64, rank 4, 1 run: seconds

The model is bench/models.py's real-size random-weight SD 1.5 (built and converted once into --cache). Each
LoRA is a random diffusers/PEFT file adapting every attention and feed-forward linear of the UNet (what
kohya's trainer targets by default), read through the server's own LoRA folder (mlx_sd_server.lora.library). Rows:

  UNet step          one UNet call with classifier-free guidance (batch 2) at the size's latent, the LoRA on
                     as engine/adapters.py puts it on: as side branches (fuse budget 0, what quantized layers always
                     get) or fused into copies of the layers. Median of 2 x --runs steps, taken as a job takes
                     them (LoRA on, a first step, --runs steps, LoRA off) in two passes over the rows, forward
                     and backward, so that drift on a shared machine falls on all rows alike
  bind (first use)   reading a LoRA file and mapping it onto the model's layers (once per LoRA; kept after)
  on + off           putting a bound LoRA on and taking it off again, side branches or fused (every request
                     that uses a LoRA pays this once)
  model load         loading the base model: what switching would cost if a LoRA needed a reload
  MLX peak           mx.get_peak_memory() over that row's work, weights included

Ratios are against the no-LoRA step (step rows) and against the model load (switching rows).
The script re-execs itself with OpenBLAS preloaded (mlx_sd_server.blas), as the CLI does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, median_seconds, print_table  # noqa: E402
from engine import unet_inputs  # noqa: E402
from models import DEFAULT_CACHE, TINY, converted_model  # noqa: E402

ALL = 2**62  # a fuse budget every layer fits
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", TINY], default="sd15")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--ranks", default="16,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--smoke", action="store_true", help="the tests' tiny SD 1.x, 64x64, rank 4, 1 run")
    args = parser.parse_args()
    ensure_fast_blas()
    if args.smoke:
        args.model, args.size, args.ranks, args.runs = TINY, "64x64", "4", 1
    import mlx.core as mx

    from mlx_sd_server.engine.adapters import applied
    from mlx_sd_server.engine.model_io import load_model
    from mlx_sd_server.lora.library import LoRALibrary

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

    lora_dir = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    layers = {rank: write_peft_lora(unet, lora_dir / f"rank{rank}.safetensors", rank, seed=rank) for rank in ranks}
    library = LoRALibrary(lora_dir)

    bound, bind_seconds = {}, {}
    for rank in ranks:
        start = time.perf_counter()
        bound[rank] = library.bound(f"rank{rank}", model)
        bind_seconds[rank] = time.perf_counter() - start
    # (label, LoRAs, fuse budget). Each is timed as a job runs: LoRAs on, a first step (not timed: it warms
    # what new weights or branches touch first), --runs steps, LoRAs off; in two passes, forward then
    # backward, so that drift on a shared machine falls on every row alike.
    setups = [("no LoRA", [], 0)] + [(f"r{rank} {way}", [(bound[rank], 0.8)], budget)
                                     for rank in ranks for way, budget in (("side branch", 0), ("fused", ALL))]
    times: dict[str, list[float]] = {label: [] for label, _, _ in setups}
    peaks: dict[str, float] = {label: 0.0 for label, _, _ in setups}
    for order in (setups, setups[::-1]):
        for label, loras, budget in order:
            with applied(model, loras, budget):
                mx.reset_peak_memory()
                step()
                for _ in range(args.runs):
                    start = time.perf_counter()
                    step()
                    times[label].append(time.perf_counter() - start)
                peaks[label] = max(peaks[label], mx.get_peak_memory() / 2**30)
    none_seconds = statistics.median(times["no LoRA"])
    step_rows = [(f"UNet step, {label}", [statistics.median(times[label]), statistics.median(times[label]) / none_seconds,
                                          peaks[label]], ".3f") for label, _, _ in setups]
    switch_rows = [("model load", [load_seconds, 1.0, None], ".3f")]
    for label, loras, budget in setups[1:]:
        def on_and_off() -> None:
            with applied(model, loras, budget):
                pass

        switch = median_seconds(on_and_off, args.runs)
        switch_rows.append((f"{label} on + off", [switch, switch / load_seconds, None], ".4f"))
    switch_rows += [(f"r{rank} bind (first use)", [bind_seconds[rank], bind_seconds[rank] / load_seconds, None], ".4f")
                    for rank in ranks]
    print(f"{args.model} {args.dtype} {width}x{height}, LoRAs on {layers[ranks[0]]} UNet layers; {load_average()}")
    print_table("denoiser step (seconds, ratio to no LoRA, MLX peak GB)", ["seconds", "ratio", "peak GB"], step_rows)
    print_table("switching LoRAs (seconds, ratio to a model load)", ["seconds", "ratio", ""], switch_rows)


if __name__ == "__main__":
    main()
