"""FLUX.1 (schnell, dev) from the files its users have -> diffusers' layout.

FLUX is usually downloaded as four files, each in its original layout:

    flux1-dev.safetensors / flux1-schnell.safetensors  -> transformer     (Black Forest Labs' names; ComfyUI saves
                                                                           them under `model.diffusion_model.`)
    ae.safetensors                                     -> vae             (the LDM autoencoder layout, no quant convs)
    clip_l.safetensors                                 -> text_encoder    (transformers CLIPTextModel names)
    t5xxl_fp16.safetensors (or bf16, fp8_e4m3fn)       -> text_encoder_2  (transformers T5EncoderModel names)

ComfyUI's all-in-one checkpoints hold all four in one file, under `model.diffusion_model.`, `vae.` or
`first_stage_model.`, `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.`. Each
component's config.json is inferred from tensor shapes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_sd_server.engine import ldm_vae
from mlx_sd_server.engine.sampling.schedules import FLOW_SCHEDULER_SETTINGS
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
from mlx_sd_server.engine.text.single_file import CLIP_L, T5_XXL, read_clip, read_t5

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.spec import FamilySpec

BFL_PREFIX = "model.diffusion_model."  # ComfyUI's all-in-one files; BFL's own files have none
MARKER = "double_blocks.0.img_attn.qkv.weight"

# The released repos' scheduler_config.json (FlowMatchEulerDiscreteScheduler). dev, guidance-distilled, shifts
# its sigmas by the image size; schnell, timestep-distilled for 1-4 steps, does not shift them.
DEV_SCHEDULER = {**FLOW_SCHEDULER_SETTINGS, "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL_SCHEDULER = FLOW_SCHEDULER_SETTINGS

DEFAULT_AXES_DIMS_ROPE = (16, 56, 56)  # the rotary embedding's (index, height, width) split of FLUX's 128 head dims

PARTS = {
    "transformer": FilePart(
        "the FLUX transformer (flux1-dev.safetensors or flux1-schnell.safetensors)",
        MARKER,
        ("", BFL_PREFIX),
        "--diffusion-model",
    ),
    "vae": FilePart(
        "the FLUX autoencoder (ae.safetensors)", ldm_vae.MARKER, ("", "vae.", "first_stage_model."), "--vae"
    ),
    "text_encoder": CLIP_L,
    "text_encoder_2": T5_XXL,
}
OPTIONS = split_options(PARTS)
EXPECTS = "a FLUX.1 transformer (double_blocks.*)"


def is_single_file(names: Iterable[str]) -> bool:
    return any(name.removeprefix(BFL_PREFIX).startswith("double_blocks.") for name in names)


def parts(names: Collection[str]) -> dict[str, FilePart]:
    return PARTS


# --- the BFL transformer layout ---------------------------------------------------------------------------

# BFL module -> diffusers FluxTransformer2DModel module. A tuple is a fused projection, split along its output
# axis into hidden-size parts (the last part takes the rest: the single blocks' MLP input).
FLUX_NAMES: dict[str, str | tuple[str, ...]] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
DOUBLE_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
SINGLE_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
BLOCKS = {
    "double_blocks": ("transformer_blocks", DOUBLE_BLOCK_NAMES),
    "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK_NAMES),
}
PARAM_NAMES = {"scale": "weight"}  # the RMSNorms' parameter
# BFL's final modulation outputs (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
SHIFT_SCALE_MODULES = {"final_layer.adaLN_modulation.1"}


def _bfl_target(module: str) -> tuple[str, str | tuple[str, ...]] | None:
    """A BFL module name -> (diffusers block prefix, diffusers module name or fused parts); None if unknown."""
    if m := re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", module):
        block, names = BLOCKS[m[1]]
        target = names.get(m[3])
        return None if target is None else (f"{block}.{m[2]}.", target)
    target = FLUX_NAMES.get(module)
    return None if target is None else ("", target)


def is_bfl_transformer_key(key: str) -> bool:
    return _bfl_target(key.removeprefix(BFL_PREFIX).rpartition(".")[0]) is not None


def map_bfl_transformer_weight(key: str, value: np.ndarray, hidden_size: int) -> list[tuple[str, np.ndarray]]:
    """One BFL transformer (key, value) as diffusers FluxTransformer2DModel pairs; fused projections are split
    into views of `value`. `hidden_size`: num_attention_heads * attention_head_dim."""
    module, _, param = key.removeprefix(BFL_PREFIX).rpartition(".")
    found = _bfl_target(module)
    if found is None:
        raise KeyError(f"not a FLUX transformer weight: {key}")
    prefix, target = found
    param = PARAM_NAMES.get(param, param)
    if isinstance(target, tuple):
        parts = np.split(value, [hidden_size * i for i in range(1, len(target))])
        return [(f"{prefix}{name}.{param}", part) for name, part in zip(target, parts, strict=True)]
    if module in SHIFT_SCALE_MODULES:
        shift, scale = np.split(value, 2)
        value = np.concatenate([scale, shift])
    return [(f"{prefix}{target}.{param}", value)]


def flux_transformer_config(state: Tensors, axes_dims_rope: Iterable[int] | None = None) -> dict[str, Any]:
    """The diffusers FluxTransformer2DModel config.json for BFL transformer weights; only their shapes are read.

    The rotary embedding's split of the head dims cannot be read from shapes: FLUX's is [16, 56, 56] for its
    128-dim heads; models with other head sizes must say theirs (`axes_dims_rope`)."""
    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    hidden_size, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if axes_dims_rope is None:
        if head_dim != sum(DEFAULT_AXES_DIMS_ROPE):
            raise CheckpointError(
                f"this FLUX transformer has {head_dim}-dim attention heads, not FLUX.1's 128, so its rotary "
                f"embedding's split of them is unknown: pass axes_dims_rope ({hint_option('axes_dims_rope')}: "
                f"three numbers summing to {head_dim})"
            )
        axes_dims_rope = DEFAULT_AXES_DIMS_ROPE
    axes = list(axes_dims_rope)
    if len(axes) != 3 or sum(axes) != head_dim:
        raise CheckpointError(f"axes_dims_rope {axes} must be three numbers summing to the head size, {head_dim}")
    out_channels = state["final_layer.linear.weight"].shape[0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": head_dim,
        "axes_dims_rope": axes,
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
        "in_channels": in_channels,
        "joint_attention_dim": state["txt_in.weight"].shape[1],
        "num_attention_heads": hidden_size // head_dim,
        "num_layers": count_distinct(state, r"double_blocks\.(\d+)\."),
        "num_single_layers": count_distinct(state, r"single_blocks\.(\d+)\."),
        "out_channels": None if out_channels == in_channels else out_channels,  # FLUX Fill: 384 in, 64 out
        "patch_size": 1,
        "pooled_projection_dim": state["vector_in.in_layer.weight"].shape[1],
    }


def read_transformer(tensors: Tensors, prefix: str, hints: ArchitectureHints) -> OriginalComponent:
    keys = known_keys(tensors, prefix, is_bfl_transformer_key, "transformer")
    config = flux_transformer_config(strip_prefix(tensors, prefix), hints.axes_dims_rope)
    hidden_size = config["num_attention_heads"] * config["attention_head_dim"]
    # not given: FLUX.1's split, which only its 128-dim heads take (others are refused above)
    guessed = guess(hints, "axes_dims_rope", config, "axes_dims_rope", standard=True)
    return OriginalComponent(
        config, keys, partial(map_bfl_transformer_weight, hidden_size=hidden_size), guessed=guessed
    )


def read(
    spec: FamilySpec,
    found: Mapping[str, tuple[Tensors, str]],
    stated_prediction_type: str | None,
    hints: ArchitectureHints,
) -> OriginalModel:
    """dev (guidance-distilled) and schnell are told apart by the guidance embedding."""
    transformer = read_transformer(*found["transformer"], hints)
    configs = {"transformer": transformer.config}
    size = spec.variant_of(spec.name, "flow", configs, "").defaults.width
    components = {
        "transformer": transformer,
        "vae": ldm_vae.read_vae(*found["vae"], spec.latent[spec.name], size, hints),
        "text_encoder": read_clip(*found["text_encoder"], hints),
        "text_encoder_2": read_t5(*found["text_encoder_2"], hints),
    }
    dev = transformer.config["guidance_embeds"]
    return OriginalModel(spec.name, "flow", dict(DEV_SCHEDULER if dev else SCHNELL_SCHEDULER), components)
