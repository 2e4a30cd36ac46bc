"""FLUX.2 klein (4B, 9B; distilled and base) from the files its users have -> diffusers' layout.

FLUX.2 klein is usually downloaded as three files, as Black Forest Labs', ComfyUI's and stable-diffusion.cpp's
guides list them:

    flux-2-klein-4b.safetensors (or -9b, -base-4b, a GGUF)  -> transformer   (Black Forest Labs' names; ComfyUI
                                                                              saves them under `model.diffusion_model.`)
    flux2-vae.safetensors                                   -> vae           (BFL's FLUX.2 autoencoder: the LDM
                                                                              layout, its quant convs inside the
                                                                              encoder and decoder, and `bn.*`)
    qwen_3_4b.safetensors / qwen_3_8b*.safetensors (or a    -> text_encoder  (Qwen3-4B for klein 4B, Qwen3-8B for
    llama.cpp GGUF of Qwen3)                                                  klein 9B; `--llm`)

The transformer's names are FLUX.1's where the modules are (fused q/k/v, `.scale` for the RMSNorms, the final
modulation's (shift, scale) halves), plus the modulations FLUX.2 shares across blocks; diffusers' single-file
converter (convert_flux2_transformer_checkpoint_to_diffusers) is the reference. Its config is read from shapes,
but for the rotary embedding's split of the head dims (a hint) and the constants every FLUX.2 has. The
autoencoder's batch-norm statistics (`bn.running_mean`, `bn.running_var`) normalise the patchified latents and
give its patch size; its eps is not in the weights (every FLUX.2's). A guidance embedding (FLUX.2 dev) is
refused as for folders (spec.variant_of); klein and klein base are told apart by the model's name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_sd_server.engine import ldm_vae
from mlx_sd_server.engine.families.flux2.transformer import Flux2TransformerConfig
from mlx_sd_server.engine.source import (
    ArchitectureHints,
    CheckpointError,
    FilePart,
    OriginalComponent,
    OriginalModel,
    Tensors,
    count_distinct,
    guess,
    hint_option,
    known_keys,
    split_options,
    strip_prefix,
)
from mlx_sd_server.engine.text.single_file import QWEN3_LLM, read_qwen3
from mlx_sd_server.engine.vae import Flux2VAEConfig

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.spec import FamilySpec, LatentFormat

# A FLUX.2 transformer in BFL's layout (bare or under ComfyUI's prefix): diffusers' own test for a FLUX.2 file.
# FLUX.1's files share `double_blocks.`, so FLUX.2 is asked first.
MARKER = "single_stream_modulation.lin.weight"
COMFYUI_PREFIX = "model.diffusion_model."
VAE_MARKER = "bn.running_mean"  # FLUX.2's autoencoder's latent statistics: FLUX.1's ae.safetensors has none

GUIDANCE_EMBEDDING = "guidance_in."  # FLUX.2 dev's (klein's files have none)
FLUX2_DEV_REFUSED = (
    "this FLUX.2 transformer has a guidance embedding (FLUX.2 dev): only FLUX.2 klein models are supported"
)
DEFAULT_AXES_DIMS_ROPE = (32, 32, 32, 32)  # the rotary embedding's (time, height, width, layer) split of 128 dims

PARTS = {
    "transformer": FilePart(
        "the FLUX.2 klein transformer (e.g. flux-2-klein-4b.safetensors)",
        MARKER,
        ("", COMFYUI_PREFIX),
        "--diffusion-model",
    ),
    "vae": FilePart(
        "the FLUX.2 autoencoder (flux2-vae.safetensors)", VAE_MARKER, ("", "vae.", "first_stage_model."), "--vae"
    ),
    "text_encoder": QWEN3_LLM,
}
OPTIONS = split_options(PARTS)
EXPECTS = "a FLUX.2 klein transformer (single_stream_modulation.lin)"


def is_single_file(names: Iterable[str]) -> bool:
    """A FLUX.2 transformer in its original layout (BFL's, ComfyUI's, their GGUF quantizations): FLUX.1 would
    otherwise take it."""
    return any(name.removeprefix(COMFYUI_PREFIX) == MARKER for name in names)


def parts(names: Collection[str]) -> dict[str, FilePart]:
    """klein's files; FLUX.2 dev's are refused before its other files are asked for (its text encoder is
    Mistral, not Qwen3)."""
    if any(name.removeprefix(COMFYUI_PREFIX).startswith(GUIDANCE_EMBEDDING) for name in names):
        raise CheckpointError(FLUX2_DEV_REFUSED)
    return PARTS


# --- the BFL transformer layout ---------------------------------------------------------------------------

# BFL module -> diffusers Flux2Transformer2DModel module; a tuple is a fused q/k/v projection, split in three.
TOP_NAMES: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
DOUBLE_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
# The single blocks' fused projections stay fused in diffusers (to_qkv_mlp_proj), as in ours.
SINGLE_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
BLOCKS = {
    "double_blocks": ("transformer_blocks", DOUBLE_BLOCK_NAMES),
    "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK_NAMES),
}
PARAM_NAMES = {"scale": "weight"}  # the RMSNorms' parameter
# BFL's final modulation outputs (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
SHIFT_SCALE_MODULES = {"final_layer.adaLN_modulation.1"}


def _target(module: str) -> str | tuple[str, ...] | None:
    """A BFL module name -> the diffusers module name (or the fused projection's parts); None if unknown."""
    if m := re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", module):
        block, names = BLOCKS[m[1]]
        target = names.get(m[3])
        if target is None:
            return None
        prefix = f"{block}.{m[2]}."
        return tuple(prefix + t for t in target) if isinstance(target, tuple) else prefix + target
    return TOP_NAMES.get(module)


def is_bfl_flux2_transformer_key(key: str) -> bool:
    return _target(key.removeprefix(COMFYUI_PREFIX).rpartition(".")[0]) is not None


def map_bfl_flux2_transformer_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One BFL FLUX.2 transformer (key, value), bare or under ComfyUI's prefix, as diffusers
    Flux2Transformer2DModel pairs: a fused q/k/v projection split into three views of `value` (whole rows)."""
    module, _, param = key.removeprefix(COMFYUI_PREFIX).rpartition(".")
    target = _target(module)
    if target is None:
        raise KeyError(f"not a FLUX.2 transformer weight: {key}")
    param = PARAM_NAMES.get(param, param)
    if isinstance(target, tuple):
        return [(f"{name}.{param}", part) for name, part in zip(target, np.split(value, 3), strict=True)]
    if module in SHIFT_SCALE_MODULES:
        shift, scale = np.split(value, 2)
        value = np.concatenate([scale, shift])
    return [(f"{target}.{param}", value)]


def flux2_transformer_config(state: Tensors, axes_dims_rope: Iterable[int] | None = None) -> dict[str, Any]:
    """The diffusers Flux2Transformer2DModel config.json for BFL FLUX.2 transformer weights; only their shapes
    are read. The head size is the q/k norms' width; its rotary split is `axes_dims_rope`, which shapes cannot
    tell (None: FLUX.2's, which only 128-dim heads take)."""
    state = {k.removeprefix(COMFYUI_PREFIX): v for k, v in state.items()}
    try:
        hidden, in_channels = state["img_in.weight"].shape
        head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = state["double_blocks.0.img_mlp.0.weight"].shape[0] // 2  # SwiGLU: gate and value halves
        config = {
            "_class_name": "Flux2Transformer2DModel",
            "attention_head_dim": head_dim,
            "eps": Flux2TransformerConfig.eps,
            "guidance_embeds": any(key.startswith(GUIDANCE_EMBEDDING) for key in state),
            "in_channels": in_channels,
            "joint_attention_dim": state["txt_in.weight"].shape[1],
            "mlp_ratio": mlp_hidden / hidden,
            "num_attention_heads": hidden // head_dim,
            "num_layers": count_distinct(state, r"double_blocks\.(\d+)\."),
            "num_single_layers": count_distinct(state, r"single_blocks\.(\d+)\."),
            "out_channels": state["final_layer.linear.weight"].shape[0],
            "patch_size": 1,  # the pipelines patchify the latents; the transformer reads one token each
            "rope_theta": Flux2TransformerConfig.rope_theta,
            "timestep_guidance_channels": state["time_in.in_layer.weight"].shape[1],
        }
    except KeyError as err:
        raise CheckpointError(f"this FLUX.2 transformer has no {err.args[0]}: the file is incomplete") from None
    # diffusers' blocks build full multi-head attention and an MLP of int(width * mlp_ratio): a file must fit them
    if hidden % head_dim or int(hidden * config["mlp_ratio"]) != mlp_hidden:
        raise CheckpointError(
            f"this FLUX.2 transformer's shapes (width {hidden}, {head_dim}-dim heads, MLP {mlp_hidden}) are not "
            "FLUX.2's (a whole number of heads, an MLP a multiple of the width)"
        )
    if config["out_channels"] == in_channels:
        config["out_channels"] = None  # (diffusers' way of saying "the input's")
    if axes_dims_rope is None:
        if head_dim != sum(DEFAULT_AXES_DIMS_ROPE):
            raise CheckpointError(
                f"this FLUX.2 transformer has {head_dim}-dim attention heads, not FLUX.2's 128, so its rotary "
                f"embedding's split of them is unknown: pass axes_dims_rope ({hint_option('axes_dims_rope')}: four "
                f"numbers summing to {head_dim})"
            )
        axes_dims_rope = DEFAULT_AXES_DIMS_ROPE
    axes = list(axes_dims_rope)
    if len(axes) != len(DEFAULT_AXES_DIMS_ROPE) or sum(axes) != head_dim:
        raise CheckpointError(f"axes_dims_rope {axes} must be four numbers summing to the head size, {head_dim}")
    return config | {"axes_dims_rope": axes}


def read_transformer(tensors: Tensors, prefix: str, hints: ArchitectureHints) -> OriginalComponent:
    keys = known_keys(tensors, prefix, is_bfl_flux2_transformer_key, "transformer")
    config = flux2_transformer_config(strip_prefix(tensors, prefix), hints.axes_dims_rope)
    # not given: FLUX.2's split, which only its 128-dim heads take (others are refused above)
    guessed = guess(hints, "axes_dims_rope", config, "axes_dims_rope", standard=True)
    return OriginalComponent(config, keys, map_bfl_flux2_transformer_weight, guessed=guessed)


# --- the BFL FLUX.2 autoencoder layout --------------------------------------------------------------------

# BFL keeps the quant convs inside the encoder and decoder; the LDM layout (and diffusers) at the top.
QUANT_CONVS = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
BATCH_NORM_STATISTICS = ("bn.running_mean", "bn.running_var")
BATCH_NORM_COUNTER = "bn.num_batches_tracked"  # training's step count: not a weight
# What AutoencoderKLFlux2's config shares with AutoencoderKL's (ldm_vae reads those from the shapes)
LDM_CONFIG_KEYS = (
    "act_fn",
    "block_out_channels",
    "down_block_types",
    "in_channels",
    "latent_channels",
    "layers_per_block",
    "mid_block_add_attention",
    "out_channels",
    "sample_size",
    "up_block_types",
    "use_post_quant_conv",
    "use_quant_conv",
)


def ldm_name(key: str) -> str:
    """A BFL FLUX.2 autoencoder key (prefix removed) in the LDM layout's names."""
    for old, new in QUANT_CONVS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def is_flux2_vae_key(key: str, levels: int) -> bool:
    key = ldm_name(key)
    return key in BATCH_NORM_STATISTICS or key == BATCH_NORM_COUNTER or ldm_vae.vae_key(key, levels) is not None


def map_flux2_vae_file_weight(key: str, value: np.ndarray, levels: int) -> list[tuple[str, np.ndarray]]:
    """One BFL FLUX.2 autoencoder (key, value), its prefix removed, as diffusers AutoencoderKLFlux2 pairs."""
    key = ldm_name(key)
    if key in BATCH_NORM_STATISTICS:
        return [(key, value)]
    if key == BATCH_NORM_COUNTER:
        return []
    return ldm_vae.map_ldm_vae_weight(key, value, levels)


def flux2_vae_config(vae: Tensors, latent: LatentFormat, sample_size: int, hints: ArchitectureHints) -> dict[str, Any]:
    """The diffusers AutoencoderKLFlux2 config.json for BFL FLUX.2 autoencoder weights (prefix removed): the LDM
    autoencoder's, read from shapes as ldm_vae does, its decoder's widths of its own (a smaller decoder is
    possible), and the batch norm's patch (its statistics cover patch x patch x latent channels)."""
    vae = {ldm_name(k): v for k, v in vae.items()}
    ldm = ldm_vae.vae_config_from_ldm(vae, latent, sample_size, hints)
    levels = len(ldm["block_out_channels"])
    try:
        decoder = [vae[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    except KeyError as err:
        raise CheckpointError(f"this FLUX.2 autoencoder has no {err.args[0]}: the file is incomplete") from None
    latent_channels, statistics = ldm["latent_channels"], vae["bn.running_mean"].shape[0]
    if latent_channels != latent.channels:
        raise CheckpointError(
            f"this autoencoder has {latent_channels} latent channels, and FLUX.2's has {latent.channels}"
        )
    patch = math.isqrt(statistics // latent_channels)
    if patch * patch * latent_channels != statistics:
        raise CheckpointError(
            f"this FLUX.2 autoencoder's batch norm covers {statistics} channels, not square patches of its "
            f"{latent_channels} latent channels"
        )
    return {
        "_class_name": "AutoencoderKLFlux2",
        **{key: ldm[key] for key in LDM_CONFIG_KEYS},
        "batch_norm_eps": Flux2VAEConfig.batch_norm_eps,
        "batch_norm_momentum": 0.1,  # (training's; diffusers' config keeps it)
        "decoder_block_out_channels": None if decoder == ldm["block_out_channels"] else decoder,
        "norm_num_groups": ldm_vae.norm_groups(ldm["block_out_channels"] + decoder, hints),
        "patch_size": [patch, patch],
    }


def read_vae(
    tensors: Tensors, prefix: str, latent: LatentFormat, sample_size: int, hints: ArchitectureHints
) -> OriginalComponent:
    config = flux2_vae_config(strip_prefix(tensors, prefix), latent, sample_size, hints)
    levels = len(config["block_out_channels"])
    keys = known_keys(tensors, prefix, partial(is_flux2_vae_key, levels=levels), "VAE")

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return map_flux2_vae_file_weight(key[len(prefix) :], value, levels)

    standard = config["block_out_channels"] == ldm_vae.RELEASED_WIDTHS
    return OriginalComponent(
        config, keys, mapper, guessed=guess(hints, "norm_num_groups", config, "norm_num_groups", standard)
    )


def read(
    spec: FamilySpec,
    found: Mapping[str, tuple[Tensors, str]],
    stated_prediction_type: str | None,
    hints: ArchitectureHints,
) -> OriginalModel:
    """The spec's scheduler (every klein's); the variant follows the model's name (spec.variant_of), which also
    refuses FLUX.2 dev and a text encoder klein cannot read."""
    transformer = read_transformer(*found["transformer"], hints)
    text_encoder = read_qwen3(*found["text_encoder"], hints)
    configs = {"transformer": transformer.config, "text_encoder": text_encoder.config}
    size = spec.variant_of(spec.name, "flow", configs, "").defaults.width
    vae = read_vae(*found["vae"], spec.latent[spec.name], size, hints)
    tokens = vae.config["latent_channels"] * math.prod(vae.config["patch_size"])
    if transformer.config["in_channels"] != tokens:
        raise CheckpointError(
            f"this FLUX.2 transformer reads {transformer.config['in_channels']}-channel latents, and this "
            f"autoencoder makes {tokens} (its {vae.config['latent_channels']} channels in "
            f"{'x'.join(map(str, vae.config['patch_size']))} patches): give FLUX.2's own (flux2-vae.safetensors)"
        )
    components = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
    return OriginalModel(spec.name, "flow", dict(spec.scheduler), components)
