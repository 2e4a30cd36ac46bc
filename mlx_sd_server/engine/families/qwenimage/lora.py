"""Qwen-Image's LoRAs, on its transformer, in the layouts its users have (diffusers'
`_convert_non_diffusers_qwen_lora_to_diffusers` reads the same ones):

    diffusers / PEFT   transformer.transformer_blocks.0.attn.to_q.lora_A.weight (also under PEFT's
                       `base_model.model.`)
    ComfyUI / bare     the same names under `diffusion_model.` or none, .lora_A/.lora_B or
                       .lora_down/.lora_up/.alpha: the Lightning few-step LoRAs (lightx2v) ship so
    kohya / musubi     lora_unet_ + those names flattened (lora_unet_transformer_blocks_0_attn_to_q)

Qwen-Image's transformer has diffusers' names in every release, so one table serves all three. Its attention
layers are named as FLUX.1's double blocks' are, and both are 3072 wide, so Qwen-Image (asked before FLUX.1)
claims a LoRA only on evidence: a layer FLUX.1 does not have (the stream modulations `img_mod`/`txt_mod`, the
feed-forwards `img_mlp`/`txt_mlp`, `img_in`/`txt_in`) or a block past FLUX.1's 19 double blocks. A LoRA of
the first 19 blocks' attention alone has neither: it is taken for FLUX.1's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from mlx_sd_server.engine.families.lora import Layout, LoRAEntry, LoRARules

DEPTH = 96  # blocks named: beyond the released models' 60
BLOCK_LAYERS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mod.1",
    "txt_mod.1",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
TOP_LAYERS = (
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)
FLUX_DOUBLE_BLOCKS = 19  # FLUX.1's transformer_blocks: a LoRA on a later one is not FLUX.1's
ONLY_QWEN = re.compile(r"(^|\.)(img_mod|txt_mod|img_mlp|txt_mlp)\.|^(img_in|txt_in)$")
BLOCK_INDEX = re.compile(r"^transformer_blocks\.(\d+)\.")


@cache
def qwenimage_layers() -> dict[str, str]:
    """Every Linear layer of a Qwen-Image transformer, by its (diffusers') name."""
    names = [*TOP_LAYERS, *(f"transformer_blocks.{i}.{layer}" for i in range(DEPTH) for layer in BLOCK_LAYERS)]
    return {name: name for name in names}


QWENIMAGE = Layout(qwenimage_layers)


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    """qwenimage: transformer layers, all of them Qwen-Image's, with the evidence of the module docstring."""
    transformer = [e for e in entries if e.component == "transformer"]
    if not transformer or any(e.layer not in qwenimage_layers() for e in transformer):
        return None
    late = any((m := BLOCK_INDEX.match(e.layer)) and int(m[1]) >= FLUX_DOUBLE_BLOCKS for e in transformer)
    evidence = late or any(ONLY_QWEN.search(e.layer) for e in transformer)
    return "qwenimage" if evidence else None


LORA = LoRARules(
    family=lora_family,
    kohya={"lora_unet_": ("transformer", QWENIMAGE)},
    original={"transformer": QWENIMAGE},  # bare names, as the Lightning LoRAs have them
)
