"""Model families: the little that differs between Stable Diffusion, FLUX, ... behind one pipeline.

A family (one small class per family, `../shared/families.md`) says what its model can do
(`capabilities`, read from the manifest alone, before anything is loaded), its schedule (`sigmas`), how
prompts become conditioning (`encode_prompts`) and how its network becomes a denoiser D(x, sigma) with
guidance applied (`denoiser`). The shared loop in `pipeline.py` does the rest. The manifest's `family`
picks the class; nothing else in the server names a family.
"""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.denoiser import Denoiser
from mlx_sd_server.job import Capabilities, Job


class Family(Protocol):
    """A family's behaviour for one loaded model (see the module docstring)."""

    prediction_type: str  # epsilon | v_prediction | flow: picks the denoiser wrapper and the noising rule
    inpainting_model: bool  # takes [mask, masked-image latents] as extra input channels (SD's 9-channel UNets)

    @classmethod
    def capabilities(cls, manifest: dict[str, Any], has_controlnet: bool) -> Capabilities: ...
    def sigmas(self, job: Job) -> np.ndarray: ...
    def guided(self, job: Job) -> bool: ...
    def encode_prompts(self, job: Job, guided: bool) -> Any: ...
    def denoiser(self, job: Job, conditioning: Any, guided: bool, extra_channels: mx.array | None,
                 control: mx.array | None) -> Denoiser: ...


def family_class(family: str) -> type:
    """The class serving a manifest's `family`."""
    from mlx_sd_server.engine.families.flux import FluxFamily
    from mlx_sd_server.engine.families.sd import StableDiffusionFamily
    from mlx_sd_server.engine.families.sd3 import SD3Family

    for cls in (StableDiffusionFamily, FluxFamily, SD3Family):
        if family in cls.names:
            return cls
    raise ValueError(f"unsupported model family {family!r}")


def capabilities(manifest: dict[str, Any], has_controlnet: bool = False) -> Capabilities:
    return family_class(manifest["family"]).capabilities(manifest, has_controlnet)
