"""Z-Image's LoRAs, in diffusers/PEFT names on its transformer (`layers.N.`, `noise_refiner.N.`,
`context_refiner.N.`): told apart so that the LoRA folder lists them as Z-Image's (not SD3's, whose rule takes any
other diffusers transformer). None is applied yet: the family's capabilities say no LoRAs, before the queue."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mlx_sd_server.engine.families.lora import LoRAEntry, LoRARules

LAYERS = re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.")


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    return "zimage" if any(e.component == "transformer" and LAYERS.match(e.layer) for e in entries) else None


LORA = LoRARules(family=lora_family)
