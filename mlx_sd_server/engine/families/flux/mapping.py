"""diffusers FluxTransformer2DModel weights -> our `families.flux.transformer.FluxTransformer2DModel` weights."""

from __future__ import annotations

import numpy as np


def map_flux_transformer_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers (key, value) as our (key, value) pairs: our parameter names and layouts are diffusers'
    (all linear layers and RMSNorm scales; FLUX's transformer has no convolutions), so this is the identity."""
    return [(key, value)]
