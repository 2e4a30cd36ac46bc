"""diffusers ControlNetModel weights -> `mlx_sd_server.engine.controlnet.ControlNetModel` weights."""

from __future__ import annotations

import numpy as np

from convert.unet import map_unet_weight


def map_controlnet_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A ControlNet is the UNet's down half plus plain convs, so the UNet's mapping applies unchanged."""
    return map_unet_weight(key, value)
