"""Z-Image's LoRAs, on its transformer, in the layouts its users have:

    diffusers / PEFT   transformer.layers.0.attention.to_q.lora_A.weight (also `noise_refiner.N.`,
                       `context_refiner.N.`, under `diffusion_model.` as ai-toolkit saves them, or bare)
    original           Tongyi-MAI's module names, as ComfyUI and musubi-tuner write them: [diffusion_model.]
                       layers.0.attention.qkv (q, k and v fused: split along the rows as the weight is, the
                       parts sharing `down`), attention.out (diffusers' to_out.0), x_embedder and final_layer.
                       (diffusers' all_x_embedder.2-1, all_final_layer.2-1)
    kohya              lora_unet_ + either naming flattened (lora_unet_layers_0_attention_to_q,
                       lora_unet_layers_0_attention_qkv), .lora_down/.lora_up/.alpha

Both namings are one layout (diffusers' names map to themselves, the original ones as single_file.py maps their
weights), so that kohya's flattened names of either are found. A LoRA is Z-Image's when its transformer's
layers are all of that layout; its names are read as Z-Image's only after FLUX's rules (whose BFL names share
`final_layer.`) have passed on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from mlx_sd_server.engine.families.lora import Layout, LoRAEntry, LoRARules
from mlx_sd_server.engine.families.zimage.single_file import (
    BLOCK_MODULES,
    BLOCK_NAMES,
    BLOCKS,
    TOP_NAMES,
    is_zimage_transformer_key,
    map_zimage_transformer_weight,
)
from mlx_sd_server.engine.families.zimage.transformer import ZImageTransformerConfig

DEPTH = {"layers": 64, "noise_refiner": 8, "context_refiner": 8}  # beyond any released model's (30, 2, 2)
EMBEDDER = ZImageTransformerConfig().embedder_key  # the released models' one patch size's ("2-1")
QKV = "attention.qkv"  # the fused projection: q's, k's and v's rows, each as many as the model is wide


@cache
def zimage_layers() -> dict[str, str]:
    """A Z-Image transformer's layers (not its norms) in the original names and in diffusers' -> the layer: an
    original name stays one (mapped when read, as its weight is), diffusers' is its own."""
    diffusers = [part for t in BLOCK_NAMES.values() for part in (t if isinstance(t, tuple) else (t,))]
    block = [*BLOCK_NAMES, *BLOCK_MODULES, *diffusers]
    top = [*TOP_NAMES, *(name.format(key=EMBEDDER) for name in TOP_NAMES.values())]
    names = top + [f"{b}.{i}.{name}" for b in BLOCKS for i in range(DEPTH[b]) for name in block]
    return {name: name for name in names if "norm" not in name}


def zimage_to_diffusers(layer: str, up: np.ndarray, width: int) -> list[tuple[str, np.ndarray]]:
    """A layer's `up` in diffusers' layers, mapped as the original layout's weight is (the fused qkv's rows are
    q's, k's and v's); a diffusers name is its own."""
    if not is_zimage_transformer_key(f"{layer}.weight"):
        return [(layer, up)]
    if layer.endswith(QKV) and up.shape[0] != 3 * width:
        raise ValueError(f"{layer}: a fused q, k, v LoRA of {up.shape[0]} rows, not 3 x its width {width}")
    return [
        (name.removesuffix(".weight"), part)
        for name, part in map_zimage_transformer_weight(f"{layer}.weight", up, EMBEDDER)
    ]


ZIMAGE = Layout(zimage_layers, zimage_to_diffusers)


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    """zimage: layers of Z-Image's transformer (in either naming), and no other transformer layers."""
    transformer = [e for e in entries if e.component == "transformer"]
    return "zimage" if transformer and all(e.layout is ZIMAGE for e in transformer) else None


LORA = LoRARules(family=lora_family, kohya={"lora_unet_": ("transformer", ZIMAGE)}, original={"transformer": ZIMAGE})
