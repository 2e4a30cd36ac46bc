"""A family's behaviour for one loaded model, behind the shared pipeline (`engine/pipeline.py`).

A runtime class says its schedule (`sigmas`), whether a job runs classifier-free guidance (`guided`), how
prompts become conditioning (`encode_prompts`) and how its network becomes a denoiser D(x, sigma) with
guidance applied (`denoiser`). It reads a job's `Settings`, not the job. What is true of the family before a
model is loaded is in its spec.

Reference images (instruction edits: FLUX.2 klein, FLUX.1 Kontext) reach a family as `Settings.reference_images`,
the request's images as sent: the family resizes them by its own rule, encodes them once per job
(`encode_pixels`) when it builds its denoiser (or its conditioning, where the text encoder reads them) and
feeds them to its network; the shared pipeline knows no more than that they are there. A family whose
inpainting also reads the source image as a reference says so in its spec (`source_as_reference`): the
pipeline then puts the source, fitted to the output, first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.request import Request
from mlx_sd_server.engine.sampling.denoiser import Denoiser
from mlx_sd_server.engine.vae import should_tile


@dataclass(frozen=True)
class Settings:
    """The generation settings a family reads, taken from a job once by the pipeline (its images, seeds,
    sampler and LoRAs are the pipeline's business)."""

    prompt: str
    negative_prompt: str
    n: int
    steps: int
    scheduler: str
    cfg_scale: float
    guidance: float | None  # distilled guidance, for models with a guidance embedding (None: the default)
    width: int
    height: int
    control_strength: float
    max_sequence_length: int | None = None  # T5's tokens per prompt (None: the model's own)
    reference_images: tuple[Image.Image, ...] = ()  # instruction edits' input images, in order (see above)

    @classmethod
    def of(cls, job: Request) -> Settings:
        return cls(
            job.prompt,
            job.negative_prompt,
            job.n,
            job.steps,
            job.scheduler,
            job.cfg_scale,
            job.guidance,
            job.width,
            job.height,
            job.control_strength,
            job.max_sequence_length,
            job.reference_images,
        )


class Family(Protocol):
    prediction_type: str  # epsilon | v_prediction | flow: picks the denoiser wrapper and the noising rule
    # Takes the mask and the masked image's latents as extra input channels, as its spec's `inpainting_channels`
    # lays them out (SD's 9-channel UNets, FLUX.1 Fill)
    inpainting_model: bool

    def __init__(self, model: Any) -> None: ...
    def sigmas(self, settings: Settings) -> np.ndarray: ...
    def guided(self, settings: Settings) -> bool: ...
    def encode_prompts(self, settings: Settings, guided: bool) -> Any: ...
    def denoiser(
        self,
        settings: Settings,
        conditioning: Any,
        guided: bool,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Denoiser: ...


# (the mask at image size, True where repainted; the masked image's latents (1, h, w, C); the VAE's downscale)
# -> an inpainting model's extra input channels (1, h, w, C'), in the sampler's latent space
InpaintingChannels = Callable[[np.ndarray, mx.array, int], mx.array]


def downsample_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """Max-pool to latent size: a latent pixel is repainted if any of its image pixels is."""
    h, w = mask.shape[0] // scale, mask.shape[1] // scale
    return mask[: h * scale, : w * scale].reshape(h, scale, w, scale).max(axis=(1, 3)).astype(np.float32)


def pooled_mask_channels(mask: np.ndarray, masked: mx.array, scale: int) -> mx.array:
    """SD's inpainting UNets' extra channels: the mask max-pooled to the latent grid, then the masked image's
    latents (1 + C channels)."""
    return mx.concatenate([mx.array(downsample_mask(mask, scale))[None, :, :, None], masked], axis=-1)


# (the mask at image size, True where repainted; the VAE's downscale) -> the mask on the latent grid (h, w)
# float32 in [0, 1], which inpainting with a regular model blends by (the spec's `latent_mask`)
LatentMask = Callable[[np.ndarray, int], np.ndarray]


def bilinear_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """Bilinear interpolation to latent size, as torch's `interpolate(mode="bilinear")` (half-pixel centres,
    no antialiasing: a latent pixel reads the 2x2 image pixels around its centre, so it may be partly
    repainted), which FLUX.2 klein's inpainting pipeline uses."""
    out = np.asarray(mask, np.float32)
    for axis in (0, 1):
        size = out.shape[axis]
        step = np.float32(size) / np.float32(size // scale)  # (in float32, as torch computes it)
        positions = np.maximum((np.arange(size // scale, dtype=np.float32) + np.float32(0.5)) * step - 0.5, 0)
        low = positions.astype(np.int64)
        high = np.minimum(low + 1, size - 1)
        weight = positions - low.astype(np.float32)
        shape = (-1, 1) if axis == 0 else (1, -1)
        out = np.take(out, low, axis) * (1 - weight.reshape(shape)) + np.take(out, high, axis) * weight.reshape(shape)
    return out.astype(np.float32)


def nearest_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour to latent size, as torch's `interpolate` by default (each latent pixel takes its block's
    first image pixel), which Qwen-Image's inpainting pipeline uses."""
    h, w = mask.shape[0] // scale, mask.shape[1] // scale
    return np.asarray(mask, np.float32)[: h * scale : scale, : w * scale : scale]


def encode_pixels(model: Any, pixels: np.ndarray) -> mx.array:
    """[0, 1] HWC pixels -> the sampler's latents (1, h, w, C) (the VAE's latent space), from the posterior
    mean: how the pipeline encodes a source image and a family its reference images."""
    x = mx.array(pixels[None] * 2 - 1).astype(model.vae_dtype)
    d = model.vae.latent_scale
    tile = should_tile(x.shape[1] // d, x.shape[2] // d, model.low_memory)  # (as decoding: a hires image)
    mean, _ = model.vae.encode_tiled(x) if tile else model.vae.encode(x)
    return model.vae.to_latents(mean)


def image_tokens(vae: Any, settings: Settings, patch: int = 1) -> int:
    """The tokens one image is to a DiT: its latent grid (in the sampler's space, as the VAE says) in
    patch x patch cells. Flow schedules that shift by image size read it."""
    _, h, w, _ = vae.latent_shape(1, settings.height, settings.width)
    return (h // patch) * (w // patch)
