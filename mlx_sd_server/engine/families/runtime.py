"""A family's behaviour for one loaded model, behind the shared pipeline (`engine/pipeline.py`).

A runtime class says its schedule (`sigmas`), whether a job runs classifier-free guidance (`guided`), how
prompts become conditioning (`encode_prompts`) and how its network becomes a denoiser D(x, sigma) with
guidance applied (`denoiser`). It reads a job's `Settings`, not the job. What is true of the family before a
model is loaded is in its spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.request import Request
from mlx_sd_server.engine.sampling.denoiser import Denoiser


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
        )


class Family(Protocol):
    prediction_type: str  # epsilon | v_prediction | flow: picks the denoiser wrapper and the noising rule
    inpainting_model: bool  # takes [mask, masked-image latents] as extra input channels (SD's 9-channel UNets)

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


def image_tokens(vae: Any, settings: Settings, patch: int = 1) -> int:
    """The tokens one image is to a DiT: its latent grid (in the sampler's space, as the VAE says) in
    patch x patch cells. Flow schedules that shift by image size read it."""
    _, h, w, _ = vae.latent_shape(1, settings.height, settings.width)
    return (h // patch) * (w // patch)
