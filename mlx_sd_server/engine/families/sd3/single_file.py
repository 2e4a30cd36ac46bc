"""Stable Diffusion 3 and 3.5 from the files their users have -> diffusers' layout.

Stability's single files hold the MMDiT and the VAE in their original layout; some hold the text encoders too:

    model.diffusion_model.*             -> transformer     (the MMDiT: sd3_medium, sd3.5_large, sd3.5_medium, ...)
    first_stage_model.*                 -> vae             (the LDM autoencoder layout, 16 latent channels)
    text_encoders.clip_l.transformer.*  -> text_encoder    (CLIP-L; in the *_incl_clips* files)
    text_encoders.clip_g.transformer.*  -> text_encoder_2  (CLIP-G; in the *_incl_clips* files)
    text_encoders.t5xxl.transformer.*   -> text_encoder_3  (T5-XXL; in the *_t5xxl* files)

The text encoders also come as their own files (the SD3.5 repos' text_encoders/ folder: clip_l.safetensors,
clip_g.safetensors, t5xxl_fp16.safetensors), all in transformers names; a file given for a component wins over
the same component inside the checkpoint. The transformer's config is inferred from tensor shapes; diffusers'
single-file converter (convert_sd3_transformer_checkpoint_to_diffusers) is the reference for the mapping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_sd_server.engine import ldm_vae
from mlx_sd_server.engine.source import (
    RELEASED_HINTS,
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
from mlx_sd_server.engine.text.single_file import CLIP_G, CLIP_L, T5_XXL, read_clip, read_projected_clip, read_t5

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.spec import FamilySpec

# The released repos' scheduler_config.json (FlowMatchEulerDiscreteScheduler): a fixed shift of 3.
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
SAMPLE_SIZE = 128  # the released configs' default latent size (1024 px); not in the weights
SD3_PREFIX = "model.diffusion_model."
MARKER = "joint_blocks.0.x_block.attn.qkv.weight"  # Stability's MMDiT names
MEDIUM_WIDTH = 1536  # SD3 medium's: 24 heads of 64, the released MMDiT without qk-norm weights

PARTS = {
    "transformer": FilePart(
        "the SD3 transformer (e.g. sd3.5_large.safetensors)", MARKER, (SD3_PREFIX, ""), "--diffusion-model"
    ),
    "vae": FilePart("the SD3 autoencoder", ldm_vae.MARKER, ("first_stage_model.", "", "vae."), "--vae"),
    "text_encoder": CLIP_L,
    "text_encoder_2": CLIP_G,
    "text_encoder_3": T5_XXL,
}
OPTIONS = split_options(PARTS)
EXPECTS = "an SD3/SD3.5 MMDiT (joint_blocks.*)"


def is_single_file(names: Iterable[str]) -> bool:
    return any(name.removeprefix(SD3_PREFIX) == MARKER for name in names)


def parts(names: Collection[str]) -> dict[str, FilePart]:
    return PARTS


# --- the original MMDiT layout ----------------------------------------------------------------------------

# Original module -> diffusers SD3Transformer2DModel module. A tuple is a fused q/k/v projection, split in three.
SD3_NAMES: dict[str, str] = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
JOINT_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn.ln_q": "attn.norm_q",  # SD3.5's RMS qk-norm
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn.proj": "attn.to_out.0",
    "context_block.attn.proj": "attn.to_add_out",  # (not in the last block: its context is not carried on)
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # MMDiT-X (SD3.5 medium): image-only
    "x_block.attn2.ln_q": "attn2.norm_q",  # attention beside the joint one
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
PARAMETERS = {"pos_embed": "pos_embed.pos_embed"}  # the positional table: a bare parameter, not a module's


def _sd3_target(module: str) -> tuple[str, str | tuple[str, ...]] | None:
    """An original module name -> (diffusers block prefix, diffusers module name or fused parts); None if unknown."""
    if m := re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", module):
        target = JOINT_BLOCK_NAMES.get(m[2])
        return None if target is None else (f"transformer_blocks.{m[1]}.", target)
    name = SD3_NAMES.get(module)
    return None if name is None else ("", name)


def is_sd3_transformer_key(key: str) -> bool:
    key = key.removeprefix(SD3_PREFIX)
    return key in PARAMETERS or _sd3_target(key.rpartition(".")[0]) is not None


def map_sd3_transformer_weight(key: str, value: np.ndarray, hidden_size: int) -> list[tuple[str, np.ndarray]]:
    """One original MMDiT (key, value) as diffusers SD3Transformer2DModel pairs; fused q/k/v projections are split
    into views of `value`. `hidden_size`: num_attention_heads * attention_head_dim."""
    key = key.removeprefix(SD3_PREFIX)
    if key in PARAMETERS:
        return [(PARAMETERS[key], value)]
    module, _, param = key.rpartition(".")
    found = _sd3_target(module)
    if found is None:
        raise KeyError(f"not an SD3 transformer weight: {key}")
    prefix, target = found
    if isinstance(target, tuple):
        return [(f"{prefix}{name}.{param}", part) for name, part in zip(target, np.split(value, 3), strict=True)]
    if module.endswith("adaLN_modulation.1") and value.shape[0] == 2 * hidden_size:
        # The two-part modulations (the final layer's, the last block's context) are (shift, scale) here;
        # diffusers' AdaLayerNormContinuous reads (scale, shift).
        shift, scale = np.split(value, 2)
        value = np.concatenate([scale, shift])
    return [(f"{prefix}{target}.{param}", value)]


def sd3_transformer_config(
    state: Tensors, attention_head_dim: int = RELEASED_HINTS["attention_head_dim"]
) -> dict[str, Any]:
    """The diffusers SD3Transformer2DModel config.json for original MMDiT weights; only their shapes are read.
    The head size is the qk-norm's width where there is one (SD3.5), else `attention_head_dim`."""
    state = {k.removeprefix(SD3_PREFIX): v for k, v in state.items()}
    hidden_size, in_channels, patch_size, _ = state["x_embedder.proj.weight"].shape
    qk_norm = state.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = attention_head_dim if qk_norm is None else qk_norm.shape[0]
    if hidden_size % head_dim:
        raise CheckpointError(
            f"this SD3 transformer is {hidden_size} wide, not a multiple of {head_dim}-dim attention "
            f"heads: pass attention_head_dim ({hint_option('attention_head_dim')})"
        )
    positions = state["pos_embed"].shape[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(f"the SD3 positional table has {positions} entries, not a square number")
    context_out, context_in = state["context_embedder.weight"].shape
    return {
        "_class_name": "SD3Transformer2DModel",
        "attention_head_dim": head_dim,
        "caption_projection_dim": context_out,
        "dual_attention_layers": sorted(
            {int(m[1]) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))}
        ),
        "in_channels": in_channels,
        "joint_attention_dim": context_in,
        "num_attention_heads": hidden_size // head_dim,
        "num_layers": count_distinct(state, r"joint_blocks\.(\d+)\."),
        "out_channels": state["final_layer.linear.weight"].shape[0] // patch_size**2,
        "patch_size": patch_size,
        "pooled_projection_dim": state["y_embedder.mlp.0.weight"].shape[1],
        "pos_embed_max_size": side,
        "qk_norm": None if qk_norm is None else "rms_norm",
        "sample_size": SAMPLE_SIZE,
    }


def read_transformer(tensors: Tensors, prefix: str, hints: ArchitectureHints) -> OriginalComponent:
    keys = known_keys(tensors, prefix, is_sd3_transformer_key, "transformer")
    config = sd3_transformer_config(strip_prefix(tensors, prefix), hints.value("attention_head_dim"))
    hidden_size = config["num_attention_heads"] * config["attention_head_dim"]
    mapper = partial(map_sd3_transformer_weight, hidden_size=hidden_size)
    guessed = (  # (a qk-norm's width is the head size)
        ()
        if config["qk_norm"]
        else guess(hints, "attention_head_dim", config, "attention_head_dim", hidden_size == MEDIUM_WIDTH)
    )
    return OriginalComponent(config, keys, mapper, guessed=guessed)


def read_clip_l(tensors: Tensors, prefix: str, hints: ArchitectureHints) -> OriginalComponent:
    """CLIP-L as diffusers' SD3 pipelines have it, a CLIPTextModelWithProjection, with an identity projection:
    SD3 conditions on CLIP-L's pooled output unprojected (diffusers' converter does the same; a projection in
    the file is not used)."""
    clip = read_clip(tensors, prefix, hints)
    hidden_size = clip.config["hidden_size"]
    config = {**clip.config, "architectures": ["CLIPTextModelWithProjection"], "projection_dim": hidden_size}
    projection = (("text_projection.weight", np.eye(hidden_size, dtype=np.float32)),)
    return OriginalComponent(config, clip.keys, clip.mapper, projection, clip.guessed)


def read(
    spec: FamilySpec,
    found: Mapping[str, tuple[Tensors, str]],
    stated_prediction_type: str | None,
    hints: ArchitectureHints,
) -> OriginalModel:
    """Without T5 (not found: `convert --no-t5` does not look for it) the model reads zeros in its place."""
    transformer = read_transformer(*found["transformer"], hints)
    size = spec.variant_of(spec.name, "flow", {"transformer": transformer.config}, "").defaults.width
    components = {
        "transformer": transformer,
        "vae": ldm_vae.read_vae(*found["vae"], spec.latent[spec.name], size, hints),
        "text_encoder": read_clip_l(*found["text_encoder"], hints),
        "text_encoder_2": read_projected_clip(*found["text_encoder_2"], hints),
    }
    if "text_encoder_3" in found:
        components["text_encoder_3"] = read_t5(*found["text_encoder_3"], hints)
    return OriginalModel(spec.name, "flow", dict(SD3_SCHEDULER), components)
