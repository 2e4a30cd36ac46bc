"""SD3.5 memory benchmark: MLX peak memory and time of one 4-bit SD3.5 denoising step, weights built in MLX.

    python bench/sd3.py [--release large|medium] [--blocks N] [--size 1024x1024] [--bits 4] [--batch 2]
                        [--text-tokens 333] [--dtype float32] [--per-block] [--runs 1]
                        [--quantized-matmul ours|mlx]

What a Mac needs to denoise with SD3.5-large (8.1B parameters: no torch model at that size; nothing is
downloaded or converted). The transformer is built at the released shapes with random weights in MLX (our
class; construction is lazy), cast and quantized as a converted folder loads, and materialised one block at a
time, so the float32 weights never all exist: bench/flux.py's helpers, whose docstring says how peaks, the
CPU-only dequantized weights and the block-by-block timing are measured. One step is one call at --size:
batch 2 (the prompt and the negative prompt: classifier-free guidance; --batch 1 for large-turbo's cfg 1)
with 333 text tokens (both CLIPs' 77, then T5's 256, as the SD3 pipelines encode). `--blocks N` keeps N joint
blocks, the last context_pre_only as in the release (SD3.5-large has 38; medium 24, dual attention in the
first 13); below full depth the step is also timed block by block and scaled to full depth, and full-depth
weights come exactly from a lazily built full model's parameter sizes. The text encoders (CLIP-L, CLIP-G,
T5-XXL) and the VAE are not run here: T5-XXL and a 16-channel VAE are measured by bench/flux.py.

On Linux the script re-executes itself with OpenBLAS preloaded, as the CLI does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

import flux as flux_bench  # noqa: E402
from common import load_average, print_table  # noqa: E402

GB = 1e9
# The released transformer config.json files (stabilityai/stable-diffusion-3.5-large and -medium).
SD35 = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "in_channels": 16,
        "joint_attention_dim": 4096, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
        "qk_norm": "rms_norm", "sample_size": 128}
RELEASED = {
    "large": {**SD35, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "pos_embed_max_size": 192, "dual_attention_layers": []},
    "medium": {**SD35, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
               "pos_embed_max_size": 384, "dual_attention_layers": list(range(13))},
}


def build(release: str, blocks: int, dtype, bits: int, group_size: int):
    """Our transformer with the release's widths and `blocks` blocks (the release's dual-attention ones among
    them keep it), cast and quantized lazily."""
    from mlx_sd_server.engine.families.sd3.transformer import SD3Transformer2DModel, SD3TransformerConfig

    config = RELEASED[release]
    config = {**config, "num_layers": blocks,
              "dual_attention_layers": [i for i in config["dual_attention_layers"] if i < blocks]}
    return flux_bench.prepare(SD3Transformer2DModel(SD3TransformerConfig.from_dict(config)), dtype, bits, group_size)


def measure(args) -> dict:
    import mlx.core as mx
    import numpy as np

    dtype = getattr(mx, args.dtype)
    full_depth = RELEASED[args.release]["num_layers"]
    full = build(args.release, full_depth, dtype, args.bits, args.group_size)  # never evaluated: sizes only
    results = {"full_weights_bytes": flux_bench.weight_bytes(full),
               "full_weights_mac_bytes": flux_bench.weight_bytes(full, 2),
               "block_bytes": flux_bench.weight_bytes(full.transformer_blocks[-2])}  # a plain joint block
    del full
    model = build(args.release, args.blocks, dtype, args.bits, args.group_size)
    results["weights_bytes"] = flux_bench.weight_bytes(model)
    results |= flux_bench.materialise([model.pos_embed, model.time_text_embed, model.context_embedder,
                                       *model.transformer_blocks, model.norm_out, model.proj_out])

    def inputs(width: int, height: int, text_tokens: int) -> dict:
        rng = np.random.default_rng(0)
        arrays = {
            "hidden_states": rng.standard_normal((args.batch, height // 8, width // 8, 16), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((args.batch, text_tokens, 4096), dtype=np.float32),
            "pooled_projections": rng.standard_normal((args.batch, 2048), dtype=np.float32),
        }
        arrays = {k: mx.array(v).astype(dtype) for k, v in arrays.items()} | {"timestep": mx.ones((args.batch,))}
        mx.eval(arrays)
        return arrays

    step_inputs = inputs(*args.size, args.text_tokens)
    results["image_tokens"] = (args.size[0] // 16) * (args.size[1] // 16)

    def step(arrays: dict = step_inputs):
        mx.eval(model(**arrays))  # as the pipeline's denoiser: one call, one evaluation

    results |= flux_bench.timed_runs(step, args.runs)
    if args.per_block:
        results |= flux_bench.per_block(model, {"transformer_blocks": "joint"}, step)
    tiny = inputs(64, 64, 8)  # 16 image + 8 text tokens
    results["transient_bytes"] = flux_bench.dequantize_transient(model, lambda: step(tiny))
    return results


def report(args, r: dict) -> None:
    full_depth = RELEASED[args.release]["num_layers"]
    activation = r["peak_bytes"] - r["resident_bytes"]
    weights = f"{args.bits}-bit (group {args.group_size})" if args.bits else "unquantized"
    width, height = args.size
    print()
    print_table(f"measured: {weights}, {args.dtype}, {width}x{height}, batch {args.batch}, {r['image_tokens']} image "
                f"+ {args.text_tokens} text tokens, median of {args.runs}", ["transformer"], [
        ("depth", [f"{args.blocks} blocks"], ""),
        ("weights resident (GB)", [r["resident_bytes"] / GB], ".2f"),
        ("build peak (GB)", [r["build_peak_bytes"] / GB], ".2f"),
        ("build (s)", [r["build_s"]], ".1f"),
        ("step (s)", [r["step_s"]], ".2f"),
        ("MLX peak (GB)", [r["peak_bytes"] / GB], ".2f"),
        ("activations: peak - weights (GB)", [activation / GB], ".2f"),
        ("  of which dequantized weights (GB)", [r["transient_bytes"] / GB], ".2f"),
        ("  the rest (as on Metal) (GB)", [(activation - r["transient_bytes"]) / GB], ".2f"),
        ("weights at full depth (GB)", [r["full_weights_bytes"] / GB], ".2f"),
        ("  as a Mac holds them (GB)", [r["full_weights_mac_bytes"] / GB], ".2f"),
    ])
    print(f"\nweights per joint block {r['block_bytes'] / GB:.3f} GB")
    if "joint_s" in r:
        full_s = r["other_s"] + full_depth * r["joint_s"]
        print(f"block by block: {r['joint_s']:.2f} s per block, the rest {r['other_s']:.2f} s (that step "
              f"{r['profile_total_s']:.2f} s); highest peak within a block {r['block_peak_bytes'] / GB:.2f} GB")
        print(f"  full depth: {r['other_s']:.2f} + {full_depth} x {r['joint_s']:.2f} = {full_s:.0f} s per step")
    print(f"full-depth step peak: {r['full_weights_bytes'] / GB:.2f} GB weights + {activation / GB:.2f} GB activations "
          f"= {(r['full_weights_bytes'] + activation) / GB:.2f} GB; a Mac (float16 scales, no dequantized copies): "
          f"{(r['full_weights_mac_bytes'] + activation - r['transient_bytes']) / GB:.2f} GB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", choices=list(RELEASED), default="large")
    parser.add_argument("--blocks", type=int, help="joint blocks (default: the release's, 38 or 24)")
    parser.add_argument("--size", type=flux_bench.size, default=(1024, 1024), help="WxH image (default: 1024x1024)")
    parser.add_argument("--bits", type=int, default=4, help="quantization bits, 0 for none (default: 4)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="2: with CFG (the default), 1: without (turbo)")
    parser.add_argument("--text-tokens", type=int, default=77 + 256)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="compute dtype (default: as load_model, float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--per-block", action=argparse.BooleanOptionalAction, default=None,
                        help="also time block by block (default: only below full depth)")
    parser.add_argument("--runs", type=int, default=1, help="steps (median; the peak is over all)")
    parser.add_argument("--quantized-matmul", choices=["ours", "mlx"], default="ours",
                        help="mlx: MLX's own QuantizedLinear, as on Metal (see bench/flux.py)")
    args = parser.parse_args()
    ensure_fast_blas()

    import mlx.core as mx

    args.blocks = args.blocks or RELEASED[args.release]["num_layers"]
    args.dtype = args.dtype or ("float16" if mx.default_device() == mx.gpu else "float32")
    if args.per_block is None:
        args.per_block = args.blocks != RELEASED[args.release]["num_layers"]
    flux_bench.MLX_QUANTIZED_MATMUL = args.quantized_matmul == "mlx"
    width, height = args.size
    print(f"SD3.5-{args.release} {width}x{height}, {args.blocks} blocks, batch {args.batch}, {args.text_tokens} text "
          f"tokens, " + (f"{args.bits}-bit group {args.group_size} ({args.quantized_matmul} quantized matmul)"
                         if args.bits else "unquantized")
          + f", {args.dtype}; MLX {mx.__version__} on {mx.default_device()}; at start: {load_average()}", flush=True)
    start = time.perf_counter()
    results = measure(args)
    print(f"done in {time.perf_counter() - start:.0f} s; {load_average()}")
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
