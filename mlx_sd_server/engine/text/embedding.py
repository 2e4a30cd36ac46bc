"""The token embedding of the text encoders (CLIP, T5), which refuses ids its table does not have.

MLX's gather does not check bounds: an id past the table reads whatever memory follows it. A checkpoint
whose embedding is shorter than its tokenizer's vocabulary (536 rows for CLIP's 49,408 tokens) gave NaN
images, run-to-run garbage and segfaults that way. `load_model` refuses such a model; this check is the
last guard, for ids from anywhere else.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx
import mlx.nn as nn


class TokenEmbedding(nn.Embedding):
    """nn.Embedding (parameter `weight`, (rows, dims)) that raises ValueError for an id outside [0, rows)."""

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, ids: mx.array) -> mx.array:
        # One small reduction over the ids (B x 77 or B x 512), on the CPU: microseconds beside a forward pass.
        bounds = mx.stack([mx.min(ids, stream=mx.cpu), mx.max(ids, stream=mx.cpu)], stream=mx.cpu)
        low, high = cast(list[int], bounds.tolist())  # (mlx types tolist() as any scalar or nested list)
        if low < 0 or high >= self.rows:
            raise ValueError(
                f"token id {high if high >= self.rows else low} is outside this text encoder's "
                f"embedding ({self.rows} rows)"
            )
        return super().__call__(ids)
