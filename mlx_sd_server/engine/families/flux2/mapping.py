"""diffusers Flux2Transformer2DModel weights -> our `families.flux2.transformer.Flux2Transformer2DModel` weights."""

from __future__ import annotations

import numpy as np


def map_flux2_transformer_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers (key, value) as our (key, value) pairs: our parameter names and layouts are diffusers'
    (linear layers and RMSNorm scales only; FLUX.2's transformer has no convolutions), so this is the identity."""
    return [(key, value)]
