"""The LDM (CompVis) autoencoder layout -> diffusers' AutoencoderKL: names, and the config from shapes.

SD 1.x/2.x/XL single files keep their VAE in this layout under `first_stage_model.`; FLUX's `ae.safetensors`
and SD3's files use it too (16 latent channels, no quant convs). Only the latent format and the image size
the model was trained at are not in the weights: the family gives them.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_sd_server.engine.source import (
    ArchitectureHints,
    OriginalComponent,
    Tensors,
    count_distinct,
    guess,
    known_keys,
    strip_prefix,
)

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.spec import LatentFormat

MARKER = "encoder.down.0.block.0.conv1.weight"  # the encoder's first resnet: every LDM autoencoder has it
RELEASED_WIDTHS = [128, 256, 512, 512]  # SD's, SDXL's, FLUX's and SD3's autoencoders

ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
SAME_NAMES = {
    "encoder.conv_in",
    "encoder.conv_out",
    "decoder.conv_in",
    "decoder.conv_out",
    "quant_conv",
    "post_quant_conv",
}


def vae_key(key: str, levels: int) -> str | None:
    """An LDM VAE key -> its diffusers key; None if unknown. The decoder's `up` levels are numbered from the
    bottom."""
    module, _, param = key.rpartition(".")
    if module in SAME_NAMES:
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out", module):
        return f"{m[1]}.conv_norm_out.{param}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block\.\d+|downsample)\.(.+)", module):
        inner = m[2].replace("block.", "resnets.").replace("downsample", "downsamplers.0")
        return f"encoder.down_blocks.{m[1]}.{inner}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{param}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block\.\d+|upsample)\.(.+)", module):
        inner = m[2].replace("block.", "resnets.").replace("upsample", "upsamplers.0")
        level = levels - 1 - int(m[1])
        return f"decoder.up_blocks.{level}.{inner}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", module):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{param}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", module)) and m[2] in ATTENTION_NAMES:
        return f"{m[1]}.mid_block.attentions.0.{ATTENTION_NAMES[m[2]]}.{param}"
    return None


def norm_groups(channels: list[int], hints: ArchitectureHints) -> int:
    """The group norms' group count: the usual one, or fewer where a model is narrower."""
    return math.gcd(hints.value("norm_num_groups"), *channels)


def vae_config_from_ldm(
    vae: Tensors, latent: LatentFormat, sample_size: int, hints: ArchitectureHints
) -> dict[str, Any]:
    """The diffusers AutoencoderKL config.json for LDM VAE weights (prefix removed); only their shapes are read.
    `sample_size`: the image side the model was trained at."""
    levels = count_distinct(vae, r"encoder\.down\.(\d+)\.")
    channels = [vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": vae["encoder.conv_in.weight"].shape[1],
        "latent_channels": vae["decoder.conv_in.weight"].shape[1],
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": count_distinct(vae, r"encoder\.down\.0\.block\.(\d+)\."),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
        "norm_num_groups": norm_groups(channels, hints),
        "out_channels": vae["decoder.conv_out.weight"].shape[0],
        "sample_size": sample_size,
        "scaling_factor": latent.scaling_factor,
        "shift_factor": latent.shift_factor or None,  # (diffusers' SD VAEs have none)
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "use_quant_conv": "quant_conv.weight" in vae,
    }


def map_ldm_vae_weight(key: str, value: np.ndarray, levels: int) -> list[tuple[str, np.ndarray]]:
    """One LDM VAE (key, value), its prefix removed, as its diffusers pair (none if unknown); the attention
    projections, stored as 1x1 convolutions, become linear weights."""
    name = vae_key(key, levels)
    if name is None:
        return []
    if ".mid_block.attentions." in name and value.ndim == 4:
        value = value[:, :, 0, 0]
    return [(name, value)]


def read_vae(
    tensors: Tensors, prefix: str, latent: LatentFormat, sample_size: int, hints: ArchitectureHints
) -> OriginalComponent:
    """The VAE under `prefix` (`map_ldm_vae_weight`)."""
    config = vae_config_from_ldm(strip_prefix(tensors, prefix), latent, sample_size, hints)
    levels = len(config["block_out_channels"])

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return map_ldm_vae_weight(key[len(prefix) :], value, levels)

    keys = known_keys(tensors, prefix, lambda k: vae_key(k, levels) is not None, "VAE")
    standard = config["block_out_channels"] == RELEASED_WIDTHS
    return OriginalComponent(
        config, keys, mapper, guessed=guess(hints, "norm_num_groups", config, "norm_num_groups", standard)
    )
