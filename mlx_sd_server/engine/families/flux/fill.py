"""FLUX.1 Fill (dev): inpainting by a transformer made for it (diffusers' FluxFillPipeline).

Fill's transformer is dev's with a wider input: beside the 2x2-packed latents being denoised (64 channels a
token) it reads the masked image's packed latents (64) and the mask, every image pixel under a token's 2x2
latent pixels as a channel of its own (2 x 2 x 8 x 8 = 256): 384 channels in, 64 out. Its configs (a diffusers
folder's, or those read off a single file's `img_in.weight`) tell it apart: it reads more channels than it
predicts. The masked image is the input image with the repainted part mid-grey; nothing is blended back
while sampling (the model sees what to keep). It needs an image and a mask: it has no text-to-image, and no
img2img without a mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np

FILL_GUIDANCE = 30.0  # FluxFillPipeline's default distilled guidance (and BFL's)
FILL_STEPS = 50  # FluxFillPipeline's default
FILL_STRENGTH = 1.0  # FluxFillPipeline's default: the masked part is sampled from pure noise


def is_fill(transformer_config: Mapping[str, Any]) -> bool:
    """Whether a FLUX.1 transformer is Fill's: it reads more channels than it predicts (diffusers' config)."""
    in_channels = transformer_config.get("in_channels", 64)
    return in_channels > (transformer_config.get("out_channels") or in_channels)


def fill_channels(mask: np.ndarray, masked: mx.array, scale: int) -> mx.array:
    """Fill's extra input channels, as FluxFillPipeline.prepare_mask_latents lays them out before packing: the
    masked image's latents (1, h, w, C), then the mask (H, W) folded into the latent grid, each latent pixel's
    `scale` x `scale` image pixels as channels in row-major order (scale² channels)."""
    h, w = mask.shape[0] // scale, mask.shape[1] // scale
    folded = mask[: h * scale, : w * scale].reshape(h, scale, w, scale).transpose(0, 2, 1, 3)
    return mx.concatenate([masked, mx.array(folded.reshape(1, h, w, scale * scale).astype(np.float32))], axis=-1)
