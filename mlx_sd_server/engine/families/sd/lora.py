"""Stable Diffusion's LoRAs: kohya's lora_unet_ names (diffusers' UNet names for SD 1.x/2.x, Stability's LDM
ones for SDXL), diffusers' first format (the UNet's attention processors, no prefix), and how to tell SD 1.x,
2.x and XL apart."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from mlx_sd_server.engine.families.lora import Layout, LoRAEntry, LoRARules, LoRATarget, old_attention
from mlx_sd_server.engine.families.sd.single_file import RESNET_NAMES, UNET_FIXED_NAMES, unet_key

# Bounds beyond any released UNet: SDXL's deepest attention has 10 transformer blocks
TRANSFORMER_DEPTH = 10
TRANSFORMER_BLOCK_LAYERS = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
) + ("ff.net.0.proj", "ff.net.2")
CROSS_ATTENTION_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the text width each UNet attends to
SDXL_LAYERS = r"^add_embedding\.|^up_blocks\.0\.attentions\.|\.transformer_blocks\.[1-9]"


def _attention(prefix: str) -> list[str]:
    """A UNet attention's (Transformer2DModel's) layers."""
    blocks = [
        f"{prefix}.transformer_blocks.{i}.{layer}"
        for i in range(TRANSFORMER_DEPTH)
        for layer in TRANSFORMER_BLOCK_LAYERS
    ]
    return [f"{prefix}.proj_in", f"{prefix}.proj_out", *blocks]


@cache
def unet_layers() -> frozenset[str]:
    """An SD 1.x/2.x/XL UNet's layers (diffusers names): 4 levels, 2 resnets per down block, 3 per up block."""
    resnet = [name for name in RESNET_NAMES.values() if "norm" not in name]
    names = [name for name in UNET_FIXED_NAMES.values() if "norm" not in name]
    for level in range(4):
        for block, count, sampler in (("down_blocks", 2, "downsamplers"), ("up_blocks", 3, "upsamplers")):
            names.append(f"{block}.{level}.{sampler}.0.conv")
            for i in range(count):
                names += [f"{block}.{level}.resnets.{i}.{leaf}" for leaf in resnet]
                names += _attention(f"{block}.{level}.attentions.{i}")
    names += [f"mid_block.resnets.{i}.{leaf}" for i in range(2) for leaf in resnet]
    return frozenset(names + _attention("mid_block.attentions.0"))


@cache
def unet_names() -> dict[str, str]:
    """The UNet's layers in diffusers' names and in Stability's LDM ones (kohya trains SDXL, and sometimes SD 1.x,
    on that UNet) -> diffusers' names. Every LDM block/part/layer combination is mapped as a checkpoint's weight
    is (layers_per_block 2, as in every SD UNet); those that name no layer drop out."""
    leaves = [name for name in RESNET_NAMES if "norm" not in RESNET_NAMES[name]] + ["op", "conv"]
    blocks = (
        [f"input_blocks.{i}.{part}" for i in range(12) for part in range(2)]
        + [f"output_blocks.{i}.{part}" for i in range(12) for part in range(3)]
        + [f"middle_block.{part}" for part in range(3)]
    )
    ldm = list(UNET_FIXED_NAMES) + [
        name for block in blocks for name in [f"{block}.{leaf}" for leaf in leaves] + _attention(block)
    ]
    mapped = {name: (unet_key(f"{name}.weight", 2) or "").removesuffix(".weight") for name in ldm}
    return {name: name for name in unet_layers()} | {old: new for old, new in mapped.items() if new in unet_layers()}


UNET = Layout(unet_names)


def first_format_layer(stem: str) -> LoRATarget | None:
    """diffusers' first format: no component prefix, the UNet's attention processors (attn1.processor.to_q_lora)."""
    name = old_attention("unet", stem)
    return LoRATarget("unet", name) if name in unet_layers() else None


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    """First rule that applies:
    sdxl  a second text encoder, kohya's lora_te1_ names, cross-attention from 2048 wide, or SDXL's UNet
          structure: add_embedding, attention in up_blocks.0, more than one transformer block per attention
    sd2   cross-attention from 1024 wide, a linear proj_in (SD 1.x has a 1x1 conv), a 1024-wide text encoder
    sd1   the rest. A LoRA of CLIP-L alone could be FLUX's as well: it is taken as SD 1.x's.
    Released models' widths decide; the structural rules also place LoRAs of narrow test models."""
    if any(e.component == "text_encoder_2" or e.down.startswith("lora_te1_") for e in entries):
        return "sdxl"
    unet = [e for e in entries if e.component == "unet"]
    for e in unet:
        if e.layer.endswith(("attn2.to_k", "attn2.to_v")) and e.down_shape[1] in CROSS_ATTENTION_FAMILIES:
            return CROSS_ATTENTION_FAMILIES[e.down_shape[1]]
    if any(re.search(SDXL_LAYERS, e.layer) for e in unet):
        return "sdxl"
    if any(e.layer.endswith("proj_in") and len(e.down_shape) == 2 for e in unet):
        return "sd2"
    return "sd2" if any(e.component == "text_encoder" and e.down_shape[1] == 1024 for e in entries) else "sd1"


LORA = LoRARules(family=lora_family, kohya={"lora_unet_": ("unet", UNET)}, resolve=first_format_layer)
