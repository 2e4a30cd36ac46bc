"""What a family says about LoRA files: how its LoRAs name its layers beyond diffusers/PEFT names, and how to
tell a LoRA made for it. Each family folder's `lora.py` declares one `LoRARules`, referenced from its spec's
`Detection(lora=...)`; `mlx_sd_server.lora` reads the files and asks the families in FAMILIES' order.

kohya's flattened names (lora_unet_down_blocks_0_...) cannot be split at their underscores, so names are
looked up in *layouts*: tables of every layer a network has in one naming. The text encoders' are here (CLIP,
T5); a family declares its denoiser's (SD's UNet in diffusers' and Stability's LDM names, FLUX's transformer in
Black Forest Labs' names, which map to diffusers' only when read: fused projections are split).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import numpy as np

CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_LAYERS = (
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.k",
    "layer.0.SelfAttention.v",
    "layer.0.SelfAttention.o",
    "layer.1.DenseReluDense.wi",
    "layer.1.DenseReluDense.wi_0",
    "layer.1.DenseReluDense.wi_1",
    "layer.1.DenseReluDense.wo",
)
TEXT_DEPTH = 48  # bounds beyond any released text encoder (OpenCLIP bigG has 32 layers, T5-XXL 24 blocks)


class Layout(NamedTuple):
    """A network's layers in one naming: each name as files write it -> the layer it is: diffusers' name, or,
    with `to_diffusers`, the name itself, mapped (and maybe split) when the factors are read."""

    names: Callable[[], Mapping[str, str]]  # (cached: built on first use)
    # (layer, the LoRA's `up`, `down`'s width) -> [(diffusers layer, its rows of `up`)]
    to_diffusers: Callable[[str, np.ndarray, int], list[tuple[str, np.ndarray]]] | None = None

    def target(self, component: str, name: str) -> LoRATarget | None:
        """The layer `name` is in this layout, on `component`; None if the layout has no such layer."""
        layer = self.names().get(name)
        if layer is None:
            return None
        return LoRATarget(component, layer, self if self.to_diffusers else None)


def identity_layout(names: Callable[[], Sequence[str]]) -> Layout:
    """A layout whose names are diffusers' (and transformers') own."""
    return Layout(cache(lambda: {name: name for name in names()}))


CLIP = identity_layout(
    lambda: [f"text_model.encoder.layers.{i}.{layer}" for i in range(TEXT_DEPTH) for layer in CLIP_LAYERS]
)
T5 = identity_layout(lambda: [f"encoder.block.{i}.{layer}" for i in range(TEXT_DEPTH) for layer in T5_LAYERS])


class LoRATarget(NamedTuple):
    """The layer a LoRA in a file adapts."""

    component: str  # the manifest's name: unet, transformer, text_encoder[_2|_3]
    layer: str  # diffusers' name, or, with `layout`, the name in that layout
    layout: Layout | None = None  # the original layout the name is in (mapped to diffusers' when read)


class LoRAEntry(NamedTuple):
    """One LoRA in a file, as the families' detection sees it."""

    component: str
    layer: str
    layout: Layout | None  # as LoRATarget's
    down: str  # the key of its `down` factor, as the file names it (kohya's lora_te1_..., ...)
    down_shape: tuple[int, ...]  # (rank, in) for a linear layer, (rank, in, kh, kw) for a conv


def old_attention(component: str, name: str) -> str:
    """diffusers' first format named attention processors' LoRAs: UNet `attn1.processor.to_out_lora` is
    `attn1.to_out.0`, CLIP `self_attn.to_q_lora` is `self_attn.q_proj`."""
    if (m := re.fullmatch(r"(.+?)(\.processor)?\.to_(q|k|v|out)_lora", name)) is None:
        return name
    if component.startswith("text_encoder"):
        return f"{m[1]}.{m[3]}_proj"
    return f"{m[1]}.to_{m[3]}" + (".0" if m[3] == "out" else "")


@dataclass(frozen=True)
class LoRARules:
    """A family's LoRA rules. Called with a file's entries, it names the manifest family the LoRA fits, or None
    when the LoRA is not this family's (the next family in FAMILIES is asked)."""

    family: Callable[[Sequence[LoRAEntry]], str | None]
    # kohya's prefixes for this family's components -> (component, the layout its flattened names are in)
    kohya: Mapping[str, tuple[str, Layout]] = field(default_factory=dict)
    prefixes: Mapping[str, str] = field(default_factory=dict)  # other key prefixes its files use -> component
    # component -> the original layout its layers may be named in (with the component's prefix or none)
    original: Mapping[str, Layout] = field(default_factory=dict)
    # a key less its factor suffix, in a naming of the family's own (XLabs', diffusers' first format) -> the
    # layer; None: not such a name
    resolve: Callable[[str], LoRATarget | None] = lambda stem: None
    refused: Mapping[str, str] = field(default_factory=dict)  # key patterns of its LoRAs not read -> what they are

    def __call__(self, entries: Sequence[LoRAEntry]) -> str | None:
        return self.family(entries)
