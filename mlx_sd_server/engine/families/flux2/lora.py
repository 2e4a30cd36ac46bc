"""FLUX.2's LoRAs, in diffusers/PEFT names on its transformer: told apart from FLUX.1's (asked first, since
klein-4B is FLUX.1's width and their double blocks share names) by layers only FLUX.2 has: the single blocks'
fused `attn.to_qkv_mlp_proj`, the `ff.linear_in/out` feed-forwards and the shared stream modulations. None is
applied yet: the family's capabilities say no LoRAs, before the queue."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mlx_sd_server.engine.families.lora import LoRAEntry, LoRARules

LAYERS = re.compile(r"\.attn\.to_qkv_mlp_proj$|\.ff(_context)?\.linear_(in|out)$|^(double|single)_stream_modulation")


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    return "flux2" if any(e.component == "transformer" and LAYERS.search(e.layer) for e in entries) else None


LORA = LoRARules(family=lora_family)
