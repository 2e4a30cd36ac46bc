"""Qwen-Image (and its edit models) from the files its users have -> diffusers' layout.

Qwen-Image is usually downloaded as three files, as ComfyUI's guide lists them (Comfy-Org/Qwen-Image_ComfyUI):

    qwen_image_fp8_e4m3fn.safetensors, qwen_image_bf16 (or a   -> transformer   (diffusers' names, as ComfyUI's
    city96 GGUF: qwen-image-Q4_K_M.gguf)                                          model has them; maybe under
                                                                                  `model.diffusion_model.`)
    qwen_image_vae.safetensors                                 -> vae           (Wan 2.1's original layout)
    qwen_2.5_vl_7b_fp8_scaled.safetensors (or a llama.cpp      -> text_encoder  (Qwen2.5-VL in transformers'
    GGUF of Qwen2.5-VL-7B-Instruct)                                              older names, `model.` + `visual.`;
                                                                                  `--llm`)

The transformer needs no renaming; its config is read from shapes, but for the rotary embedding's split of the
head dims (a hint) and `zero_cond_t` (Qwen-Image-Edit-2511's), which ComfyUI's files mark with an empty
`__index_timestep_zero__` tensor. The autoencoder is renamed as diffusers' convert_wan_vae_to_diffusers does
(its 5-D causal convolutions kept whole; the component's mapper cuts them); its latent statistics are not in the
file (every Qwen-Image's). Qwen2.5-VL's head size, rotary sections and vision tower settings are not in its
weights either: every Qwen2.5-VL's, or a GGUF file's metadata. A llama.cpp GGUF holds the language model only
(its vision tower is a separate mmproj file, not read here): the edit models need the safetensors encoder.
The model's name tells the edit models apart (spec.variant_of).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_sd_server.engine.families.qwenimage.vae import LATENTS_MEAN, LATENTS_STD
from mlx_sd_server.engine.source import (
    ArchitectureHints,
    CheckpointError,
    FilePart,
    OriginalComponent,
    OriginalModel,
    Tensors,
    count_distinct,
    file_metadata,
    guess,
    hint_option,
    known_keys,
    split_options,
    strip_prefix,
)
from mlx_sd_server.engine.text.qwen25vl import VISUAL_PREFIX

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.spec import FamilySpec

MARKER = "transformer_blocks.0.img_mod.1.weight"  # ComfyUI's and city96's transformers: diffusers' names
COMFYUI_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_MARKER = "decoder.middle.0.residual.0.gamma"  # Wan's original autoencoder layout (diffusers' own test)
LLM_MARKER = "layers.0.self_attn.q_proj.bias"  # Qwen2's biased q projection (Qwen3's has none, but a q_norm)
EDIT_2511_MARKER = "__index_timestep_zero__"  # ComfyUI's flag for Qwen-Image-Edit-2511 (zero_cond_t)
LAYERED_MARKER = "time_text_embed.addition_t_embedding."  # Qwen-Image-Layered's (use_additional_t_cond)
QWEN_IMAGE_21_MARKERS = ("txt_in.text_norm.", "img_mlp.gate_up.")  # Qwen-Image 2.1's other architecture

DEFAULT_AXES_DIMS_ROPE = (16, 56, 56)  # the rotary embedding's (frame, row, col) split of the 128 head dims
# Qwen/Qwen-Image's scheduler_config.json (the edit models' is the same)
SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}  # the rotary embedding's (frame, row, col) split of the 128 head dims

PARTS = {
    "transformer": FilePart(
        "the Qwen-Image transformer (e.g. qwen_image_fp8_e4m3fn.safetensors)",
        MARKER,
        ("", *COMFYUI_PREFIXES),
        "--diffusion-model",
    ),
    "vae": FilePart(
        "the Qwen-Image autoencoder (qwen_image_vae.safetensors)",
        VAE_MARKER,
        ("", "vae.", "first_stage_model."),
        "--vae",
    ),
    "text_encoder": FilePart(
        "the Qwen2.5-VL text encoder (e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors or a llama.cpp GGUF of "
        "Qwen2.5-VL-7B-Instruct)",
        LLM_MARKER,
        ("model.", ""),
        "--llm",
    ),
}
OPTIONS = split_options(PARTS)
EXPECTS = "a Qwen-Image transformer (transformer_blocks.*.img_mod.1)"


def is_single_file(names: Iterable[str]) -> bool:
    """A Qwen-Image transformer file (ComfyUI's, a GGUF's), bare or under ComfyUI's prefixes."""
    return any(name == MARKER or any(name == p + MARKER for p in COMFYUI_PREFIXES) for name in names)


def parts(names: Collection[str]) -> dict[str, FilePart]:
    """Qwen-Image's files; Qwen-Image-Layered and Qwen-Image 2.1 are refused before the others are asked for."""
    for name in names:
        bare = next((name[len(p) :] for p in COMFYUI_PREFIXES if name.startswith(p)), name)
        if bare.startswith(LAYERED_MARKER):
            raise CheckpointError("this is a Qwen-Image-Layered transformer, which is not supported")
        if any(marker in bare for marker in QWEN_IMAGE_21_MARKERS):
            raise CheckpointError("this is a Qwen-Image 2.1 transformer, which is not supported")
    return PARTS


# --- the transformer --------------------------------------------------------------------------------------

# diffusers QwenImageTransformer2DModel's modules (a block's with its index removed); ComfyUI's are the same.
TOP_MODULES = (
    "img_in",
    "txt_in",
    "txt_norm",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)
BLOCK_MODULES = tuple(
    [f"attn.{m}" for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    + [f"attn.{m}" for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k", "to_out.0")]
    + [f"{s}_{m}" for s in ("img", "txt") for m in ("mod.1", "mlp.net.0.proj", "mlp.net.2")]
)


def is_qwenimage_transformer_key(key: str) -> bool:
    """A diffusers QwenImageTransformer2DModel weight name (prefix removed), or ComfyUI's 2511 flag."""
    if key == EDIT_2511_MARKER:
        return True
    module = key.rpartition(".")[0]
    if m := re.fullmatch(r"transformer_blocks\.\d+\.(.+)", module):
        return m[1] in BLOCK_MODULES
    return module in TOP_MODULES


def map_qwenimage_transformer_file_weight(key: str, value: np.ndarray, prefix: str) -> list[tuple[str, np.ndarray]]:
    """One ComfyUI/GGUF Qwen-Image transformer (key, value) as diffusers': its prefix removed, the 2511 flag
    (a config value, not a weight) dropped."""
    key = key[len(prefix) :]
    return [] if key == EDIT_2511_MARKER else [(key, value)]


def qwenimage_transformer_config(
    state: Tensors, latent_channels: int, axes_dims_rope: Iterable[int] | None = None
) -> dict[str, Any]:
    """The diffusers QwenImageTransformer2DModel config.json for weights in its names (prefix removed), from
    shapes and the latent channels (the patch embedder reads patch x patch x channels); the rotary split is
    `axes_dims_rope` (None: Qwen-Image's, which only 128-dim heads take)."""
    try:
        inner, in_channels = state["img_in.weight"].shape
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        out_features = state["proj_out.weight"].shape[0]
        joint = state["txt_in.weight"].shape[1]
    except KeyError as err:
        raise CheckpointError(f"this Qwen-Image transformer has no {err.args[0]}: the file is incomplete") from None
    patch = math.isqrt(in_channels // latent_channels)
    if patch * patch * latent_channels != in_channels or out_features % (patch * patch) or inner % head_dim:
        raise CheckpointError(
            f"this Qwen-Image transformer's shapes (input {in_channels}, output {out_features}, width {inner}, "
            f"{head_dim}-dim heads) are not patches of {latent_channels} latent channels"
        )
    if axes_dims_rope is None:
        if head_dim != sum(DEFAULT_AXES_DIMS_ROPE):
            raise CheckpointError(
                f"this Qwen-Image transformer has {head_dim}-dim attention heads, not Qwen-Image's 128, so its "
                f"rotary embedding's split of them is unknown: pass axes_dims_rope ({hint_option('axes_dims_rope')}: "
                f"three even numbers summing to {head_dim})"
            )
        axes_dims_rope = DEFAULT_AXES_DIMS_ROPE
    axes = list(axes_dims_rope)
    if len(axes) != 3 or sum(axes) != head_dim:
        raise CheckpointError(f"axes_dims_rope {axes} must be three numbers summing to the head size, {head_dim}")
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "attention_head_dim": head_dim,
        "axes_dims_rope": axes,
        "guidance_embeds": False,
        "in_channels": in_channels,
        "joint_attention_dim": joint,
        "num_attention_heads": inner // head_dim,
        "num_layers": count_distinct(state, r"transformer_blocks\.(\d+)\."),
        "out_channels": out_features // (patch * patch),
        "patch_size": patch,
        "zero_cond_t": EDIT_2511_MARKER in state,
    }


def read_transformer(
    tensors: Tensors, prefix: str, latent_channels: int, hints: ArchitectureHints
) -> OriginalComponent:
    keys = known_keys(tensors, prefix, is_qwenimage_transformer_key, "transformer")
    config = qwenimage_transformer_config(strip_prefix(tensors, prefix), latent_channels, hints.axes_dims_rope)
    # not given: Qwen-Image's split, which only its 128-dim heads take (others are refused above)
    guessed = guess(hints, "axes_dims_rope", config, "axes_dims_rope", standard=True)
    mapper = partial(map_qwenimage_transformer_file_weight, prefix=prefix)
    return OriginalComponent(config, keys, mapper, guessed=guessed)


# --- the autoencoder: Wan 2.1's layout --------------------------------------------------------------------

# A residual block's parts (Wan's nn.Sequential: RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv)
RESIDUAL_NAMES = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}
VAE_TOP_NAMES = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.0": "decoder.norm_out",
    "decoder.head.2": "decoder.conv_out",
}
RESAMPLE_MODULES = ("resample.1", "time_conv")


def residual_name(module: str) -> str | None:
    return RESIDUAL_NAMES.get(module)


def wan_vae_module(module: str, num_res_blocks: int) -> str | None:
    """A Wan autoencoder module name (prefix removed) -> AutoencoderKLQwenImage's; None if unknown.

    The encoder's `downsamples` are a flat list as diffusers' `down_blocks` are; the decoder's `upsamples` are
    flat too (each level's num_res_blocks + 1 residual blocks, then its upsampler but for the last level's),
    diffusers' `up_blocks` one block a level."""
    if module in VAE_TOP_NAMES:
        return VAE_TOP_NAMES[module]
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.+)", module):
        coder, index, inner = m[1], int(m[2]), m[3]
        if index == 1:
            return f"{coder}.mid_block.attentions.0.{inner}" if inner in ("norm", "to_qkv", "proj") else None
        name = residual_name(inner)
        return None if name is None or index not in (0, 2) else f"{coder}.mid_block.resnets.{index // 2}.{name}"
    if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", module):
        name = m[2] if m[2] in RESAMPLE_MODULES else residual_name(m[2])
        return None if name is None else f"encoder.down_blocks.{m[1]}.{name}"
    if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", module):
        level, position = divmod(int(m[1]), num_res_blocks + 2)
        if position == num_res_blocks + 1:
            return f"decoder.up_blocks.{level}.upsamplers.0.{m[2]}" if m[2] in RESAMPLE_MODULES else None
        name = residual_name(m[2])
        return None if name is None else f"decoder.up_blocks.{level}.resnets.{position}.{name}"
    return None


def map_wan_vae_weight(key: str, value: np.ndarray, num_res_blocks: int) -> list[tuple[str, np.ndarray]]:
    """One Wan-layout autoencoder (key, value), prefix removed, as AutoencoderKLQwenImage's (values unchanged:
    the component's mapper cuts the causal 3-D convolutions to 2-D)."""
    module, _, param = key.rpartition(".")
    name = wan_vae_module(module, num_res_blocks)
    if name is None:
        raise KeyError(f"not a Qwen-Image autoencoder weight: {key}")
    return [(f"{name}.{param}", value)]


def wan_vae_config(vae: Tensors) -> dict[str, Any]:
    """The diffusers AutoencoderKLQwenImage config.json for Wan-layout weights (prefix removed), from shapes:
    the encoder's flat list gives the levels (a resampler ends each but the last), the residual blocks a level,
    their widths and which resamplers also halve time (a `time_conv`). The latent statistics are Qwen-Image's."""
    try:
        base_dim, input_channels = vae["encoder.conv1.weight"].shape[:2]
        z_dim = vae["conv2.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"this Qwen-Image autoencoder has no {err.args[0]}: the file is incomplete") from None
    entries = count_distinct(vae, r"encoder\.downsamples\.(\d+)\.")
    resamplers = [i for i in range(entries) if f"encoder.downsamples.{i}.resample.1.weight" in vae]
    if any(".to_qkv." in k for k in vae if k.startswith("encoder.downsamples.")):
        raise CheckpointError("this autoencoder has attention in its encoder's levels (attn_scales): not supported")
    if not resamplers:
        raise CheckpointError("this Qwen-Image autoencoder's encoder has no downsampling levels")
    num_res_blocks = resamplers[0]
    levels = len(resamplers) + 1
    if entries != levels * num_res_blocks + len(resamplers):
        raise CheckpointError(
            f"this Qwen-Image autoencoder's encoder has {entries} blocks, not {levels} levels of {num_res_blocks} "
            "residual blocks and a resampler"
        )
    first = [i * (num_res_blocks + 1) for i in range(levels)]  # each level's first residual block
    widths = [vae[f"encoder.downsamples.{i}.residual.2.weight"].shape[0] for i in first]
    if any(w % base_dim for w in widths):
        raise CheckpointError(f"this Qwen-Image autoencoder's widths {widths} are not multiples of {base_dim}")
    return {
        "_class_name": "AutoencoderKLQwenImage",
        "attn_scales": [],
        "base_dim": base_dim,
        "dim_mult": [w // base_dim for w in widths],
        "dropout": 0.0,
        "input_channels": input_channels,
        "latents_mean": list(LATENTS_MEAN),
        "latents_std": list(LATENTS_STD),
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": [f"encoder.downsamples.{i}.time_conv.weight" in vae for i in resamplers],
        "z_dim": z_dim,
    }


def read_vae(tensors: Tensors, prefix: str) -> OriginalComponent:
    config = wan_vae_config(strip_prefix(tensors, prefix))
    blocks = config["num_res_blocks"]

    def known(key: str) -> bool:
        return wan_vae_module(key.rpartition(".")[0], blocks) is not None

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return map_wan_vae_weight(key[len(prefix) :], value, blocks)

    return OriginalComponent(config, known_keys(tensors, prefix, known, "VAE"), mapper)


# --- the text encoder: Qwen2.5-VL -------------------------------------------------------------------------

LLM_WEIGHTS = ("embed_tokens.", "layers.", "norm.")  # the language model's (under `model.` in ComfyUI's file)
LM_HEAD = "lm_head.weight"  # a causal LM's output layer: not an encoder's
GGUF_ARCHITECTURE = "qwen2vl"  # llama.cpp's `general.architecture` for Qwen2-VL and Qwen2.5-VL
# Every Qwen2.5-VL's (3B, 7B, 72B), not in the weights; a GGUF file's metadata says the language model's.
HEAD_DIM = 128
MROPE_SECTION = (16, 24, 24)
ROPE_THETA = 1_000_000.0
RMS_NORM_EPS = 1e-6
CONTEXT = 128000
VISION_HEAD_DIM = 80
FULL_ATTENTION_EVERY = 8  # the vision tower's blocks 7, 15, 23, 31 attend to the whole image, the others by window
VISION_WINDOW = 112
# Qwen2.5-VL's tokenizer's ids of the tokens that frame an image (not in the weights)
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_TOKEN_ID, VISION_END_TOKEN_ID = 151655, 151656, 151652, 151653


def gguf_hyperparameters(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A llama.cpp Qwen2.5-VL GGUF file's hyperparameters (`qwen2vl.rope.freq_base`, ..., prefix removed)."""
    if metadata.get("general.architecture") != GGUF_ARCHITECTURE:
        return {}
    prefix = GGUF_ARCHITECTURE + "."
    return {key[len(prefix) :]: value for key, value in metadata.items() if key.startswith(prefix)}


def qwen25vl_vision_config(visual: Tensors, out_hidden_size: int) -> dict[str, Any]:
    """transformers' Qwen2_5_VLVisionConfig for a vision tower's weights (`visual.` removed): widths from shapes,
    the head size and attention windows every Qwen2.5-VL's."""
    hidden, patch_values = visual["patch_embed.proj.weight"].shape[:2]
    kernel = visual["patch_embed.proj.weight"].shape
    depth = count_distinct(visual, r"blocks\.(\d+)\.")
    merged = visual["merger.mlp.0.weight"].shape[1]
    if hidden % VISION_HEAD_DIM or merged % hidden:
        raise CheckpointError(
            f"this Qwen2.5-VL vision tower's width {hidden} is not Qwen2.5-VL's ({VISION_HEAD_DIM}-dim heads)"
        )
    return {
        "depth": depth,
        "fullatt_block_indexes": list(range(FULL_ATTENTION_EVERY - 1, depth, FULL_ATTENTION_EVERY)),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "in_chans": patch_values,
        "intermediate_size": visual["blocks.0.mlp.gate_proj.weight"].shape[0],
        "model_type": "qwen2_5_vl",
        "num_heads": hidden // VISION_HEAD_DIM,
        "out_hidden_size": out_hidden_size,
        "patch_size": kernel[-1],
        "spatial_merge_size": math.isqrt(merged // hidden),
        "temporal_patch_size": kernel[2] if len(kernel) == 5 else 2,
        "tokens_per_second": 2,
        "window_size": VISION_WINDOW,
    }


def qwen25vl_config(llm: Tensors, visual: Tensors, gguf: Mapping[str, Any]) -> dict[str, Any]:
    """The Qwen2_5_VLForConditionalGeneration config.json (transformers 4's flat layout, as Qwen-Image's) for
    language model weights in Qwen2Model's names and a vision tower's (`visual` may be empty: none), from shapes,
    a llama.cpp file's hyperparameters (`gguf`) where it has them, else every Qwen2.5-VL's."""
    try:
        vocab_size, hidden_size = llm["embed_tokens.weight"].shape
        q_rows = llm["layers.0.self_attn.q_proj.weight"].shape[0]
        kv_rows = llm["layers.0.self_attn.k_proj.weight"].shape[0]
        intermediate = llm["layers.0.mlp.gate_proj.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"this Qwen2.5-VL text encoder has no {err.args[0]}: the file is incomplete") from None
    heads = int(gguf.get("attention.head_count", q_rows // HEAD_DIM))
    kv_heads = int(gguf.get("attention.head_count_kv", kv_rows // (q_rows // heads)))
    sections = [int(s) for s in gguf.get("rope.dimension_sections", MROPE_SECTION) if s]
    if q_rows % heads or 2 * sum(sections) != q_rows // heads:
        raise CheckpointError(
            f"this Qwen2.5-VL text encoder's q projection ({q_rows} rows) is not {heads} heads whose rotary "
            f"sections are {sections}"
        )
    config: dict[str, Any] = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "image_token_id": IMAGE_TOKEN_ID,
        "intermediate_size": intermediate,
        "max_position_embeddings": int(gguf.get("context_length", CONTEXT)),
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": count_distinct(llm, r"layers\.(\d+)\."),
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(gguf.get("attention.layer_norm_rms_epsilon", RMS_NORM_EPS)),
        "rope_scaling": {"type": "mrope", "mrope_section": sections},
        "rope_theta": float(gguf.get("rope.freq_base", ROPE_THETA)),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_end_token_id": VISION_END_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
        "vocab_size": vocab_size,
    }
    if visual:
        config["vision_config"] = qwen25vl_vision_config(visual, hidden_size)
    return config


def read_qwen25vl(tensors: Tensors, prefix: str) -> OriginalComponent:
    """Qwen2.5-VL as Qwen-Image's text encoder: the language model under `prefix` (ComfyUI's `model.`, or none:
    a llama.cpp GGUF renamed as read), its LM head left out, and the vision tower under `visual.` if the file
    has it; written in a Qwen2_5_VLForConditionalGeneration checkpoint's names (`model.*`, `visual.*`)."""

    def known(key: str) -> bool:
        return key.startswith(LLM_WEIGHTS) or key == LM_HEAD or (not prefix and key.startswith(VISUAL_PREFIX))

    found = known_keys(tensors, prefix, known, "Qwen2.5-VL")
    visual = [k for k in tensors if k.startswith(VISUAL_PREFIX)] if prefix else []
    keys = [k for k in found if k[len(prefix) :] != LM_HEAD] + visual

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        if key.startswith(VISUAL_PREFIX):
            return [(key, value)]
        return [("model." + key[len(prefix) :], value)]

    llm = {k[len(prefix) :]: tensors[k] for k in keys if not k.startswith(VISUAL_PREFIX)}
    config = qwen25vl_config(llm, strip_prefix(tensors, VISUAL_PREFIX), gguf_hyperparameters(file_metadata(tensors)))
    return OriginalComponent(config, keys, mapper)


def read(
    spec: FamilySpec,
    found: Mapping[str, tuple[Tensors, str]],
    stated_prediction_type: str | None,
    hints: ArchitectureHints,
) -> OriginalModel:
    """Qwen-Image's released scheduler (its edit models' too); the variant follows the model's name."""
    latent = spec.latent[spec.name]
    transformer = read_transformer(*found["transformer"], latent.channels, hints)
    vae = read_vae(*found["vae"])
    if vae.config["z_dim"] != latent.channels:
        raise CheckpointError(
            f"this autoencoder has {vae.config['z_dim']} latent channels, and Qwen-Image's has {latent.channels}"
        )
    text_encoder = read_qwen25vl(*found["text_encoder"])
    joint = transformer.config["joint_attention_dim"]
    if text_encoder.config["hidden_size"] != joint:
        raise CheckpointError(
            f"this Qwen-Image transformer reads {joint}-wide text states, and this text encoder makes "
            f"{text_encoder.config['hidden_size']}: give Qwen2.5-VL-7B (qwen_2.5_vl_7b*.safetensors)"
        )
    components = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
    return OriginalModel(spec.name, "flow", dict(SCHEDULER), components)
