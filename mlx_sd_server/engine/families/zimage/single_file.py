"""Z-Image (Turbo, base) from the files its users have -> diffusers' layout.

Z-Image is usually downloaded as three files, as stable-diffusion.cpp's and ComfyUI's guides list them:

    z_image_turbo_bf16.safetensors (or a GGUF: z_image_turbo-Q4_K.gguf)  -> transformer   (Tongyi-MAI's names, as
                                                                            ComfyUI's NextDiT has them; ComfyUI may
                                                                            save them under `model.diffusion_model.`)
    ae.safetensors                                                       -> vae           (FLUX.1's autoencoder)
    qwen_3_4b.safetensors (or a llama.cpp GGUF of Qwen3-4B)              -> text_encoder  (Qwen3, `--llm`)

The transformer's names are diffusers' but for the patch embedder and final layer (diffusers keeps one per
patch size, `all_x_embedder.2-1`), the fused q/k/v projection and the attention's output and q/k norms;
diffusers' single-file converter (convert_z_image_transformer_checkpoint_to_diffusers) is the reference. Its
config is read from shapes, but for what the shapes cannot tell: the latent channels (FLUX.1's 16, which fix
the patch size), the rotary embedding's split of the head dims (a hint), and the constants every Z-Image has.
Turbo and base share all of it: the model's name tells them apart (spec.variant_of).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_sd_server.engine import ldm_vae
from mlx_sd_server.engine.families.flux.single_file import PARTS as FLUX_PARTS
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

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.spec import FamilySpec, LatentFormat

# The original (Tongyi-MAI, ComfyUI) transformer layout, bare or under ComfyUI's prefix: diffusers' own test
# for a Z-Image file (Lumina 2, its relative, names this modulation `adaLN_modulation.1`).
MARKER = "layers.0.adaLN_modulation.0.weight"
COMFYUI_PREFIX = "model.diffusion_model."

# Z-Image-Turbo's scheduler_config.json (FlowMatchEulerDiscreteScheduler): a fixed shift of 3.
TURBO_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

# Every released Z-Image transformer's (Turbo's and base's config.json), and not in the weights.
FRAME_PATCH = 1  # images are single frames
NORM_EPS = 1e-5
ROPE_THETA = 256.0
T_SCALE = 1000.0
AXES_LENS = [1536, 512, 512]  # the rotary tables' reach per axis: bounds on the caption and the latent
DEFAULT_AXES_DIMS = (32, 48, 48)  # the rotary embedding's (frame, row, col) split of the 128 head dims
RELEASED_HEAD_DIM = 128

PARTS = {
    "transformer": FilePart(
        "the Z-Image transformer (e.g. z_image_turbo_bf16.safetensors)",
        MARKER,
        ("", COMFYUI_PREFIX),
        "--diffusion-model",
    ),
    "vae": FLUX_PARTS["vae"],  # FLUX.1's ae.safetensors
    "text_encoder": QWEN3_LLM,
}
OPTIONS = split_options(PARTS)
EXPECTS = "a Z-Image transformer (layers.*.adaLN_modulation.0)"


def is_single_file(names: Iterable[str]) -> bool:
    """A Z-Image transformer in its original layout (a ComfyUI file, its GGUF quantizations): also recognised so
    that it is not taken for SD's, whose prefix ComfyUI's files share."""
    return any(name.removeprefix(COMFYUI_PREFIX) == MARKER for name in names)


def parts(names: Collection[str]) -> dict[str, FilePart]:
    return PARTS


# --- the original transformer layout ----------------------------------------------------------------------

# Original module -> diffusers ZImageTransformer2DModel module, in each block (noise and context refiners, main
# layers); a tuple is the fused q/k/v projection, split in three. Modules not listed keep their names.
BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention.out": "attention.to_out.0",
    "attention.q_norm": "attention.norm_q",
    "attention.k_norm": "attention.norm_k",
}
BLOCK_MODULES = (
    "attention_norm1",
    "attention_norm2",
    "ffn_norm1",
    "ffn_norm2",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",  # (the context refiner's blocks have none: they are not modulated)
)
BLOCKS = ("layers", "noise_refiner", "context_refiner")
# Outside the blocks; "{key}": the patch sizes' key of diffusers' per-patch-size ModuleDicts ("2-1")
TOP_NAMES = {
    "x_embedder": "all_x_embedder.{key}",
    "final_layer.linear": "all_final_layer.{key}.linear",
    "final_layer.adaLN_modulation.1": "all_final_layer.{key}.adaLN_modulation.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
    "cap_embedder.0": "cap_embedder.0",
    "cap_embedder.1": "cap_embedder.1",
}
PARAMETERS = ("x_pad_token", "cap_pad_token")  # bare parameters, not a module's
UNUSED = ("norm_final.weight",)  # ComfyUI's NextDiT has this RMSNorm but never applies it; diffusers drops it
OMNI_MARKER = "siglip_embedder.0.weight"  # Z-Image Omni's image-conditioning branch


def _target(module: str, embedder_key: str) -> str | tuple[str, ...] | None:
    """An original module name -> the diffusers module name (or the fused projection's parts); None if unknown."""
    if m := re.fullmatch(rf"({'|'.join(BLOCKS)})\.(\d+)\.(.+)", module):
        prefix, inner = f"{m[1]}.{m[2]}.", m[3]
        target = BLOCK_NAMES.get(inner, inner if inner in BLOCK_MODULES else None)
        if target is None:
            return None
        return tuple(prefix + t for t in target) if isinstance(target, tuple) else prefix + target
    name = TOP_NAMES.get(module)
    return None if name is None else name.format(key=embedder_key)


def is_zimage_transformer_key(key: str) -> bool:
    key = key.removeprefix(COMFYUI_PREFIX)
    return key in PARAMETERS or key in UNUSED or _target(key.rpartition(".")[0], "") is not None


def map_zimage_transformer_weight(key: str, value: np.ndarray, embedder_key: str) -> list[tuple[str, np.ndarray]]:
    """One original Z-Image transformer (key, value) as diffusers ZImageTransformer2DModel pairs: the fused q/k/v
    projection split into three views of `value` (whole rows). `embedder_key`: the patch sizes' key, e.g. "2-1"."""
    key = key.removeprefix(COMFYUI_PREFIX)
    if key in PARAMETERS:
        return [(key, value)]
    if key in UNUSED:
        return []
    module, _, param = key.rpartition(".")
    target = _target(module, embedder_key)
    if target is None:
        raise KeyError(f"not a Z-Image transformer weight: {key}")
    if isinstance(target, tuple):
        return [(f"{name}.{param}", part) for name, part in zip(target, np.split(value, 3), strict=True)]
    return [(f"{target}.{param}", value)]


def zimage_transformer_config(
    state: Tensors, latent_channels: int, axes_dims: Iterable[int] | None = None
) -> dict[str, Any]:
    """The diffusers ZImageTransformer2DModel config.json for original Z-Image transformer weights, from their
    shapes and the latent channels (the patch embedder's input is patch x patch x channels). The head size is
    the q/k norms' width; its rotary split is `axes_dims`, which shapes cannot tell (None: Z-Image's, which only
    128-dim heads take)."""
    state = {k.removeprefix(COMFYUI_PREFIX): v for k, v in state.items()}
    if OMNI_MARKER in state:
        raise CheckpointError("this is a Z-Image Omni transformer (siglip_embedder.*), which is not supported")
    dim, features = state["x_embedder.weight"].shape
    patch = math.isqrt(features // latent_channels)
    if patch * patch * latent_channels != features:
        raise CheckpointError(
            f"this Z-Image transformer embeds {features} values per token, not patches of {latent_channels} latent "
            "channels (FLUX.1's autoencoder's)"
        )
    norm = state.get("layers.0.attention.q_norm.weight")
    if norm is None:
        raise CheckpointError(
            "this Z-Image transformer has no q/k norms (layers.0.attention.q_norm), as every Z-Image has"
        )
    head_dim = norm.shape[0]
    # diffusers' block builds full multi-head attention and a feed-forward of dim * 8/3: a file must fit them
    qkv_rows, hidden = (
        state["layers.0.attention.qkv.weight"].shape[0],
        state["layers.0.feed_forward.w1.weight"].shape[0],
    )
    if dim % head_dim or qkv_rows != 3 * dim or hidden != int(dim / 3 * 8):
        raise CheckpointError(
            f"this Z-Image transformer's shapes (width {dim}, {head_dim}-dim heads, q/k/v {qkv_rows} rows, "
            f"feed-forward {hidden}) are not Z-Image's (q/k/v 3 x width, feed-forward width x 8/3)"
        )
    if axes_dims is None:
        if head_dim != RELEASED_HEAD_DIM:
            raise CheckpointError(
                f"this Z-Image transformer has {head_dim}-dim attention heads, not Z-Image's {RELEASED_HEAD_DIM}, so "
                f"its rotary embedding's split of them is unknown: pass axes_dims_rope "
                f"({hint_option('axes_dims_rope')}: three numbers summing to {head_dim})"
            )
        axes_dims = DEFAULT_AXES_DIMS
    axes = list(axes_dims)
    if len(axes) != 3 or sum(axes) != head_dim:
        raise CheckpointError(f"axes_dims_rope {axes} must be three numbers summing to the head size, {head_dim}")
    return {
        "_class_name": "ZImageTransformer2DModel",
        "all_f_patch_size": [FRAME_PATCH],
        "all_patch_size": [patch],
        "axes_dims": axes,
        "axes_lens": AXES_LENS,
        "cap_feat_dim": state["cap_embedder.0.weight"].shape[0],
        "dim": dim,
        "in_channels": latent_channels,
        "n_heads": dim // head_dim,
        "n_kv_heads": dim // head_dim,
        "n_layers": count_distinct(state, r"layers\.(\d+)\."),
        "n_refiner_layers": count_distinct(state, r"noise_refiner\.(\d+)\."),
        "norm_eps": NORM_EPS,
        "qk_norm": True,
        "rope_theta": ROPE_THETA,
        "t_scale": T_SCALE,
    }


def read_transformer(
    tensors: Tensors, prefix: str, latent: LatentFormat, hints: ArchitectureHints
) -> OriginalComponent:
    keys = known_keys(tensors, prefix, is_zimage_transformer_key, "transformer")
    config = zimage_transformer_config(strip_prefix(tensors, prefix), latent.channels, hints.axes_dims_rope)
    embedder_key = f"{config['all_patch_size'][0]}-{config['all_f_patch_size'][0]}"
    # not given: Z-Image's split, which only its 128-dim heads take (others are refused above)
    guessed = guess(hints, "axes_dims_rope", config, "axes_dims", standard=True)
    mapper = partial(map_zimage_transformer_weight, embedder_key=embedder_key)
    return OriginalComponent(config, [k for k in keys if k[len(prefix) :] not in UNUSED], mapper, guessed=guessed)


def read(
    spec: FamilySpec,
    found: Mapping[str, tuple[Tensors, str]],
    stated_prediction_type: str | None,
    hints: ArchitectureHints,
) -> OriginalModel:
    """Turbo's scheduler (base's is the same); the variant follows the model's name (spec.variant_of)."""
    latent = spec.latent[spec.name]
    transformer = read_transformer(*found["transformer"], latent, hints)
    size = spec.variant_of(spec.name, "flow", {"transformer": transformer.config}, "").defaults.width
    components = {
        "transformer": transformer,
        "vae": ldm_vae.read_vae(*found["vae"], latent, size, hints),
        "text_encoder": read_qwen3(*found["text_encoder"], hints),
    }
    return OriginalModel(spec.name, "flow", dict(TURBO_SCHEDULER), components)
