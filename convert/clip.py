"""transformers CLIPTextModel / CLIPTextModelWithProjection weights -> `mlx_sd_server.engine.clip` weights."""

from __future__ import annotations

import numpy as np

# Container levels transformers has and our flatter module does not. CLIPTextModelWithProjection nests
# the encoder under `text_model.`; current transformers' CLIPTextModel does not, older checkpoints do.
DROPPED_PREFIXES = ("text_model.", "embeddings.", "encoder.")


def map_clip_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One transformers (key, value) as our (key, value) pairs: the same names, minus container levels."""
    if key.endswith("position_ids"):  # a constant buffer (0..76) that old checkpoints saved
        return []
    for prefix in DROPPED_PREFIXES:
        key = key.removeprefix(prefix)
    return [(key, value)]
