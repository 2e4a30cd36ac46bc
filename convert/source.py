"""What every input format is read into before conversion: diffusers-layout configs and weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

Weights = Iterable[tuple[str, np.ndarray]]


class PickleRefusedError(ValueError):
    def __init__(self, path: Path):
        super().__init__(
            f"{path} is a pickle file, which can run arbitrary code when loaded. Convert a .safetensors "
            "version if there is one, or pass --allow-pickle if you trust this file."
        )


@dataclass
class SourceModel:
    """A model in diffusers layout: per component, its diffusers/transformers config.json and weights."""

    family: str  # sd1 | sd2 | sdxl | flux | sd3 | controlnet (a lone ControlNet)
    prediction_type: str  # epsilon | v_prediction | flow
    scheduler: dict[str, Any]  # the diffusers scheduler_config.json (betas, prediction type)
    components: dict[str, tuple[dict[str, Any], Weights]]
    tokenizers: dict[str, Path | None] = field(default_factory=dict)  # encoder name -> tokenizer folder


def family_of(components: dict[str, tuple[dict[str, Any], Weights]]) -> str:
    """FLUX has a FluxTransformer2DModel, SD3/SD3.5 an SD3Transformer2DModel; SDXL has text-time conditioning;
    SD 2.x has OpenCLIP's gelu text encoder; SD 1.x the rest."""
    if "transformer" in components:
        class_name = components["transformer"][0].get("_class_name")
        families = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
        if class_name not in families:
            raise ValueError(f"unsupported transformer {class_name!r} (this version converts FLUX.1 and SD3/SD3.5)")
        return families[class_name]
    unet_config = components["unet"][0]
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    encoder_config = components.get("text_encoder", ({}, ()))[0]
    return "sd2" if encoder_config.get("hidden_act") == "gelu" else "sd1"


def read_pickle(path: Path) -> dict[str, np.ndarray]:
    """Load a pickle checkpoint with torch's restricted unpickler (tensors only). Torch is optional."""
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"reading {path} needs torch (pip install torch), or use a .safetensors file") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items() if hasattr(v, "numpy")}
