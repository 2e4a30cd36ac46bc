"""SD3's LoRAs: diffusers/PEFT names (transformer., text_encoder_3. for its T5); kohya's SD3 files are refused."""

from __future__ import annotations

from collections.abc import Sequence

from mlx_sd_server.engine.families.lora import LoRAEntry, LoRARules


def lora_family(entries: Sequence[LoRAEntry]) -> str | None:
    """sd3: a diffusers transformer (asked after FLUX, which takes those with FLUX's layers or width), or its
    T5 as text_encoder_3."""
    return "sd3" if any(e.component in ("transformer", "text_encoder_3") for e in entries) else None


LORA = LoRARules(family=lora_family, refused={r"^lora_unet_joint_blocks_": "a kohya SD3 LoRA"})
