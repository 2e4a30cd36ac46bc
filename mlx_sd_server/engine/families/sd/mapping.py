"""diffusers UNet2DConditionModel weights -> `mlx_sd_server.engine.families.sd.unet.UNetModel` weights."""

from __future__ import annotations

import numpy as np


def map_unet_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers (key, value) as our (key, value) pairs: names are kept, conv kernels become OHWI.

    The transformers' proj_in/proj_out are linear layers in our NHWC model, so SD1's 1x1 conv
    kernels for them are squeezed to (out, in) matrices (SD2/XL already store them as matrices).
    """
    if value.ndim == 4:
        if key.endswith((".proj_in.weight", ".proj_out.weight")):
            return [(key, value[:, :, 0, 0])]
        return [(key, value.transpose(0, 2, 3, 1))]
    return [(key, value)]


def map_controlnet_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A ControlNet is the UNet's down half plus plain convs, so the UNet's mapping applies unchanged."""
    return map_unet_weight(key, value)
