"""diffusers SD3Transformer2DModel weights -> `mlx_sd_server.engine.families.sd3.transformer.SD3Transformer2DModel`."""

from __future__ import annotations

import numpy as np


def map_sd3_transformer_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers (key, value) as our (key, value) pairs: our parameter names are diffusers', and the one
    convolution (the patch embedding, `pos_embed.proj.weight`) goes from OIHW to OHWI."""
    if value.ndim == 4:
        value = value.transpose(0, 2, 3, 1)
    return [(key, value)]
