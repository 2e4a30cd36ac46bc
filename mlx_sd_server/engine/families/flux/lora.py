"""FLUX.1's LoRAs: BFL-named layers (kohya's lora_unet_double_blocks_0_img_attn_qkv, BFL/ComfyUI's
[diffusion_model.]double_blocks.0.img_attn.qkv, XLabs' double_blocks.0.processor.qkv_lora1), fused ones split
as their weights are; ComfyUI's text encoder prefixes; sd-scripts' T5 (lora_te3_); and how to tell a FLUX
LoRA from an SD3 one."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache

import numpy as np

from mlx_sd_server.engine.families.flux.single_file import BLOCKS, FLUX_NAMES, map_bfl_transformer_weight
from mlx_sd_server.engine.families.lora import T5, Layout, LoRAEntry, LoRARules, LoRATarget

DEPTH = 64  # blocks of each kind, beyond any released model (FLUX.1: 19 double, 38 single)
# XLabs' attention processors' LoRAs -> the BFL layer each adapts. A single block's qkv_lora adapts linear1's
# q, k and v rows only (the MLP input's part of the split comes out empty).
XLABS_NAMES = {
    "qkv_lora1": "img_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora2": "txt_attn.proj",
    "qkv_lora": "linear1",
    "proj_lora": "linear2",
}
XLABS = re.compile(r"(?:diffusion_model\.)?((?:double|single)_blocks\.\d+)\.processor\.(\w+)")
ONLY_FLUX_LAYERS = ("single_transformer_blocks.", "x_embedder", "time_text_embed.guidance_embedder")
WIDTH = 3072  # FLUX.1's hidden size (SD3's transformers are narrower)


# A transformer weight mapper from BFL's names: (key, value, hidden_size=...) -> diffusers' (key, value) pairs
BFLMapper = Callable[..., list[tuple[str, np.ndarray]]]


def bfl_layout(top: Iterable[str], blocks: Mapping[str, tuple[str, Iterable[str]]], mapper: BFLMapper) -> Layout:
    """A transformer's layers in BFL names (FLUX.1's, FLUX.2's): the `top` modules and up to DEPTH of each kind
    of block's (`blocks`: BFL block -> (diffusers block, its modules)), linears not norms. A layer's `up` maps
    as its weight does by `mapper`: fused ones split along the rows (`down`'s width is the hidden size)."""

    @cache
    def layers() -> dict[str, str]:
        names = list(top) + [
            f"{block}.{i}.{name}" for block, (_, table) in blocks.items() for i in range(DEPTH) for name in table
        ]
        return {name: name for name in names if "norm" not in name}

    def to_diffusers(layer: str, up: np.ndarray, width: int) -> list[tuple[str, np.ndarray]]:
        return [(name.removesuffix(".weight"), part) for name, part in mapper(f"{layer}.weight", up, hidden_size=width)]

    return Layout(layers, to_diffusers)


BFL = bfl_layout(FLUX_NAMES, BLOCKS, map_bfl_transformer_weight)


def xlabs_layer(stem: str) -> LoRATarget | None:
    """An XLabs LoRA's name -> the BFL layer it adapts (an unknown processor keeps its name, which is none)."""
    if (m := XLABS.fullmatch(stem)) is None:
        return None
    return LoRATarget("transformer", f"{m[1]}.{XLABS_NAMES.get(m[2], f'processor.{m[2]}')}", BFL)


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    """flux: BFL-named layers (kohya, BFL/ComfyUI, XLabs), all of the transformer's (Z-Image's original names
    share `final_layer.`), a diffusers transformer with FLUX-only layers (single blocks, x_embedder, guidance)
    or FLUX's width; without a transformer, T5 layers as FLUX's text_encoder_2 (kohya's lora_te3_, ComfyUI's
    t5xxl), unless the LoRA has SD3's text_encoder_3."""
    transformer = [e for e in entries if e.component == "transformer"]
    if any(e.layout is BFL for e in transformer):
        return "flux" if all(e.layout is BFL for e in transformer) else None
    if transformer:
        flux = any(e.layer.startswith(ONLY_FLUX_LAYERS) or e.down_shape[1] == WIDTH for e in transformer)
        return "flux" if flux else None
    if any(e.component == "text_encoder_3" for e in entries):
        return None
    return "flux" if any(e.layer.startswith("encoder.block.") for e in entries) else None


LORA = LoRARules(
    family=lora_family,
    kohya={"lora_unet_": ("transformer", BFL), "lora_te3_": ("text_encoder_2", T5)},
    prefixes={
        "diffusion_model.": "transformer",
        "model.diffusion_model.": "transformer",  # ComfyUI's
        "text_encoders.clip_l.transformer.": "text_encoder",
        "text_encoders.t5xxl.transformer.": "text_encoder_2",
    },
    original={"transformer": BFL},
    resolve=xlabs_layer,
)
