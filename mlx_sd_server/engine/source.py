"""A model read into diffusers layout, and what the families' original-layout readers share.

Every input the converter reads (a diffusers folder, a single-file checkpoint, split files) becomes a
`SourceModel`: per component, its diffusers/transformers config.json and its weights in diffusers names.
Files in a family's original layout (CompVis/SGM, Black Forest Labs', Stability's, ComfyUI bundles) are
described by the family (`families/<family>/single_file.py`, its spec's `original`): where each component sits
in the files (`FilePart`), and, from the tensors' names and shapes alone, each component's config and how its
weights map (`OriginalComponent`). Reading the bytes (safetensors, GGUF, pickles) is the converter's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_sd_server.engine.components import Mapper

log = logging.getLogger(__name__)

Weights = Iterable[tuple[str, np.ndarray]]
# A file's tensors by name, as read (MLX arrays, numpy arrays, GGUF tensors read when used): only their
# `shape` is read until they are converted.
Tensors = Mapping[str, Any]

# Extras that CLIP files carry beside their weights and no converter needs: not worth a warning.
QUIET_EXTRAS = ("text_projection.weight", "logit_scale", "position_ids")


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of the kind expected; the message says why, for the user."""


@dataclass
class SourceModel:
    """A model in diffusers layout: per component, its diffusers/transformers config.json and weights."""

    family: str  # the manifest family (sd1, sdxl, flux, ... or controlnet: a lone ControlNet)
    prediction_type: str  # epsilon | v_prediction | flow
    scheduler: dict[str, Any]  # the diffusers scheduler_config.json (betas, prediction type, shift)
    components: dict[str, tuple[dict[str, Any], Weights]]
    tokenizers: dict[str, Path | None] = field(default_factory=dict)  # encoder name -> tokenizer folder


@dataclass(frozen=True)
class ArchitectureHints:
    """The hyperparameters tensor shapes cannot tell. Defaults are those of every released model; tests pass
    others for their tiny models. Narrow models get as many heads and groups as their widths allow."""

    sd1_unet_heads: int = 8  # SD 1.x: a fixed number of heads per attention layer
    unet_head_dim: int = 64  # SD 2.x and SDXL: a fixed head size
    text_head_dim: int = 64  # CLIP ViT-L, OpenCLIP ViT-H and bigG
    norm_num_groups: int = 32  # UNet and VAE group norms
    # SDXL's pooled text embedding (OpenCLIP bigG's projection): a lone ControlNet has no text encoder to read
    # it from, and the time-id embedding's width is the rest of its label_emb input.
    sdxl_text_projection_dim: int = 1280
    # FLUX's rotary split of its heads' dims, which shapes cannot tell; None: FLUX.1's, for 128-dim heads
    axes_dims_rope: tuple[int, ...] | None = None
    attention_head_dim: int = 64  # the MMDiT's head size where no qk-norm weight shows it (SD3 medium)
    t5_max_distance: int = 128  # T5's relative attention's reach: 128 in every released T5


@dataclass(frozen=True)
class FilePart:
    """Where original-layout files keep one component: split files at the top level, bundles under a prefix."""

    description: str  # for messages: "the FLUX autoencoder (ae.safetensors)"
    marker: str  # a tensor only this component has (its prefix removed)
    prefixes: tuple[str, ...]  # where it may sit in a file, tried in this order
    option: str | None = None  # the `convert` option that gives it as a file of its own (stable-diffusion.cpp's)
    required: bool = True


@dataclass(frozen=True)
class OriginalComponent:
    """One component as original-layout weights give it: its diffusers config, read from shapes, and how its
    weights map to diffusers' names."""

    config: dict[str, Any]
    keys: list[str]  # its weights' names in the file it was found in
    mapper: Mapper  # one (file name, float32 value) -> diffusers (name, value) pairs
    extra: tuple[tuple[str, np.ndarray], ...] = ()  # weights the files do not hold (SD3's CLIP-L projection)


@dataclass(frozen=True)
class OriginalModel:
    """A model read from original-layout files: its family and its components, not yet read."""

    family: str
    prediction_type: str
    scheduler: dict[str, Any]
    components: dict[str, OriginalComponent]
    inpainting: bool = False  # the denoiser also takes a mask and the masked image's latents (SD's 9 channels)


def split_options(parts: Mapping[str, FilePart]) -> tuple[str, ...]:
    """The `convert` options that give these parts as files of their own."""
    return tuple(part.option for part in parts.values() if part.option)


# --- helpers for the readers ---------------------------------------------------------------------------


def float32(value: Any) -> np.ndarray:
    """A tensor as read (numpy, MLX, or a GGUF tensor read when used) as float32 numpy."""
    if hasattr(value, "dequantize"):  # a GGUF tensor, read now
        value = value.dequantize()
    if not isinstance(value, np.ndarray):  # an MLX array
        import mlx.core as mx

        value = np.array(value.astype(mx.float32))
    return value.astype(np.float32, copy=False)


def count_distinct(keys: Iterable[str], pattern: str) -> int:
    """How many distinct values the single group of `pattern` takes over `keys` (layers, blocks, levels)."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def strip_prefix(tensors: Tensors, prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def known_keys(tensors: Tensors, prefix: str, known: Callable[[str], bool], component: str) -> list[str]:
    """The names under `prefix` that `known` takes (given them without the prefix). The others are skipped,
    with a warning naming the component, unless they are extras CLIP files are known to carry."""
    keys: list[str] = []
    unknown: list[str] = []
    for key in (k for k in tensors if k.startswith(prefix)):
        (keys if known(key[len(prefix) :]) else unknown).append(key)
    unknown = [k for k in unknown if not k.endswith(QUIET_EXTRAS)]
    if unknown:
        log.warning("ignoring %d unrecognised %s weights, e.g. %s", len(unknown), component, unknown[:3])
    return keys


def renamed_component(
    tensors: Tensors, prefix: str, rename: Callable[[str], str | None], config: dict[str, Any], component: str
) -> OriginalComponent:
    """A component whose weights only change names: those `rename` knows (given them without `prefix`; None:
    unknown, skipped with a warning)."""

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        name = rename(key[len(prefix) :])
        return [] if name is None else [(name, value)]

    keys = known_keys(tensors, prefix, lambda key: rename(key) is not None, component)
    return OriginalComponent(config, keys, mapper)
