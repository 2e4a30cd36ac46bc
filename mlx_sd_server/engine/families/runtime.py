"""A family's behaviour for one loaded model, behind the shared pipeline (`engine/pipeline.py`).

A runtime class says its schedule (`sigmas`), whether a job runs classifier-free guidance (`guided`), how
prompts become conditioning (`encode_prompts`) and how its network becomes a denoiser D(x, sigma) with
guidance applied (`denoiser`). What is true of the family before a model is loaded is in its spec.
"""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.request import Request
from mlx_sd_server.engine.sampling.denoiser import Denoiser


class Family(Protocol):
    prediction_type: str  # epsilon | v_prediction | flow: picks the denoiser wrapper and the noising rule
    inpainting_model: bool  # takes [mask, masked-image latents] as extra input channels (SD's 9-channel UNets)

    def __init__(self, model: Any) -> None: ...
    def sigmas(self, job: Request) -> np.ndarray: ...
    def guided(self, job: Request) -> bool: ...
    def encode_prompts(self, job: Request, guided: bool) -> Any: ...
    def denoiser(self, job: Request, conditioning: Any, guided: bool, extra_channels: mx.array | None,
                 control: mx.array | None) -> Denoiser: ...
