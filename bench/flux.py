"""FLUX.1 memory benchmark: MLX peak memory and time of a 4-bit FLUX.1 dev, weights built directly in MLX.

    python bench/flux.py [--blocks 19] [--size 1024x1024] [--bits 4] [--t5-layers 24] [--text-tokens 512]
                         [--parts transformer,t5,vae] [--dtype float32] [--low-memory] [--per-block] [--runs 1]
                         [--quantized-matmul ours|mlx] [--reference WxH]

What a 16 GB Mac needs for FLUX.1 dev; nothing is downloaded or converted, no torch. Each part is built at
the released shapes with random weights in MLX (our classes; construction is lazy), cast to the compute
dtype and quantized as a converted folder loads (`nn.quantize` with `model_io.quantizable`: every Linear
whose input size the group size divides; group 64), then materialised one block at a time, so the float32
weights never all exist (the build peak is printed). Each part runs in its own child process, so that its
peak is its own:

  transformer  one denoising step (batch 1: dev's distilled guidance, no CFG) at --size with --text-tokens
               T5 tokens; `--blocks N` keeps N double and 2N single blocks (FLUX.1: 19 and 38), or "D,S";
               `--reference WxH` makes it a FLUX.1 Kontext step: a WxH reference image's tokens appended to
               the image's, with ids (1, row, col) (bench/kontext.py compares the two)
  t5           T5 v1.1 XXL's encoder (--t5-layers of 24) on --text-tokens tokens, with CLIP-L's weight size
  vae          FLUX's 16-channel autoencoder decoding one --size latent, in tiles where our pipeline tiles
               (`should_tile`; --low-memory's lower threshold with --low-memory)

Peaks are `mx.get_peak_memory()` after `mx.reset_peak_memory()` with the weights resident, so they include
them; "activations" is a peak less the weights. On the CPU part of that is ours alone: our QuantizedLinear
multiplies by a float32 copy of each weight, dequantized as the graph is built and alive until it is
evaluated (up to about a block's worth at once). A tiny extra step run both ways (ours, and MLX's own
quantized matmul as Metal runs it) measures that part, which does not depend on the token count; the rest
is what a Mac's activations are in this dtype. Weights are also given at full depth, exactly (a lazily built
full-depth model's parameter sizes: nothing computed), and as a Mac holds them (float16 scales and float
parameters, bfloat16 for T5; the autoencoder stays float32, its config's force_upcast).

`--per-block` (on by itself below full depth) adds a step evaluated block by block, timing each kind of
block and the rest (embedders, final layer), from which the full-depth step time follows; weights scale
with the block count, while the activation peak is one block's, whatever the depth. The last lines add it
up for a whole image, phase by phase, with the text encoders kept loaded (the default) or freed after
encoding (`serve --low-memory`, which also tiles decodes above 512x512: run with --low-memory for those).

Run time on the 2-core CPU machine (bench/README.md): `--blocks 1 --t5-layers 2` at 1024x1024 4-5 min; the
full default run an estimated 20-30 min (a step 7-13 min, the 57-block build ~3 min, T5 ~3 min, the
untiled decode ~2 min, the tiny steps with MLX's slow CPU quantized matmul ~2.5 min). On Linux the script
re-executes itself with OpenBLAS preloaded, as the CLI does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, print_table, run_parts  # noqa: E402

PARTS = ("transformer", "t5", "vae")
GB = 1e9
FULL_DEPTH = (19, 38)
MLX_QUANTIZED_MATMUL = False  # --quantized-matmul mlx

# The released config.json files (black-forest-labs/FLUX.1-dev; bookkeeping keys dropped).
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}
T5_XXL = {  # text_encoder_2: google/t5-v1_1-xxl's encoder
    "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu", "is_gated_act": True, "layer_norm_epsilon": 1e-6, "num_heads": 64,
    "num_layers": 24, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "vocab_size": 32128,
}
CLIP_L = {  # text_encoder: OpenAI CLIP ViT-L/14
    "architectures": ["CLIPTextModel"], "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "intermediate_size": 3072, "layer_norm_eps": 1e-5, "max_position_embeddings": 77, "num_attention_heads": 12,
    "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
}
FLUX_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}


# --- building quantized models without their float32 weights -------------------------------------------

def prepare(model, dtype, bits: int, group_size: int):
    """Cast and quantize `model` as a converted folder loads (lazily: nothing is computed here)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_sd_server.engine.model_io import quantizable

    if dtype != mx.float32:
        model.set_dtype(dtype)  # floating parameters only
    if bits:
        nn.quantize(model, group_size, bits, class_predicate=quantizable(group_size))
        if MLX_QUANTIZED_MATMUL:  # MLX's own layer, as on Metal: no dequantized copies
            for _, module in model.named_modules():
                if isinstance(module, nn.QuantizedLinear):
                    module.__class__ = nn.QuantizedLinear
    return model.eval()


def weight_bytes(model, mac_dtype_bytes: int | None = None) -> int:
    """Parameter bytes from their shapes (works on unevaluated arrays); floating ones at `mac_dtype_bytes`
    each if given."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = 0
    for _, p in tree_flatten(model.parameters()):
        floating = mx.issubdtype(p.dtype, mx.floating)
        total += p.size * mac_dtype_bytes if floating and mac_dtype_bytes else p.nbytes
    return total


def materialise(pieces) -> dict:
    """Evaluate the parameters piece by piece; the peak of doing so and the memory left resident."""
    import mlx.core as mx

    mx.reset_peak_memory()
    start_active = mx.get_active_memory()
    start = time.perf_counter()
    for piece in pieces:
        mx.eval(piece.parameters())
    return {"build_s": time.perf_counter() - start, "build_peak_bytes": mx.get_peak_memory(),
            "resident_bytes": mx.get_active_memory() - start_active}


class Probe:
    """Stands in a model's list of blocks: evaluates the block's inputs first (their time goes to "the
    rest"), then the block, timed under its kind, and records the highest peak memory within a block."""

    def __init__(self, block, kind: str, log: dict):
        self.block, self.kind, self.log = block, kind, log

    def __getattr__(self, name: str):  # e.g. T5Stack reads its first block's relative attention bias
        return getattr(self.block, name)

    def __call__(self, *args):
        import mlx.core as mx

        mx.eval(args)
        mx.reset_peak_memory()
        start = time.perf_counter()
        out = self.block(*args)
        mx.eval(out)
        self.log.setdefault(self.kind, []).append(time.perf_counter() - start)
        self.log["block_peak_bytes"] = max(self.log.get("block_peak_bytes", 0), mx.get_peak_memory())
        return out


def timed_runs(step, runs: int) -> dict:
    """Wall times of `runs` calls and the peak over all of them (peak counter reset first)."""
    import mlx.core as mx

    mx.reset_peak_memory()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "first_s": times[0], "peak_bytes": mx.get_peak_memory()}


def per_block(model, lists: dict[str, str], step) -> dict:
    """One step with every block of the named lists (attribute -> kind) behind a Probe: the median time of
    each kind of block, the rest (embedders, final layers), and the highest peak within a block."""
    log: dict = {}
    originals = {name: getattr(model, name) for name in lists}
    for name, kind in lists.items():
        setattr(model, name, [Probe(b, kind, log) for b in originals[name]])
    try:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    finally:
        for name, blocks in originals.items():
            setattr(model, name, blocks)
    result = {"profile_total_s": total, "block_peak_bytes": log["block_peak_bytes"]}
    for kind in lists.values():
        result[f"{kind}_s"] = statistics.median(log[kind])
    result["other_s"] = total - sum(sum(log[kind]) for kind in lists.values())
    return result


def dequantize_transient(model, tiny_step) -> int:
    """What our CPU path adds to a peak: one tiny step's peak with our QuantizedLinear (on the CPU it
    multiplies by float32 copies of the weights, dequantized as the graph is built and alive until it is
    evaluated) less the same step's with MLX's own quantized matmul (Metal's way: no copies). The copies
    do not depend on the token count, so this is the CPU-only part of the real step's peak too. 0 where
    there is no such path (a GPU, --quantized-matmul mlx, no quantization)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_sd_server.engine.ops.cpu_kernels import on_cpu

    ours = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear) and type(m) is not nn.QuantizedLinear]
    if not ours or not on_cpu():
        return 0
    cls = type(ours[0])
    peaks = {}
    try:
        for kind in (cls, nn.QuantizedLinear):
            for m in ours:
                m.__class__ = kind
            mx.reset_peak_memory()
            tiny_step()
            peaks[kind] = mx.get_peak_memory()
    finally:
        for m in ours:
            m.__class__ = cls
    return max(0, peaks[cls] - peaks[nn.QuantizedLinear])


# --- the parts -------------------------------------------------------------------------------------------

def measure_transformer(args) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_sd_server.engine.families.flux.kontext import reference_ids
    from mlx_sd_server.engine.families.flux.transformer import (
        FluxTransformer2DModel, FluxTransformerConfig, latent_image_ids)

    double, single = args.blocks
    dtype = getattr(mx, args.dtype)

    def build(d: int, s: int):
        config = {**FLUX_DEV_TRANSFORMER, "num_layers": d, "num_single_layers": s}
        return prepare(FluxTransformer2DModel(FluxTransformerConfig.from_dict(config)), dtype, args.bits, args.group_size)

    full = build(*FULL_DEPTH)  # never evaluated: its parameter sizes only
    results = {"full_weights_bytes": weight_bytes(full), "full_weights_mac_bytes": weight_bytes(full, 2),
               "double_block_bytes": weight_bytes(full.transformer_blocks[0]),
               "single_block_bytes": weight_bytes(full.single_transformer_blocks[0])}
    del full
    model = build(double, single)
    results["weights_bytes"] = weight_bytes(model)
    pieces = [model.x_embedder, model.context_embedder, model.time_text_embed, *model.transformer_blocks,
              *model.single_transformer_blocks, model.norm_out, model.proj_out]
    results |= materialise(pieces)

    def transformer_inputs(width: int, height: int, text_tokens: int, reference: tuple[int, int] | None = None) -> dict:
        latent_h, latent_w = height // 8, width // 8
        rng = np.random.default_rng(0)
        img_ids = latent_image_ids(latent_h, latent_w)
        tokens = img_ids.shape[0]
        if reference is not None:  # Kontext: the reference's packed tokens follow the image's (FluxFamily.denoiser)
            ids = reference_ids(reference[1] // 8, reference[0] // 8)
            img_ids, tokens = mx.concatenate([img_ids, ids]), tokens + ids.shape[0]
        inputs = {
            "hidden_states": rng.standard_normal((1, tokens, 64), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, text_tokens, 4096), dtype=np.float32),
            "pooled_projections": rng.standard_normal((1, 768), dtype=np.float32),
        }
        inputs = {k: mx.array(v).astype(dtype) for k, v in inputs.items()} | {
            "timestep": mx.array([1.0]), "img_ids": img_ids,
            "txt_ids": mx.zeros((text_tokens, 3)), "guidance": mx.array([3.5]),
        }
        mx.eval(inputs)
        return inputs

    inputs = transformer_inputs(*args.size, args.text_tokens, args.reference)
    results["image_tokens"] = (args.size[0] // 16) * (args.size[1] // 16)
    results["reference_tokens"] = inputs["hidden_states"].shape[1] - results["image_tokens"]

    def step(inputs: dict = inputs):
        mx.eval(model(**inputs))  # as the pipeline's denoiser: one call, one evaluation

    results |= timed_runs(step, args.runs)
    if args.per_block:
        results |= per_block(model, {"transformer_blocks": "double", "single_transformer_blocks": "single"}, step)
    tiny = transformer_inputs(64, 64, 8)  # 16 image + 8 text tokens: more rows than QMM_MAX_ROWS
    results["transient_bytes"] = dequantize_transient(model, lambda: step(tiny))
    return results


def measure_t5(args) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_sd_server.engine.text.t5 import T5_ENCODER
    from mlx_sd_server.engine.text.t5 import T5Config, T5EncoderModel

    dtype = getattr(mx, args.dtype)
    if dtype == mx.float16:
        dtype = T5_ENCODER.instead_of_float16  # as load_model: bfloat16

    def build(layers: int):
        return prepare(T5EncoderModel(T5Config.from_dict({**T5_XXL, "num_layers": layers})), dtype, args.bits,
                       args.group_size)

    full = build(T5_XXL["num_layers"])
    clip = prepare(clip_model(), dtype, args.bits, args.group_size)
    results = {"full_weights_bytes": weight_bytes(full), "full_weights_mac_bytes": weight_bytes(full, 2),
               "layer_bytes": weight_bytes(full.encoder.block[1]),
               "clip_weights_bytes": weight_bytes(clip), "clip_weights_mac_bytes": weight_bytes(clip, 2)}
    del full, clip
    model = build(args.t5_layers)
    results["weights_bytes"] = weight_bytes(model)
    results |= materialise([model.shared, *model.encoder.block, model.encoder.final_layer_norm])

    ids = np.zeros((1, args.text_tokens), dtype=np.int32)  # a prompt padded to max_length, as FLUX encodes
    prompt = min(40, args.text_tokens - 1)
    ids[0, :prompt] = np.random.default_rng(0).integers(3, 32000, size=prompt)
    ids[0, prompt] = 1  # </s>
    ids = mx.array(ids)

    def step(ids: mx.array = ids):
        mx.eval(model(ids))

    results |= timed_runs(step, args.runs)
    if args.per_block:
        results |= per_block(model.encoder, {"block": "layer"}, step)
    results["transient_bytes"] = dequantize_transient(model, lambda: step(ids[:, :16]))
    return results


def clip_model():
    from mlx_sd_server.engine.text.clip import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig.from_dict(CLIP_L))


def measure_vae(args) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_sd_server.engine.vae import Autoencoder, VAEConfig, should_tile

    # force_upcast: float32 whatever the compute dtype (load_model's vae_dtype)
    model = prepare(Autoencoder(VAEConfig.from_dict(FLUX_VAE)), mx.float32, args.bits, args.group_size)
    results = {"weights_bytes": weight_bytes(model)}
    results["full_weights_bytes"] = results["full_weights_mac_bytes"] = results["weights_bytes"]
    results |= materialise([model])
    width, height = args.size
    latent = mx.array(np.random.default_rng(0).standard_normal((1, height // 8, width // 8, 16), dtype=np.float32))
    mx.eval(latent)
    tiled = should_tile(height // 8, width // 8, args.low_memory)
    results["tiled"] = tiled

    def step():
        mx.eval(model.decode_tiled(latent) if tiled else model.decode(latent))

    results |= timed_runs(step, args.runs)
    results["transient_bytes"] = 0  # its few quantized linears (the mid-block attention's) are 1 MB each
    return results


MEASURE = {"transformer": measure_transformer, "t5": measure_t5, "vae": measure_vae}


# --- main ------------------------------------------------------------------------------------------------

def blocks(text: str) -> tuple[int, int]:
    """"N" (N double, 2N single blocks: FLUX.1's ratio) or "D,S"."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        return parts[0], 2 * parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError("--blocks is N or D,S")


def size(text: str) -> tuple[int, int]:
    width, height = (int(side) for side in text.lower().split("x"))
    if width % 16 or height % 16:
        raise argparse.ArgumentTypeError("FLUX image sides are multiples of 16")
    return width, height


def report(args, results: dict) -> None:
    """The measured table, the full-depth estimates and the 16 GB Mac totals."""
    width, height = args.size
    double, single = args.blocks
    columns = [p for p in PARTS if p in results]
    depth = {"transformer": f"{double}+{single} blocks", "t5": f"{args.t5_layers} layers",
             "vae": "tiled" if results.get("vae", {}).get("tiled") else "untiled"}
    activation = {p: results[p]["peak_bytes"] - results[p]["resident_bytes"] for p in columns}
    metal_activation = {p: activation[p] - results[p]["transient_bytes"] for p in columns}

    def row(label: str, key: str, scale: float = GB, number_format: str = ".2f"):
        return label, [None if results[p].get(key) is None else results[p][key] / scale for p in columns], number_format

    print()
    weights = f"{args.bits}-bit (group {args.group_size})" if args.bits else "unquantized"
    print_table(f"measured: {weights}, {args.dtype}, {width}x{height}, "
                f"{args.text_tokens} T5 tokens, median of {args.runs}", columns, [
        ("depth", [depth[p] for p in columns], ""),
        row("weights resident (GB)", "resident_bytes"),
        row("build peak (GB)", "build_peak_bytes"),
        row("build (s)", "build_s", 1, ".1f"),
        row("step / encode / decode (s)", "step_s", 1, ".2f"),
        row("first run (s)", "first_s", 1, ".2f"),
        row("MLX peak (GB)", "peak_bytes"),
        ("activations: peak - weights (GB)", [activation[p] / GB for p in columns], ".2f"),
        row("  of which dequantized weights (GB)", "transient_bytes"),
        ("  the rest (as on Metal) (GB)", [metal_activation[p] / GB for p in columns], ".2f"),
        row("weights at full depth (GB)", "full_weights_bytes"),
        row("  as a Mac holds them (GB)", "full_weights_mac_bytes"),
    ])
    tr, t5, vae = (results.get(p) for p in PARTS)
    if tr:
        print(f"\ntransformer weights per block: double {tr['double_block_bytes'] / GB:.3f} GB, single "
              f"{tr['single_block_bytes'] / GB:.3f} GB")
        if "double_s" in tr:
            full_s = tr["other_s"] + FULL_DEPTH[0] * tr["double_s"] + FULL_DEPTH[1] * tr["single_s"]
            print(f"transformer block by block ({tr['image_tokens']} image + {tr['reference_tokens']} reference + "
                  f"{args.text_tokens} text tokens): double "
                  f"{tr['double_s']:.2f} s, single {tr['single_s']:.2f} s, the rest {tr['other_s']:.2f} s (that "
                  f"step {tr['profile_total_s']:.2f} s; one call {tr['step_s']:.2f} s); highest peak within a block "
                  f"{tr['block_peak_bytes'] / GB:.2f} GB")
            print(f"  full depth: {tr['other_s']:.2f} + 19 x {tr['double_s']:.2f} + 38 x {tr['single_s']:.2f} "
                  f"= {full_s:.0f} s per step; {tr['step_s'] * full_s / tr['profile_total_s']:.0f} s from the one-call "
                  f"step, scaled by the same shares")
        print(f"  full-depth step peak: {tr['full_weights_bytes'] / GB:.2f} GB weights + "
              f"{activation['transformer'] / GB:.2f} GB activations = "
              f"{(tr['full_weights_bytes'] + activation['transformer']) / GB:.2f} GB")
    if t5:
        print(f"T5-XXL weights per layer {t5['layer_bytes'] / GB:.3f} GB; CLIP-L {t5['clip_weights_bytes'] / GB:.2f} GB "
              f"({t5['clip_weights_mac_bytes'] / GB:.2f} GB as a Mac holds it)")
        if "layer_s" in t5:
            full_s = t5["other_s"] + T5_XXL["num_layers"] * t5["layer_s"]
            print(f"T5 layer by layer: {t5['layer_s']:.2f} s per layer, the rest {t5['other_s']:.2f} s; "
                  f"24 layers: {full_s:.1f} s; {t5['step_s'] * full_s / t5['profile_total_s']:.1f} s from the "
                  f"one-call encode, scaled")
        print(f"  24-layer encode peak: {t5['full_weights_bytes'] / GB:.2f} GB weights + {activation['t5'] / GB:.2f} GB "
              f"activations = {(t5['full_weights_bytes'] + activation['t5']) / GB:.2f} GB")
    if tr and t5 and vae:
        decode = f"{depth['vae']} decode"
        whole_image(f"weights and activations as measured here ({decode})", tr, t5, vae, activation, mac=False)
        whole_image(f"a Mac: float16 scales, activations less the CPU's dequantized weights ({decode})",
                    tr, t5, vae, metal_activation, mac=True)
        print(f"  (activations measured in {args.dtype}; the transformer's and T5's in float16 would be about "
              f"half; the autoencoder runs in float32 either way)")


def whole_image(label: str, tr: dict, t5: dict, vae: dict, activation: dict, mac: bool) -> None:
    """The peak of a whole image, phase by phase: the weights resident plus the phase's activations. The
    transformer stays loaded between jobs; the text encoders too by default, while --low-memory frees them
    after encoding (they are read from disk again for the next job's prompts)."""
    key = "full_weights_mac_bytes" if mac else "full_weights_bytes"
    w_tr, w_vae = tr[key], vae[key]
    w_text = t5[key] + t5["clip_weights_mac_bytes" if mac else "clip_weights_bytes"]
    weights = w_tr + w_text + w_vae
    phases = {"encoding": activation["t5"], "denoising": activation["transformer"], "decoding": activation["vae"]}
    kept = max(phases, key=phases.get)
    freed = {"encoding": weights + phases["encoding"],
             "denoising": w_tr + w_vae + phases["denoising"], "decoding": w_tr + w_vae + phases["decoding"]}
    print(f"\nwhole image, {label}:")
    print(f"  weights: transformer {w_tr / GB:.2f} + text encoders {w_text / GB:.2f} (T5 {t5[key] / GB:.2f}) + "
          f"VAE {w_vae / GB:.2f} = {weights / GB:.2f} GB")
    print(f"  text encoders kept loaded (default): peak {(weights + phases[kept]) / GB:.2f} GB, while {kept}")
    print("  text encoders freed after encoding (--low-memory): peak " + ", ".join(
        f"{value / GB:.2f} GB {phase}" for phase, value in freed.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=blocks, default=FULL_DEPTH,
                        help="transformer depth: N (N double + 2N single blocks) or D,S (default: 19,38)")
    parser.add_argument("--size", type=size, default=(1024, 1024), help="WxH image (default: 1024x1024)")
    parser.add_argument("--bits", type=int, default=4, help="quantization bits, 0 for none (default: 4)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--t5-layers", type=int, default=24)
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (dev: 512, schnell: 256)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="compute dtype (default: as load_model, float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--low-memory", action="store_true", help="decode in tiles from 64x64 latents up")
    parser.add_argument("--per-block", action=argparse.BooleanOptionalAction, default=None,
                        help="also time block by block (default: only below full depth)")
    parser.add_argument("--runs", type=int, default=1, help="steps per part (median; the peak is over all)")
    parser.add_argument("--quantized-matmul", choices=["ours", "mlx"], default="ours",
                        help="mlx: MLX's own QuantizedLinear, as on Metal (on the CPU ~100x slower, but with no "
                             "dequantized float32 weights in memory: for the activation peak at small sizes)")
    parser.add_argument("--reference", type=size, default=None,
                        help="WxH: a FLUX.1 Kontext step, with a reference image of that size (transformer only)")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_fast_blas()

    import mlx.core as mx

    args.dtype = args.dtype or ("float16" if mx.default_device() == mx.gpu else "float32")
    if args.per_block is None:
        args.per_block = args.blocks != FULL_DEPTH or args.t5_layers != T5_XXL["num_layers"]
    if args.child:
        global MLX_QUANTIZED_MATMUL
        MLX_QUANTIZED_MATMUL = args.quantized_matmul == "mlx"
        print(json.dumps(MEASURE[args.child](args)))
        return 0

    width, height = args.size
    print(f"FLUX.1 dev {width}x{height}, transformer {args.blocks[0]}+{args.blocks[1]} blocks, T5 {args.t5_layers} "
          f"layers, {args.text_tokens} T5 tokens, "
          + (f"Kontext reference {args.reference[0]}x{args.reference[1]}, " if args.reference else "")
          + (f"{args.bits}-bit group {args.group_size} ({args.quantized_matmul} quantized matmul)" if args.bits
             else "unquantized") + f", {args.dtype}; "
          f"MLX {mx.__version__} on {mx.default_device()}; at start: {load_average()}", flush=True)
    results = run_parts(__file__, PARTS, args.parts, [*sys.argv[1:], "--dtype", args.dtype,
                        "--per-block" if args.per_block else "--no-per-block"])
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
