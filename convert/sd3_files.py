"""Stable Diffusion 3 and 3.5 from the files their users have, read into diffusers layout.

Stability's single files hold the MMDiT and the VAE in their original layout; some hold the text encoders too:

    model.diffusion_model.*             -> transformer     (the MMDiT: sd3_medium, sd3.5_large, sd3.5_medium, ...)
    first_stage_model.*                 -> vae             (the LDM autoencoder layout, 16 latent channels)
    text_encoders.clip_l.transformer.*  -> text_encoder    (CLIP-L; in the *_incl_clips* files)
    text_encoders.clip_g.transformer.*  -> text_encoder_2  (CLIP-G; in the *_incl_clips* files)
    text_encoders.t5xxl.transformer.*   -> text_encoder_3  (T5-XXL; in the *_t5xxl* files)

The text encoders also come as their own files (the SD3.5 repos' text_encoders/ folder: clip_l.safetensors,
clip_g.safetensors, t5xxl_fp16.safetensors), all in transformers names. They are given as split files
(--clip-l, --clip-g, --t5xxl), as for FLUX (convert.flux_files, whose readers and lazy per-tensor reading are
shared here); a file given for a component wins over the same component inside the checkpoint.

The transformer's config is inferred from tensor shapes; diffusers' single-file converter
(convert_sd3_transformer_checkpoint_to_diffusers) is the reference for the mapping.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from convert.checkpoint import ArchitectureHints, CheckpointError, _count, _text_config
from convert.flux_files import (
    CLIP_L, T5_XXL, LazyWeights, _component_keys, _read_clip, _read_t5, _read_vae, _strip_prefix,
    locate_components, t5_tokenizer_folder, tensor_names,
)
from convert.source import SourceModel, Weights

# The released repos' scheduler_config.json (FlowMatchEulerDiscreteScheduler): a fixed shift of 3.
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
DEFAULT_HEAD_DIM = 64  # every released MMDiT's; without qk-norm weights the shapes do not tell it
SAMPLE_SIZE = 128  # the released configs' default latent size (1024 px); not in the weights
SD3_PREFIX = "model.diffusion_model."
MARKER = "joint_blocks.0.x_block.attn.qkv.weight"

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
    target = SD3_NAMES.get(module)
    return None if target is None else ("", target)


def is_sd3_transformer_key(key: str) -> bool:
    key = key.removeprefix(SD3_PREFIX)
    return key in PARAMETERS or _sd3_target(key.rpartition(".")[0]) is not None


def is_sd3_file(path: Path) -> bool:
    """Whether a .safetensors or .gguf file holds an SD3/SD3.5 MMDiT in the original layout (alone or with the
    VAE and text encoders); reads the file's header only."""
    return any(name.removeprefix(SD3_PREFIX) == MARKER for name in tensor_names(path))


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
        return [(f"{prefix}{name}.{param}", part) for name, part in zip(target, np.split(value, 3))]
    if module.endswith("adaLN_modulation.1") and value.shape[0] == 2 * hidden_size:
        # The two-part modulations (the final layer's, the last block's context) are (shift, scale) here;
        # diffusers' AdaLayerNormContinuous reads (scale, shift).
        shift, scale = np.split(value, 2)
        value = np.concatenate([scale, shift])
    return [(f"{prefix}{target}.{param}", value)]


def sd3_transformer_config(state: dict[str, Any], attention_head_dim: int = DEFAULT_HEAD_DIM) -> dict[str, Any]:
    """The diffusers SD3Transformer2DModel config.json for original MMDiT weights; only their shapes are read.
    The head size is the qk-norm's width where there is one (SD3.5), else `attention_head_dim`."""
    state = {k.removeprefix(SD3_PREFIX): v for k, v in state.items()}
    keys = set(state)
    hidden_size, in_channels, patch_size, _ = state["x_embedder.proj.weight"].shape
    qk_norm = state.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = attention_head_dim if qk_norm is None else qk_norm.shape[0]
    if hidden_size % head_dim:
        raise CheckpointError(f"this SD3 transformer is {hidden_size} wide, not a multiple of {head_dim}-dim attention "
                              "heads: pass attention_head_dim")
    positions = state["pos_embed"].shape[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(f"the SD3 positional table has {positions} entries, not a square number")
    context_out, context_in = state["context_embedder.weight"].shape
    return {
        "_class_name": "SD3Transformer2DModel",
        "attention_head_dim": head_dim,
        "caption_projection_dim": context_out,
        "dual_attention_layers": sorted({int(m[1]) for k in keys
                                         if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))}),
        "in_channels": in_channels,
        "joint_attention_dim": context_in,
        "num_attention_heads": hidden_size // head_dim,
        "num_layers": _count(keys, r"joint_blocks\.(\d+)\."),
        "out_channels": state["final_layer.linear.weight"].shape[0] // patch_size**2,
        "patch_size": patch_size,
        "pooled_projection_dim": state["y_embedder.mlp.0.weight"].shape[1],
        "pos_embed_max_size": side,
        "qk_norm": None if qk_norm is None else "rms_norm",
        "sample_size": SAMPLE_SIZE,
    }


# --- reading files ----------------------------------------------------------------------------------------

# As convert.flux_files.COMPONENTS: what each is, a key only it has, where it may sit, which keys are its.
# CLIP-G: transformers names, its text_projection beside `text_model.` (read with it, see _read_clip_g).
CLIP_G = ("the CLIP-G text encoder (clip_g.safetensors)", "embeddings.token_embedding.weight",
          ("text_model.", "", "text_encoders.clip_g.transformer.text_model."), CLIP_L[3])
COMPONENTS = {
    "transformer": ("the SD3 transformer (e.g. sd3.5_large.safetensors)", MARKER, (SD3_PREFIX, ""),
                    is_sd3_transformer_key),
    "vae": ("the SD3 autoencoder", "encoder.down.0.block.0.conv1.weight", ("first_stage_model.", "", "vae."), None),
    "text_encoder": CLIP_L,
    "text_encoder_2": CLIP_G,
    "text_encoder_3": T5_XXL,
}
# The command-line option (stable-diffusion.cpp's) that gives each component as its own file.
OPTIONS = {"transformer": "--diffusion-model", "vae": "--vae", "text_encoder": "--clip-l", "text_encoder_2": "--clip-g",
           "text_encoder_3": "--t5xxl"}


class Chained:
    """Weights from several sources, one after the other; iterable again as each of them is."""

    def __init__(self, *parts: Weights):
        self.parts = parts

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for part in self.parts:
            yield from part


def _read_transformer(path: Path, raw: dict[str, Any], prefix: str,
                      attention_head_dim: int) -> tuple[dict, LazyWeights]:
    keys = _component_keys("transformer", COMPONENTS["transformer"], raw, prefix)
    config = sd3_transformer_config(_strip_prefix(raw, prefix), attention_head_dim)
    hidden_size = config["num_attention_heads"] * config["attention_head_dim"]
    return config, LazyWeights(path, keys, partial(map_sd3_transformer_weight, hidden_size=hidden_size))


def _read_clip_l(path: Path, raw: dict[str, Any], prefix: str, hints: ArchitectureHints) -> tuple[dict, Chained]:
    """CLIP-L as diffusers' SD3 pipelines have it, a CLIPTextModelWithProjection, with an identity projection:
    SD3 conditions on CLIP-L's pooled output unprojected (diffusers' converter does the same; a projection in
    the file is not used)."""
    config, weights = _read_clip(path, raw, prefix, hints)
    hidden_size = config["hidden_size"]
    config = {**config, "architectures": ["CLIPTextModelWithProjection"], "projection_dim": hidden_size}
    return config, Chained(weights, [("text_projection.weight", np.eye(hidden_size, dtype=np.float32))])


def _read_clip_g(path: Path, raw: dict[str, Any], prefix: str, hints: ArchitectureHints) -> tuple[dict, LazyWeights]:
    """CLIP-G (OpenCLIP bigG) in transformers names with its text_projection, whose pooled output conditions the
    MMDiT. Like SDXL's, it uses GELU and pads with "!" (id 0)."""
    projection = prefix.removesuffix("text_model.") + "text_projection.weight"
    if projection not in raw:
        raise CheckpointError(f"{path}: the CLIP-G text encoder has no {projection}, which SD3 needs (its pooled, "
                              "projected output conditions the transformer)")
    names = {k: "text_model." + k[len(prefix):] for k in _component_keys("CLIP-G", CLIP_G, raw, prefix)}
    names[projection] = "text_projection.weight"
    config = _text_config({names[k]: raw[k] for k in names}, "gelu", 0, with_projection=True, hints=hints)
    return config, LazyWeights(path, list(names), lambda k, v: [(names[k], v)])


def read_sd3_files(model: Path, vae: Path | None = None, clip_l: Path | None = None, clip_g: Path | None = None,
                   t5xxl: Path | None = None, *, t5_tokenizer: Path | None = None, with_t5: bool = True,
                   attention_head_dim: int = DEFAULT_HEAD_DIM, t5_max_distance: int = 128,
                   hints: ArchitectureHints = ArchitectureHints()) -> SourceModel:
    """An SD3/SD3.5 single file (with or without its text encoders) and any split files as the conversion
    pipeline's `SourceModel` in diffusers layout; without T5 (`with_t5=False`) none is needed or read.
    `attention_head_dim` (SD3 medium has no qk-norm to read it from), `t5_max_distance` and `hints` (CLIP's
    head size, the VAE's group count) are for tests' tiny models."""
    files = {"transformer": model, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g}
    if with_t5:
        files["text_encoder_3"] = t5xxl
    found = locate_components(files, model, COMPONENTS, OPTIONS, "SD3")
    components = {
        "transformer": _read_transformer(*found["transformer"], attention_head_dim),
        "vae": _read_vae(*found["vae"][1:], hints, family="sd3"),
        "text_encoder": _read_clip_l(*found["text_encoder"], hints),
        "text_encoder_2": _read_clip_g(*found["text_encoder_2"], hints),
    }
    tokenizers = {"text_encoder": None, "text_encoder_2": None}
    if with_t5:
        components["text_encoder_3"] = _read_t5(*found["text_encoder_3"], t5_max_distance)
        tokenizers["text_encoder_3"] = t5_tokenizer_folder(t5_tokenizer)
    return SourceModel(family="sd3", prediction_type="flow", scheduler=dict(SD3_SCHEDULER), components=components,
                       tokenizers=tokenizers)
