"""transformers text-encoder weights -> `engine.text` weights (CLIP and T5): pure (key, value) functions.

CLIP: our names are transformers' minus container levels. T5: our names are transformers' own. Dropped:
the decoder and LM head of a whole T5 checkpoint, and `encoder.embed_tokens.weight`, the tied copy of
`shared.weight` (our model embeds with `shared`). A per-key function cannot rename a lone
`encoder.embed_tokens.weight` to `shared.weight` only when `shared` is absent, so checkpoints must carry
`shared.weight`: transformers' saves, diffusers' FLUX `text_encoder_2` and ComfyUI's t5xxl files all do.
"""

from __future__ import annotations

import numpy as np

# Container levels transformers has and our flatter module does not. CLIPTextModelWithProjection nests
# the encoder under `text_model.`; current transformers' CLIPTextModel does not, older checkpoints do.
CLIP_DROPPED_PREFIXES = ("text_model.", "embeddings.", "encoder.")
T5_DROPPED_PREFIXES = ("decoder.", "lm_head.")
T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def map_clip_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One transformers (key, value) as our (key, value) pairs: the same names, minus container levels."""
    if key.endswith("position_ids"):  # a constant buffer (0..76) that old checkpoints saved
        return []
    for prefix in CLIP_DROPPED_PREFIXES:
        key = key.removeprefix(prefix)
    return [(key, value)]


def map_t5_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One transformers (key, value) as our (key, value) pairs: the same, or none."""
    if key == T5_TIED_EMBEDDING or key.startswith(T5_DROPPED_PREFIXES):
        return []
    return [(key, value)]
