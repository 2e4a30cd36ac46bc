"""diffusers AutoencoderKL weights -> `mlx_sd_server.engine.vae.Autoencoder` parameters.

Our parameter names are diffusers' names, so the mapping only renames the old-style attention parameters
(diffusers < 0.14 and some re-exports) and changes layouts.
"""

from __future__ import annotations

import numpy as np

# Old diffusers names of the mid-block attention's projections -> current names.
LEGACY_ATTENTION_NAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}
ATTENTION_PROJECTIONS = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")


def map_vae_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers VAE state-dict entry as our (key, value) pairs (conv weights OIHW -> OHWI)."""
    for old, new in LEGACY_ATTENTION_NAMES.items():
        key = key.replace(old, new)
    if value.ndim == 4:
        if any(name in key for name in ATTENTION_PROJECTIONS):
            # Some checkpoints store the attention projections as 1x1 convolutions.
            value = value[:, :, 0, 0]
        else:
            value = value.transpose(0, 2, 3, 1)
    return [(key, value)]
