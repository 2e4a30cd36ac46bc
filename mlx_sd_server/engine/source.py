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
from dataclasses import dataclass, field, fields
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
    # config values a single file cannot tell, guessed (see Guess): "text_encoder.num_attention_heads" -> 12
    guessed: dict[str, Any] = field(default_factory=dict)
    # The diffusers pipeline's own settings: model_index.json's values that are not components (FLUX.2 klein's
    # `is_distilled`); kept in the manifest's `pipeline`, shown to the family's `variant_of` (spec.PIPELINE)
    pipeline: dict[str, Any] = field(default_factory=dict)


def _hint(released: Any, about: str) -> Any:
    """A hint's field: None until given; `released` (every released model's) is used in its place."""
    return field(default=None, metadata={"released": released, "help": about})


@dataclass(frozen=True)
class ArchitectureHints:
    """The hyperparameters tensor shapes cannot tell, each as given (by `convert`'s option of its name, e.g.
    `--text-head-dim`, or a caller: tests give their tiny models'), or None: not given, and then every released
    model's value is used, as a guess (`Guess`). Narrow models get as many heads and groups as their widths
    allow."""

    sd1_unet_heads: int | None = _hint(8, "SD 1.x UNet: the heads of every attention layer (8)")
    unet_head_dim: int | None = _hint(64, "SD 2.x/SDXL UNet and ControlNet: the attention head size (64)")
    text_head_dim: int | None = _hint(64, "CLIP text encoders: the attention head size (64)")
    norm_num_groups: int | None = _hint(32, "UNet, ControlNet and VAE: the group norms' groups (32)")
    # A lone SDXL ControlNet has no text encoder to read its pooled text embedding's width from (OpenCLIP
    # bigG's projection), and the time-id embedding's width is the rest of its label_emb input.
    sdxl_text_projection_dim: int | None = _hint(
        1280, "a lone SDXL ControlNet: the pooled text embedding's width (1280)"
    )
    # None: the family's released split (FLUX.1's, Z-Image's, FLUX.2's), which only 128-dim heads take
    axes_dims_rope: tuple[int, ...] | None = _hint(
        None,
        "FLUX.1, FLUX.2 and Z-Image transformers: the rotary embedding's split of the head dims (for 128: "
        "FLUX.1's 16,56,56, FLUX.2's 32,32,32,32, Z-Image's 32,48,48)",
    )
    attention_head_dim: int | None = _hint(
        64, "SD3 transformer without qk-norm weights (SD3 medium): the attention head size (64)"
    )
    t5_max_distance: int | None = _hint(128, "T5 text encoders: the relative attention's maximum distance (128)")
    llm_rope_theta: int | None = _hint(
        1_000_000,
        "Qwen3 text encoders from .safetensors: the rotary embedding's base (Qwen3-4B's and 8B's 1000000; "
        "a GGUF file says its own)",
    )

    def value(self, name: str) -> Any:
        """The hint `name` as given, else the released models' value."""
        given = getattr(self, name)
        return RELEASED_HINTS[name] if given is None else given


RELEASED_HINTS: dict[str, Any] = {hint.name: hint.metadata["released"] for hint in fields(ArchitectureHints)}


def file_metadata(tensors: Tensors) -> Mapping[str, Any]:
    """The header values a file's reader keeps beside its tensors (`metadata`: a GGUF file's key-value fields,
    e.g. `general.architecture`, `qwen3.rope.freq_base`), else none."""
    return getattr(tensors, "metadata", {})


def hint_option(name: str) -> str:
    """The `convert` option that gives the hint `name`."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Guess:
    """A config value a reader took from a hint that was not given, since the file cannot tell it.

    The rule: a value is a guess whenever it comes from a hint's released default rather than from the file
    or a given hint. Each is logged once per conversion and recorded in the manifest (`guessed`): as a
    warning where the shapes it depends on are not a released model's (the default may well be wrong), at
    info level where they are (the released widths make the default near-certain)."""

    key: str  # the config key it set, e.g. num_attention_heads
    value: Any
    hint: str  # the ArchitectureHints field (and `convert` option) that gives it
    standard: bool  # the shapes it depends on are a released model's


def guess(
    hints: ArchitectureHints, hint: str, config: Mapping[str, Any], key: str, standard: bool
) -> tuple[Guess, ...]:
    """`config[key]`, set from `hint`, as a guess if the hint was not given; else nothing."""
    return () if getattr(hints, hint) is not None else (Guess(key, config[key], hint, standard),)


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
    guessed: tuple[Guess, ...] = ()  # config values the files cannot tell, taken from hints not given


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
    tensors: Tensors,
    prefix: str,
    rename: Callable[[str], str | None],
    config: dict[str, Any],
    component: str,
    guessed: tuple[Guess, ...] = (),
) -> OriginalComponent:
    """A component whose weights only change names: those `rename` knows (given them without `prefix`; None:
    unknown, skipped with a warning)."""

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        name = rename(key[len(prefix) :])
        return [] if name is None else [(name, value)]

    keys = known_keys(tensors, prefix, lambda key: rename(key) is not None, component)
    return OriginalComponent(config, keys, mapper, guessed=guessed)
