"""Z-Image-Turbo, FLUX.2 klein and Qwen-Image memory benchmark: MLX peak memory of a 4-bit denoising step, the
text encoder and the autoencoder, weights built directly in MLX.

    python bench/dit_memory.py --model zimage-turbo|klein-4b|klein-9b|qwen-image|qwen-image-edit [--blocks N]
                               [--te-layers N] [--size 1024x1024] [--bits 4] [--text-tokens 512] [--batch 1]
                               [--images N]
                               [--parts transformer,text_encoder,vae] [--dtype float32] [--per-block] [--runs 1]
                               [--quantized-matmul ours|mlx]

What a 16 GB Mac needs for these models, measured as bench/flux.py measures FLUX.1 (its docstring says how; its
helpers do it): each part is built at the released shapes with random weights in MLX (our classes; construction
is lazy), cast and quantized as a converted folder loads (`convert --quantize 4`: every Linear whose input size
the group size divides, group 64), and materialised one block at a time, so the float32 weights never all
exist. Each part runs in its own child process, so that its peak is its own:

  transformer   one denoising step at --size (1024x1024: 4096 image tokens) with --text-tokens caption tokens,
                batch --batch (1: Turbo and the distilled kleins run without CFG); `--blocks N` keeps N blocks
                of each kind (Z-Image: N main layers, N noise- and N context-refiner layers; klein: N double,
                N single blocks). Take N >= 2: klein's step peaks across two consecutive blocks of a kind, so
                one of each misses 0.4-0.6 GB at 1024x1024 (bench/README.md)
  text_encoder  Qwen3 (4B for Z-Image and klein 4B, 8B for klein 9B) with --te-layers of its 36 layers, on
                --text-tokens tokens, as the family encodes: Z-Image one prompt of that many real tokens, its
                second-to-last hidden state; klein a short prompt padded to 512 with its mask, hidden states 9,
                18 and 27 stacked (at reduced depth, three states spread over the layers kept); Qwen-Image:
                Qwen2.5-VL-7B's language model (--te-layers of 28), its last hidden state, --batch prompts at
                once (true CFG encodes [negative, prompt] together); the edit release also runs the vision
                tower (--te-layers of its 32 blocks) on --images condition images at 384x384 (the Plus
                pipelines' CONDITION_AREA), their tokens in the prompt with 3D RoPE positions (edit.edit_states)
  vae           the autoencoder (Z-Image: FLUX.1's; klein: AutoencoderKLFlux2; Qwen-Image:
                AutoencoderKLQwenImage) decoding one --size latent as the pipeline does by default
                (`should_tile`) and as with --low-memory (tiles from 64x64 up); the edit release also encodes
                one --size condition image, untiled as the family does (runtime.encode_pixels)

The edit release's denoising step also carries the condition images' latents after the noisy tokens (one more
`img_shapes` frame each; the condition images are taken at --size, as the pipelines' 1024x1024 VAE_AREA makes
any square input at 1024x1024), and its caption holds their vision tokens.

Peaks are `mx.get_peak_memory()` with the weights resident; "activations" is a peak less the weights, less
again, for a Mac, the float32 weight copies our CPU QuantizedLinear makes (a tiny step run both ways measures
them). Below full depth each part is also run block by block, which times each kind of block; the weights at
full depth come exactly from a lazily built full model's parameter sizes, while a step's activation peak does
not grow with the depth once two blocks of each kind are there. The report compares the full-depth denoiser
step with the issue's goal and adds up a whole image on a 16 GB Mac, with and without --low-memory.

Run time on the 2-core CPU machine (bench/README.md): `--blocks 2 --te-layers 3` at 1024x1024 6-12 minutes
a model, half of it or more the autoencoder's two decodes. On Linux the script re-executes itself with OpenBLAS
preloaded, as the CLI does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import flux as flux_bench  # noqa: E402
from common import load_average, print_table, run_parts, whole_image  # noqa: E402

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

PARTS = ("transformer", "text_encoder", "vae")
GB = 1e9

# The released config.json files (bookkeeping keys dropped): Tongyi-MAI/Z-Image-Turbo's transformer,
# black-forest-labs/FLUX.2-klein-4B's and -9B's transformers (diffusers' Flux2Transformer2DModel defaults for
# the rest), Qwen/Qwen3-4B and Qwen/Qwen3-8B, FLUX.2-klein's vae.
ZIMAGE_TURBO = {
    "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
    "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16,
    "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2, "norm_eps": 1e-5, "qk_norm": True,
    "rope_theta": 256.0, "t_scale": 1000.0,
}
KLEIN = {
    "_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-6, "guidance_embeds": False, "in_channels": 128, "mlp_ratio": 3.0, "out_channels": None,
    "patch_size": 1, "rope_theta": 2000, "timestep_guidance_channels": 256,
}
KLEIN_4B = {**KLEIN, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680}
KLEIN_9B = {**KLEIN, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288}
QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_act": "silu", "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000,
    "vocab_size": 151936,
}
QWEN3_4B = {**QWEN3, "hidden_size": 2560, "intermediate_size": 9728}
QWEN3_8B = {**QWEN3, "hidden_size": 4096, "intermediate_size": 12288}
# Qwen/Qwen-Image's transformer, text_encoder (Qwen2.5-VL-7B-Instruct's language model) and vae config.json
QWEN_IMAGE = {
    "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
    "num_layers": 60, "out_channels": 16, "patch_size": 2,
}
QWEN25VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
# Qwen2.5-VL-7B-Instruct's vision_config (Qwen-Image-Edit's text_encoder: the edit releases read images with it)
QWEN25VL_7B_VISION = {
    "depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "hidden_size": 1280,
    "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
}
QWEN_IMAGE_VAE = {
    "_class_name": "AutoencoderKLQwenImage", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16,
}
FLUX2_VAE = {
    "_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "batch_norm_eps": 1e-4,
    "block_out_channels": [128, 256, 512, 512], "force_upcast": True, "in_channels": 3, "latent_channels": 32,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "patch_size": [2, 2], "use_post_quant_conv": True, "use_quant_conv": True,
}


@dataclass(frozen=True)
class Release:
    """A released model's parts and what its pipeline does with them."""

    title: str
    family: str  # "zimage", "flux2" or "qwenimage": FAMILIES' key
    transformer: dict
    # The transformer's lists of blocks: attribute, kind (as timed), the config key that sets its length.
    blocks: tuple[tuple[str, str, str], ...]
    text_encoder: dict
    text_encoder_title: str
    vae: dict
    goal_gb: float  # the goal for the full-depth 4-bit denoising step's MLX peak
    # --low-memory frees the transformer while the prompt is encoded (its spec's low_memory_unreads_denoiser)
    unread_while_encoding: bool = False
    images: int = 0  # condition images by default (an edit release; --images), 0: none read


ZIMAGE_BLOCKS = (("noise_refiner", "noise refiner", "n_refiner_layers"),
                 ("context_refiner", "context refiner", "n_refiner_layers"), ("layers", "main", "n_layers"))
QWEN_BLOCKS = (("transformer_blocks", "dual-stream", "num_layers"),)
KLEIN_BLOCKS = (("transformer_blocks", "double", "num_layers"),
                ("single_transformer_blocks", "single", "num_single_layers"))
RELEASES = {
    "zimage-turbo": Release("Z-Image-Turbo", "zimage", ZIMAGE_TURBO, ZIMAGE_BLOCKS, QWEN3_4B, "Qwen3-4B",
                            flux_bench.FLUX_VAE, 7.0),
    "klein-4b": Release("FLUX.2 klein 4B", "flux2", KLEIN_4B, KLEIN_BLOCKS, QWEN3_4B, "Qwen3-4B", FLUX2_VAE, 6.0),
    "klein-9b": Release("FLUX.2 klein 9B", "flux2", KLEIN_9B, KLEIN_BLOCKS, QWEN3_8B, "Qwen3-8B", FLUX2_VAE, 11.0),
    "qwen-image": Release("Qwen-Image", "qwenimage", QWEN_IMAGE, QWEN_BLOCKS, QWEN25VL_7B, "Qwen2.5-VL-7B",
                          QWEN_IMAGE_VAE, 13.0, unread_while_encoding=True),
    # Qwen-Image-Edit-2509/2511 (the Plus pipelines): the same transformer and autoencoder
    "qwen-image-edit": Release("Qwen-Image-Edit", "qwenimage", QWEN_IMAGE, QWEN_BLOCKS,
                               QWEN25VL_7B | {"vision_config": QWEN25VL_7B_VISION}, "Qwen2.5-VL-7B + vision",
                               QWEN_IMAGE_VAE, 13.0, unread_while_encoding=True, images=1),
}
# The tokens "Picture N: <|vision_start|>" and "<|vision_end|>" around each image's <|image_pad|> run in the
# Plus pipelines' template (edit.PICTURE), about 7 with Qwen2.5's tokenizer
PICTURE_TOKENS = 7


def depth_config(release: Release, blocks: int | None) -> dict:
    """The transformer's config with at most `blocks` blocks of each kind (None: the release's depth)."""
    if blocks is None:
        return release.transformer
    return release.transformer | {key: min(blocks, release.transformer[key]) for _, _, key in release.blocks}


# --- the families: how each builds its parts and runs them -----------------------------------------------

def zimage_transformer(config: dict):
    from mlx_sd_server.engine.families.zimage.transformer import ZImageTransformer2DModel, ZImageTransformerConfig

    return ZImageTransformer2DModel(ZImageTransformerConfig.from_dict(config))


def flux2_transformer(config: dict):
    from mlx_sd_server.engine.families.flux2.transformer import Flux2Transformer2DModel, Flux2TransformerConfig

    return Flux2Transformer2DModel(Flux2TransformerConfig.from_dict(config))


def qwenimage_transformer(config: dict):
    from mlx_sd_server.engine.families.qwenimage.transformer import (
        QwenImageTransformer2DModel,
        QwenImageTransformerConfig,
    )

    return QwenImageTransformer2DModel(QwenImageTransformerConfig.from_dict(config))


def zimage_inputs(config: dict, noise, batch: int, width: int, height: int, text_tokens: int, images: int) -> dict:
    """NHWC latents of FLUX.1's autoencoder; the model cuts 2x2 patches."""
    import mlx.core as mx

    return {"hidden_states": noise(batch, height // 8, width // 8, config["in_channels"]),
            "timestep": mx.full((batch,), 0.5), "cap_feats": noise(batch, text_tokens, config["cap_feat_dim"]),
            "cap_lengths": [text_tokens] * batch}


def flux2_inputs(config: dict, noise, batch: int, width: int, height: int, text_tokens: int, images: int) -> dict:
    """Tokens: the 32-channel latent's 2x2 patches, 1/16 of the image's side."""
    import mlx.core as mx

    from mlx_sd_server.engine.families.flux2.transformer import image_ids, text_ids

    h, w = height // 16, width // 16
    return {"hidden_states": noise(batch, h * w, config["in_channels"]),
            "encoder_hidden_states": noise(batch, text_tokens, config["joint_attention_dim"]),
            "timestep": mx.full((batch,), 0.5), "img_ids": image_ids(h, w), "txt_ids": text_ids(text_tokens)}


def qwenimage_inputs(config: dict, noise, batch: int, width: int, height: int, text_tokens: int, images: int) -> dict:
    """2x2-packed tokens of the 16-channel latent, then each condition image's (edit: one more frame each)."""
    import mlx.core as mx

    h, w = height // 16, width // 16
    frames = 1 + images
    return {"hidden_states": noise(batch, frames * h * w, config["in_channels"]),
            "encoder_hidden_states": noise(batch, text_tokens, config["joint_attention_dim"]),
            "encoder_hidden_states_mask": None, "timestep": mx.full((batch,), 0.5),
            "img_shapes": [[(1, h, w)] * frames] * batch}


def qwen3_encoder(settings: dict):
    from mlx_sd_server.engine.text.qwen3 import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config.from_dict(settings))


def qwen25vl_encoder(settings: dict):
    """The language model and, when `settings` has a vision_config (edit releases), the vision tower."""
    from mlx_sd_server.engine.text.qwen25vl import Qwen25VLEncoder, Qwen25VLEncoderConfig

    return Qwen25VLEncoder(Qwen25VLEncoderConfig.from_dict(settings))


def qwen3_depth(settings: dict, layers: int) -> dict:
    return settings | {"num_hidden_layers": layers}


def qwen25vl_depth(settings: dict, layers: int) -> dict:
    """At most `layers` language-model layers and vision blocks; a reduced tower keeps a full-attention block
    (its last) beside windowed ones."""
    settings = settings | {"num_hidden_layers": layers}
    vision = settings.get("vision_config")
    if vision and layers < vision["depth"]:
        full = [i for i in vision["fullatt_block_indexes"] if i < layers] or [layers - 1]
        settings["vision_config"] = vision | {"depth": layers, "fullatt_block_indexes": full}
    return settings


def zimage_encode(model, rng, batch: int, text_tokens: int, depth: int, images: int):
    """One prompt, all its tokens real (no padding, no mask); the second-to-last hidden state."""
    import mlx.core as mx

    ids = mx.array(rng.integers(0, 151643, size=(1, text_tokens)))
    return (lambda: model(ids, None, depth=depth)[depth]), (depth,)


def flux2_encode(model, rng, batch: int, text_tokens: int, depth: int, images: int):
    """A short prompt padded on the right to `text_tokens` with its mask; three hidden states stacked (at a
    reduced depth, spread over the layers kept)."""
    import mlx.core as mx
    import numpy as np

    from mlx_sd_server.engine.families.flux2.family import HIDDEN_LAYERS

    prompt = min(40, text_tokens)
    ids_np = np.full((1, text_tokens), 151643)  # <|endoftext|>, Qwen's pad token
    ids_np[0, :prompt] = rng.integers(0, 151643, size=prompt)
    ids = mx.array(ids_np)
    mask = mx.array((np.arange(text_tokens) < prompt)[None].astype(np.int32))
    stacked = tuple(max(1, round(i * depth / max(HIDDEN_LAYERS))) for i in HIDDEN_LAYERS)

    def encode():
        states = model(ids, mask, depth=max(stacked))
        return mx.concatenate([states[i] for i in stacked], axis=-1)  # the list is gone before evaluation

    return encode, stacked


def qwenimage_encode(model, rng, batch: int, text_tokens: int, depth: int, images: int):
    """`batch` prompts at once (true CFG: [negative, prompt]), the last hidden state of every layer run; with
    condition images each prompt first holds their runs of image tokens, read by the vision tower once for all
    and placed with 3D RoPE positions, as QwenImageFamily.encode_prompts does (edit.edit_states)."""
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from mlx_sd_server.engine.families.qwenimage import edit

    if not images:
        ids = mx.array(rng.integers(0, 151643, size=(batch, text_tokens)))
        return (lambda: model(ids, attention_mask=None)), (depth,)
    square = Image.fromarray(rng.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8))
    pixel_values, grid, counts = edit.vision_inputs("edit-plus", [square] * images)
    image_token = model.config.image_token_id
    prefix: list[int] = []
    for count in counts:  # "Picture N: <|vision_start|>" <|image_pad|> x count "<|vision_end|>"
        prefix += [*rng.integers(0, 151643, size=PICTURE_TOKENS - 1).tolist(), *[image_token] * count, 151653]
    token_ids = [prefix + rng.integers(0, 151643, size=text_tokens).tolist() for _ in range(batch)]
    return (lambda: edit.edit_states(model, token_ids, pixel_values, grid, image_token, 151643)[0]), (depth,)


def caption_tokens(release: Release, text_tokens: int, images: int) -> int:
    """The caption's length: --text-tokens, and on an edit release each condition image's vision tokens with
    the text around them (384x384 -> 392x392 in 14-pixel patches merged 2x2: 196)."""
    if not images:
        return text_tokens
    from mlx_sd_server.engine.families.qwenimage import edit
    from mlx_sd_server.engine.text.qwen25vl_vision import image_token_counts, smart_resize

    processor = edit.PROCESSOR
    h, w = smart_resize(*reversed(edit.area_size(edit.CONDITION_AREA, 1024, 1024)),
                        processor.patch_size * processor.merge_size, processor.min_pixels, processor.max_pixels)
    count = image_token_counts([(1, h // processor.patch_size, w // processor.patch_size)], processor.merge_size)[0]
    return text_tokens + images * (count + PICTURE_TOKENS)


def flux_vae(config: dict):
    from mlx_sd_server.engine.vae import Autoencoder, VAEConfig

    return Autoencoder(VAEConfig.from_dict(config))


def flux2_vae(config: dict):
    from mlx_sd_server.engine.vae import Flux2Autoencoder, Flux2VAEConfig

    return Flux2Autoencoder(Flux2VAEConfig.from_dict(config))


def qwenimage_vae(config: dict):
    from mlx_sd_server.engine.families.qwenimage.vae import AutoencoderKLQwenImage, QwenImageVAEConfig

    return AutoencoderKLQwenImage(QwenImageVAEConfig.from_dict(config))


@dataclass(frozen=True)
class FamilyParts:
    """How a family builds its parts (from config dicts) and calls them."""

    transformer: Callable[[dict], Any]
    inputs: Callable[..., dict]  # (config, noise, batch, width, height, text tokens, images) -> keyword arguments
    text_encoder: Callable[[dict], Any]
    text_depth: Callable[[dict, int], dict]  # the text encoder's settings at a depth
    encode: Callable[..., tuple[Callable[[], Any], tuple[int, ...]]]  # -> (the encode, hidden states taken)
    vae: Callable[[dict], Any]
    latent_channels: str  # the vae config's key


FAMILIES = {
    "zimage": FamilyParts(zimage_transformer, zimage_inputs, qwen3_encoder, qwen3_depth, zimage_encode, flux_vae,
                          "latent_channels"),
    "flux2": FamilyParts(flux2_transformer, flux2_inputs, qwen3_encoder, qwen3_depth, flux2_encode, flux2_vae,
                         "latent_channels"),
    "qwenimage": FamilyParts(qwenimage_transformer, qwenimage_inputs, qwen25vl_encoder, qwen25vl_depth,
                             qwenimage_encode, qwenimage_vae, "z_dim"),
}


# --- the parts -------------------------------------------------------------------------------------------

def full_weights(model) -> dict:
    """A lazily built full-depth model's weight bytes, as here and as a Mac holds them (half-precision floats)."""
    return {"full_weights_bytes": flux_bench.weight_bytes(model),
            "full_weights_mac_bytes": flux_bench.weight_bytes(model, 2)}


def build_transformer(release: Release, config: dict, dtype, args):
    return flux_bench.prepare(FAMILIES[release.family].transformer(config), dtype, args.bits, args.group_size)


def transformer_inputs(release: Release, dtype, batch: int, width: int, height: int, text_tokens: int,
                       images: int) -> dict:
    """The transformer's keyword arguments for one step, as the family's denoiser calls it (random, evaluated)."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)

    def noise(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    inputs = FAMILIES[release.family].inputs(release.transformer, noise, batch, width, height,
                                             caption_tokens(release, text_tokens, images), images)
    mx.eval([v for v in inputs.values() if isinstance(v, mx.array)])
    return inputs


def measure_transformer(args) -> dict:
    import mlx.core as mx

    release = RELEASES[args.model]
    dtype = getattr(mx, args.dtype)
    full = build_transformer(release, release.transformer, dtype, args)  # never evaluated: sizes only
    results = full_weights(full) | {
        "block_bytes": {kind: flux_bench.weight_bytes(getattr(full, attr)[0]) for attr, kind, _ in release.blocks}}
    del full
    model = build_transformer(release, depth_config(release, args.blocks), dtype, args)
    results["weights_bytes"] = flux_bench.weight_bytes(model)
    results |= flux_bench.materialise([*(b for attr, _, _ in release.blocks for b in getattr(model, attr)), model])

    inputs = transformer_inputs(release, dtype, args.batch, *args.size, args.text_tokens, args.images)
    results["image_tokens"] = inputs["hidden_states"].shape[1] if release.family != "zimage" else None
    results["caption_tokens"] = caption_tokens(release, args.text_tokens, args.images)

    def step(inputs: dict = inputs):
        mx.eval(model(**inputs))  # as the family's denoiser: one call, one evaluation

    results |= flux_bench.timed_runs(step, args.runs)
    if args.per_block:
        results |= flux_bench.per_block(model, {attr: kind for attr, kind, _ in release.blocks}, step)
    # 16 image + 8 text tokens (+ the condition images'): > QMM_MAX_ROWS
    tiny = transformer_inputs(release, dtype, args.batch, 64, 64, 8, args.images)
    results["transient_bytes"] = flux_bench.dequantize_transient(model, lambda: step(tiny))
    return results


def used_depth(release: Release, layers: int) -> int:
    """How many text-encoder layers the family runs: Z-Image the second-to-last hidden state (all layers but the
    last), klein up to hidden state 27 (of 36), Qwen-Image all; at a reduced depth, all that are kept."""
    from mlx_sd_server.engine.families.flux2.family import HIDDEN_LAYERS

    if layers < release.text_encoder["num_hidden_layers"] or release.family == "qwenimage":
        return layers
    return layers - 1 if release.family == "zimage" else max(HIDDEN_LAYERS)


def measure_text_encoder(args) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_sd_server.engine.text.qwen3 import QWEN3_ENCODER

    release = RELEASES[args.model]
    parts = FAMILIES[release.family]
    dtype = getattr(mx, args.dtype)
    if dtype == mx.float16:
        dtype = QWEN3_ENCODER.instead_of_float16  # as load_model: bfloat16 (Qwen2.5-VL's kind too)

    def build(layers: int):
        settings = parts.text_depth(release.text_encoder, layers)
        return flux_bench.prepare(parts.text_encoder(settings), dtype, args.bits, args.group_size)

    full_layers = release.text_encoder["num_hidden_layers"]
    full = build(full_layers)
    visual = getattr(full, "visual", None)
    results = full_weights(full) | {
        "layer_bytes": flux_bench.weight_bytes(full.layers[0]), "used_depth": used_depth(release, full_layers),
        "embedding_bytes": flux_bench.weight_bytes(full.embed_tokens),
        "embedding_mac_bytes": flux_bench.weight_bytes(full.embed_tokens, 2),
        "vision_bytes": flux_bench.weight_bytes(visual) if visual else 0,
        "vision_mac_bytes": flux_bench.weight_bytes(visual, 2) if visual else 0}
    del full, visual
    model = build(args.te_layers)
    results["weights_bytes"] = flux_bench.weight_bytes(model)
    vision_blocks = model.visual.blocks if hasattr(model, "visual") else []
    results |= flux_bench.materialise([*model.layers, *vision_blocks, model])

    rng = np.random.default_rng(0)
    depth = used_depth(release, args.te_layers)
    batch = args.batch if release.family == "qwenimage" else 1
    encode, stacked = parts.encode(model, rng, batch, args.text_tokens, depth, args.images)
    results["stacked_states"] = stacked

    def step(encode=encode):
        mx.eval(encode())

    results |= flux_bench.timed_runs(step, args.runs)
    if args.per_block:
        results |= flux_bench.per_block(model, {"layers": "layer"}, step)
    tiny, _ = parts.encode(model, rng, batch, 16, depth, args.images)
    results["transient_bytes"] = flux_bench.dequantize_transient(model, lambda: step(tiny))
    return results


def measure_vae(args) -> dict:
    """Both decodes of one latent: as the pipeline decodes by default and with --low-memory; with condition
    images, one image's encode as the family encodes it (untiled)."""
    import mlx.core as mx
    import numpy as np

    from mlx_sd_server.engine.vae import should_tile

    release = RELEASES[args.model]
    parts = FAMILIES[release.family]
    # force_upcast: float32 whatever the compute dtype (load_model's vae_dtype)
    model = flux_bench.prepare(parts.vae(release.vae), mx.float32, args.bits, args.group_size)
    weights = {"weights_bytes": flux_bench.weight_bytes(model)}
    weights["full_weights_bytes"] = weights["full_weights_mac_bytes"] = weights["weights_bytes"]
    weights |= flux_bench.materialise([model])
    width, height = args.size
    h, w = height // 8, width // 8
    rng = np.random.default_rng(0)
    latent = mx.array(rng.standard_normal((1, h, w, release.vae[parts.latent_channels]), np.float32))
    pixels = mx.array(rng.uniform(-1, 1, (1, height, width, 3)).astype(np.float32))
    mx.eval(latent, pixels)
    runs = {mode: (lambda tiled=should_tile(h, w, low): model.decode_tiled(latent) if tiled else model.decode(latent),
                   should_tile(h, w, low))
            for mode, low in (("default", False), ("low_memory", True))}
    if args.images:
        runs["encode"] = (lambda: model.encode(pixels)[0], False)  # runtime.encode_pixels: never tiled
    results = {}
    for mode, (run, tiled) in runs.items():

        def step(run=run):
            mx.eval(run())

        # its few quantized linears (the mid-block attention's) are 1 MB each: no transient worth measuring
        results[mode] = weights | {"tiled": tiled, "transient_bytes": 0} | flux_bench.timed_runs(step, args.runs)
    return results


MEASURE = {"transformer": measure_transformer, "text_encoder": measure_text_encoder, "vae": measure_vae}


# --- the report ------------------------------------------------------------------------------------------

def report(args, results: dict) -> None:
    release = RELEASES[args.model]
    width, height = args.size
    columns: dict[str, dict] = {}
    if "transformer" in results:
        columns["transformer"] = results["transformer"]
    if "text_encoder" in results:
        columns["text encoder"] = results["text_encoder"]
    if "vae" in results:
        columns["vae"] = results["vae"]["default"]
        columns["vae low-memory"] = results["vae"]["low_memory"]
        if "encode" in results["vae"]:
            columns["vae encode"] = results["vae"]["encode"]
    names = list(columns)
    activation = {n: c["peak_bytes"] - c["resident_bytes"] for n, c in columns.items()}
    metal = {n: activation[n] - c["transient_bytes"] for n, c in columns.items()}
    depth_of = {"transformer": "+".join(str(n) for n in block_counts(release, args.blocks).values()) + " blocks",
                "text encoder": f"{args.te_layers} layers", "vae": "", "vae low-memory": "", "vae encode": "untiled"}
    for name in ("vae", "vae low-memory"):
        if name in columns:
            depth_of[name] = "tiled" if columns[name]["tiled"] else "untiled"

    def row(label: str, key: str, scale: float = GB, number_format: str = ".2f"):
        return label, [columns[n][key] / scale for n in names], number_format

    weights = f"{args.bits}-bit (group {args.group_size})" if args.bits else "unquantized"
    print()
    images = f", {args.images} condition image(s)" if args.images else ""
    print_table(f"{release.title}, measured: {weights}, {args.dtype}, {width}x{height}, batch {args.batch}, "
                f"{args.text_tokens} text tokens{images}, median of {args.runs}", names, [
        ("depth", [depth_of[n] for n in names], ""),
        row("weights resident (GB)", "resident_bytes"),
        row("build peak (GB)", "build_peak_bytes"),
        row("build (s)", "build_s", 1, ".1f"),
        row("step / encode / decode (s)", "step_s", 1, ".2f"),
        row("MLX peak (GB)", "peak_bytes"),
        ("activations: peak - weights (GB)", [activation[n] / GB for n in names], ".2f"),
        row("  of which dequantized weights (GB)", "transient_bytes"),
        ("  the rest (as on Metal) (GB)", [metal[n] / GB for n in names], ".2f"),
        row("weights at full depth (GB)", "full_weights_bytes"),
        row("  as a Mac holds them (GB)", "full_weights_mac_bytes"),
    ])
    tr, te = results.get("transformer"), results.get("text_encoder")
    if tr:
        if tr.get("image_tokens"):
            print(f"\ntransformer tokens: {tr['image_tokens']} image, {tr['caption_tokens']} caption")
        print("\ntransformer weights per block: " + ", ".join(
            f"{kind} {size / GB:.3f} GB" for kind, size in tr["block_bytes"].items()))
        full_counts = block_counts(release, None)
        if "profile_total_s" in tr:
            full_s = tr["other_s"] + sum(full_counts[kind] * tr[f"{kind}_s"] for kind in full_counts)
            print("transformer block by block: " + ", ".join(f"{kind} {tr[f'{kind}_s']:.2f} s" for kind in full_counts)
                  + f", the rest {tr['other_s']:.2f} s (that step {tr['profile_total_s']:.2f} s; one call "
                  f"{tr['step_s']:.2f} s); highest peak within a block {tr['block_peak_bytes'] / GB:.2f} GB")
            print(f"  full depth ({', '.join(f'{n} {k}' for k, n in full_counts.items())}): {full_s:.0f} s per step "
                  f"on this CPU")
        step_peak = (tr["full_weights_bytes"] + activation["transformer"]) / GB
        mac_peak = (tr["full_weights_mac_bytes"] + metal["transformer"]) / GB
        print(f"full-depth step peak: here {tr['full_weights_bytes'] / GB:.2f} GB weights + "
              f"{activation['transformer'] / GB:.2f} GB activations = {step_peak:.2f} GB; a Mac (float16 scales, no "
              f"dequantized copies) {tr['full_weights_mac_bytes'] / GB:.2f} + {metal['transformer'] / GB:.2f} = "
              f"{mac_peak:.2f} GB")
        worst = max(step_peak, mac_peak)
        print(f"  goal <= {release.goal_gb:.0f} GB for the step: {'met' if worst <= release.goal_gb else 'NOT met'} "
              f"({worst:.2f} GB at most)")
    if te:
        print(f"\n{release.text_encoder_title} weights per layer {te['layer_bytes'] / GB:.3f} GB; its token embedding "
              f"(not quantized: an Embedding, not a Linear) {te['embedding_bytes'] / GB:.2f} GB "
              f"({te['embedding_mac_bytes'] / GB:.2f} GB in bfloat16); hidden states {list(te['stacked_states'])} "
              f"taken at this depth")
        if te.get("vision_bytes"):
            print(f"  of its weights the vision tower's {te['vision_bytes'] / GB:.2f} GB "
                  f"({te['vision_mac_bytes'] / GB:.2f} GB on a Mac), run on {args.images} condition image(s)")
        if "profile_total_s" in te:
            full_s = te["other_s"] + te["used_depth"] * te["layer_s"]
            print(f"text encoder layer by layer: {te['layer_s']:.2f} s per layer, the rest {te['other_s']:.2f} s; the "
                  f"{te['used_depth']} layers the pipeline runs: {full_s:.1f} s")
        print(f"  full encode peak: here {te['full_weights_bytes'] / GB:.2f} GB weights + "
              f"{activation['text encoder'] / GB:.2f} GB activations = "
              f"{(te['full_weights_bytes'] + activation['text encoder']) / GB:.2f} GB; a Mac (bfloat16) "
              f"{(te['full_weights_mac_bytes'] + metal['text encoder']) / GB:.2f} GB")
    if tr and te and "vae" in results:
        for label, key, act in (("weights and activations as measured here", "full_weights_bytes", activation),
                                ("a 16 GB Mac: float16 scales (bfloat16 Qwen3), activations less the CPU's dequantized "
                                 "weights", "full_weights_mac_bytes", metal)):
            vae = columns["vae"]
            # an edit job encodes its condition images too: the larger of the two encodes' activations
            encoding = max(act["text encoder"], act.get("vae encode", 0))
            whole_image(label, {"transformer": tr[key] / GB, "text encoder": te[key] / GB, "vae": vae[key] / GB},
                        ("text encoder",), {"encoding": encoding / GB, "denoising": act["transformer"] / GB,
                                            "decoding": act["vae"] / GB}, act["vae low-memory"] / GB,
                        unread_while_encoding=("transformer",) if release.unread_while_encoding else ())
        print(f"  (activations measured in {args.dtype}; the transformer's and Qwen3's in half precision would be "
              f"about half; the autoencoder runs in float32 either way)")


def block_counts(release: Release, blocks: int | None) -> dict[str, int]:
    """Blocks of each kind at `blocks` (None: the release's depth)."""
    config = depth_config(release, blocks)
    return {kind: config[key] for _, kind, key in release.blocks}


# --- main ------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(RELEASES), required=True)
    parser.add_argument("--blocks", type=int,
                        help="transformer blocks of each kind, 2 or more (default: the release's)")
    parser.add_argument("--te-layers", type=int,
                        help="text-encoder layers (and vision blocks) (default: all: Qwen3 36, Qwen2.5-VL 28)")
    parser.add_argument("--size", type=flux_bench.size, default=(1024, 1024), help="WxH image (default: 1024x1024)")
    parser.add_argument("--bits", type=int, default=4, help="quantization bits, 0 for none (default: 4)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=512,
                        help="prompt tokens (Z-Image, klein: up to 512; Qwen-Image: the template's and prompt's)")
    parser.add_argument("--batch", type=int, default=1, help="1: no CFG (Turbo, distilled klein), 2: with CFG")
    parser.add_argument("--images", type=int, help="condition images, edit releases only, 1 to 3 (default: 1)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="compute dtype (default: as load_model, float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--per-block", action=argparse.BooleanOptionalAction, default=None,
                        help="also time block by block (default: only below full depth)")
    parser.add_argument("--runs", type=int, default=1, help="steps per part (median; the peak is over all)")
    parser.add_argument("--quantized-matmul", choices=["ours", "mlx"], default="ours",
                        help="mlx: MLX's own QuantizedLinear, as on Metal (see bench/flux.py)")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_fast_blas()

    import mlx.core as mx

    release = RELEASES[args.model]
    full_layers = release.text_encoder["num_hidden_layers"]
    args.te_layers = min(args.te_layers or full_layers, full_layers)
    args.images = release.images if args.images is None else args.images
    if args.images and not release.images or not 0 <= args.images <= 3:
        parser.error(f"--images {args.images}: {args.model} reads {'1 to 3' if release.images else 'no'} images")
    args.dtype = args.dtype or ("float16" if mx.default_device() == mx.gpu else "float32")
    if args.per_block is None:
        reduced = block_counts(release, args.blocks) != block_counts(release, None)
        args.per_block = reduced or args.te_layers < full_layers
    if args.child:
        flux_bench.MLX_QUANTIZED_MATMUL = args.quantized_matmul == "mlx"
        print(json.dumps(MEASURE[args.child](args)))
        return 0

    width, height = args.size
    print(f"{release.title} {width}x{height}, transformer "
          + ", ".join(f"{n} {k}" for k, n in block_counts(release, args.blocks).items())
          + f", {release.text_encoder_title} {args.te_layers} layers, {args.text_tokens} text tokens, "
          + (f"{args.images} condition image(s), " if args.images else "") + f"batch {args.batch}, "
          + (f"{args.bits}-bit group {args.group_size} ({args.quantized_matmul} quantized matmul)" if args.bits
             else "unquantized") + f", {args.dtype}; MLX {mx.__version__} on {mx.default_device()}; at start: "
          f"{load_average()}", flush=True)
    results = run_parts(__file__, PARTS, args.parts, [*sys.argv[1:], "--dtype", args.dtype, "--images",
                        str(args.images), "--per-block" if args.per_block else "--no-per-block"])
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
