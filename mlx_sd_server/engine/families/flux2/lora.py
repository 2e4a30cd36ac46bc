"""FLUX.2's LoRAs, on its transformer, in the layouts its users have:

    diffusers / PEFT   transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight, ...
                       (also under `diffusion_model.` or PEFT's `base_model.model.`)
    BFL                Black Forest Labs' names, as ai-toolkit and ComfyUI write them: [diffusion_model.]
                       double_blocks.0.img_attn.qkv (q, k and v fused: split along the rows as the weight is, the
                       parts sharing `down`), single_blocks.0.linear1 (diffusers' to_qkv_mlp_proj, fused there
                       too), img_mlp.0, the stream modulations...; .lora_A/.lora_B or .lora_down/.lora_up/.alpha
    kohya              lora_unet_ + BFL's names flattened (lora_unet_double_blocks_0_img_attn_qkv)

FLUX.1's files use the same BFL block names (FLUX.2's blocks lack its per-block modulations and have SwiGLU
feed-forwards), and FLUX.2 is asked first, so it claims a LoRA only on evidence: a layer FLUX.1 does not have
(the diffusers names of the fused single-block projection and the SwiGLU feed-forwards, BFL's shared stream
modulations), feed-forwards 3 times the hidden size (FLUX.1's are 4 times), or klein 9B's width. A LoRA of
klein 4B's attention layers alone has none (its width is FLUX.1's): it is taken for FLUX.1's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mlx_sd_server.engine.families.flux.lora import bfl_layout
from mlx_sd_server.engine.families.flux2.single_file import BLOCKS, TOP_NAMES, map_bfl_flux2_transformer_weight
from mlx_sd_server.engine.families.lora import LoRAEntry, LoRARules


def map_bfl_up(key: str, value: np.ndarray, hidden_size: int) -> list[tuple[str, np.ndarray]]:
    """A LoRA's `up` of a BFL layer as the layer's weight maps (single_file.py): a fused q/k/v's rows are
    three times the width (`down`'s)."""
    if key.endswith("_attn.qkv.weight") and len(value) != 3 * hidden_size:
        raise ValueError(f"{key}: a fused q, k, v LoRA of {len(value)} rows, not 3 x its width {hidden_size}")
    return map_bfl_flux2_transformer_weight(key, value)


BFL = bfl_layout(TOP_NAMES, BLOCKS, map_bfl_up)

LAYERS = re.compile(r"\.attn\.to_qkv_mlp_proj$|\.ff(_context)?\.linear_(in|out)$|^(double|single)_stream_modulation")
ONLY_FLUX2 = re.compile(r"^(double|single)_stream_modulation")  # in BFL's names as in diffusers'
# In BFL's names: the layers that read the hidden states, and the feed-forwards' output layers (linear2 reads
# the attention's output and the feed-forward's, side by side)
HIDDEN_INPUTS = re.compile(r"\.((img|txt)_attn\.(qkv|proj)|(img|txt)_mlp\.0|linear1)$")
MLP_RATIO = 3  # FLUX.2's feed-forward width over the hidden size (FLUX.1's is 4)
KLEIN_9B_WIDTH = 4096  # no other family's transformer this server serves is as wide (FLUX.1 3072, SD3.5 2432)
BLOCK_LAYERS = re.compile(r"^(single_)?transformer_blocks\.|^(double|single)_blocks\.")


def mlp_ratio_is_flux2s(bfl: Sequence[LoRAEntry]) -> bool:
    """Whether BFL-named layers' widths say feed-forwards of MLP_RATIO times the hidden size."""
    hidden = {e.down_shape[1] for e in bfl if HIDDEN_INPUTS.search(e.layer)}
    if len(hidden) != 1:
        return False
    (width,) = hidden
    mlp = [e.down_shape[1] for e in bfl if re.search(r"_mlp\.2$", e.layer)]
    mlp += [e.down_shape[1] - width for e in bfl if e.layer.endswith(".linear2")]
    return bool(mlp) and all(m == MLP_RATIO * width for m in mlp)


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    """flux2: in BFL names (all of the transformer's), on the evidence in the module docstring; in diffusers'
    names, a layer only FLUX.2 has, or klein 9B's width."""
    transformer = [e for e in entries if e.component == "transformer"]
    if any(e.layout is BFL for e in transformer):
        if not all(e.layout is BFL for e in transformer):
            return None
        evidence = mlp_ratio_is_flux2s(transformer) or any(ONLY_FLUX2.match(e.layer) for e in transformer)
    else:
        evidence = any(LAYERS.search(e.layer) for e in transformer)
    wide = any(BLOCK_LAYERS.match(e.layer) and e.down_shape[1] == KLEIN_9B_WIDTH for e in transformer)
    return "flux2" if evidence or wide else None


LORA = LoRARules(
    family=lora_family,
    kohya={"lora_unet_": ("transformer", BFL)},
    prefixes={"base_model.model.": "transformer"},  # PEFT's own, as diffusers reads it for FLUX.2
    original={"transformer": BFL},
)
