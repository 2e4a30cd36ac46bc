"""The upscalers a server has (the lead's placeholder for the upscaler helper: built-ins only so far; the
helper writing this package replaces it, keeping this interface)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mlx_sd_server.engine.errors import JobError, shown

UPSCALER_FOLDER = "upscalers"  # converted upscalers, in the model directory
BUILT_IN = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    arch: str
    scale: int
    folder: Path | None = None


class UpscalerLibrary:
    def __init__(self, folder: Path):
        self.folder = folder

    def names(self) -> list[str]:
        return list(BUILT_IN)

    def info(self, name: str) -> UpscalerInfo:
        if name in BUILT_IN:
            return UpscalerInfo(name, name, 1)
        raise JobError(f"upscaler {shown(name)} not found", "upscaler", "upscaler_not_found", 404)

    def upscale(self, name: str, image: Image.Image, scale: float) -> Image.Image:
        self.info(name)
        size = (round(image.width * scale), round(image.height * scale))
        return image.convert("RGB").resize(size, BUILT_IN[name])
