"""transformers T5EncoderModel (or whole T5) weights -> `mlx_sd_server.engine.t5` weights.

Our names are transformers' own. Dropped: the decoder and LM head of a whole T5 checkpoint, and
`encoder.embed_tokens.weight`, the tied copy of `shared.weight` (our model embeds with `shared`). A
per-key function cannot rename a lone `encoder.embed_tokens.weight` to `shared.weight` only when `shared`
is absent, so checkpoints must carry `shared.weight`: transformers' saves, diffusers' FLUX `text_encoder_2`
and ComfyUI's t5xxl files all do.
"""

from __future__ import annotations

import numpy as np

DROPPED_PREFIXES = ("decoder.", "lm_head.")
TIED_EMBEDDING = "encoder.embed_tokens.weight"


def map_t5_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One transformers (key, value) as our (key, value) pairs: the same, or none."""
    if key == TIED_EMBEDDING or key.startswith(DROPPED_PREFIXES):
        return []
    return [(key, value)]
