"""FLUX.1 Kontext: instruction edits on FLUX.1 dev's networks (diffusers' FluxKontextPipeline).

Kontext's transformer is FLUX.1 dev's (the same class, config and tensor names); what differs is how it is
run. The input image is resized to the resolution Kontext was trained at nearest its aspect ratio
(`reference_size`), encoded by the autoencoder, packed into 2x2 patches like the latents being denoised,
and appended to them as extra image tokens whose position ids have 1, not 0, in their first column; the
prediction is sliced back to the denoised tokens. Guidance is dev's distilled embedding.

A model is Kontext when its diffusers folder's pipeline class is FluxKontextPipeline (model_index.json,
kept in the manifest's `pipeline`), else when its name says so: a single file holds dev's tensors, so the
file's name (`flux1-kontext-dev.safetensors`, `flux1-kontext-dev-Q4_K_M.gguf`: `convert` names a model after
its file) or the name given to `convert` tells it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.families.flux.fill import is_fill
from mlx_sd_server.engine.families.flux.transformer import latent_image_ids
from mlx_sd_server.engine.families.spec import PIPELINE_CLASS

KONTEXT_PIPELINE = "FluxKontextPipeline"
NAME_MARK = "kontext"  # what a Kontext model's name holds where no pipeline class says (its files are named so)
REFERENCE_ID = 1.0  # the first position-id column of reference tokens (0 for the tokens being denoised)

# (width, height): the resolutions Kontext was trained at (diffusers' PREFERRED_KONTEXT_RESOLUTIONS, BFL's)
PREFERRED_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def is_kontext(pipeline: Mapping[str, Any], name: str) -> bool:
    """Whether a guidance-distilled FLUX.1 model is Kontext: as its pipeline class says (a diffusers folder's),
    else by its name (see the module docstring)."""
    if PIPELINE_CLASS in pipeline:
        return pipeline[PIPELINE_CLASS] == KONTEXT_PIPELINE
    return NAME_MARK in name.lower()


def is_kontext_model(manifest: Mapping[str, Any]) -> bool:
    """Whether a converted model is Kontext: dev's transformer (a guidance embedding, not Fill's wider input)
    that its manifest's `pipeline` or name says is Kontext."""
    config = manifest["components"]["transformer"]["config"]
    dev = bool(config.get("guidance_embeds")) and not is_fill(config)
    return dev and is_kontext(manifest.get("pipeline", {}), manifest.get("name", ""))


def reference_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The (width, height) an input image of `width` x `height` is resized to: the preferred resolution
    nearest its aspect ratio (ties to the narrower), in multiples of `multiple` (the VAE's downscale x the 2x2
    patch). As FluxKontextPipeline: the aspect ratio is the image's after its sides are cut to multiples (a
    side under one multiple, where diffusers would divide by zero, counts as one)."""
    aspect = max(width - width % multiple, multiple) / max(height - height % multiple, multiple)
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_RESOLUTIONS)
    return w // multiple * multiple, h // multiple * multiple


def reference_pixels(image: Image.Image, multiple: int) -> np.ndarray:
    """An input image as the autoencoder reads it: RGB, resized (stretched, not cropped: diffusers' default
    resize) with Lanczos to `reference_size`, float32 in [0, 1], HWC."""
    image = image.convert("RGB")
    size = reference_size(image.width, image.height, multiple)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def reference_ids(h: int, w: int) -> mx.array:
    """(h/2 * w/2, 3) position ids of a reference image's packed tokens (h x w latents): (1, row, col)."""
    ids = latent_image_ids(h, w)
    return mx.concatenate([mx.full((ids.shape[0], 1), REFERENCE_ID), ids[:, 1:]], axis=1)
