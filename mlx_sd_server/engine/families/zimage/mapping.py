"""diffusers ZImageTransformer2DModel weights -> our `families.zimage.transformer.ZImageTransformer2DModel` weights."""

from __future__ import annotations

import numpy as np


def map_zimage_transformer_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers (key, value) as our (key, value) pairs: our parameter names and layouts are diffusers' (linear
    layers, RMSNorm scales and the two pad tokens; the model has no convolutions), so this is the identity."""
    return [(key, value)]
