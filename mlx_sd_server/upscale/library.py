"""The upscalers a server has: the converted ones in `<model dir>/upscalers/NAME/` and the built-in resamplers,
by name; an image enlarged by one as A1111's `Upscaler.upscale` does (the network applied while the image is
still smaller than the target, at most three times, then a Lanczos resize to the exact size), in tiles."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.errors import JobError, shown
from mlx_sd_server.engine.hires import LATENT_UPSCALE_MODES
from mlx_sd_server.engine.vae import tile_starts
from mlx_sd_server.upscale.networks import UpscaleNetwork
from mlx_sd_server.upscale.weights import CONFIG_FILE, load_network, read_config

UPSCALER_FOLDER = "upscalers"  # converted upscalers, in the model directory
BUILT_IN = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
MAX_PASSES = 3  # as A1111: a 2x network thrice at most, then the resize does the rest
# Tiles of TILE input pixels a side, neighbours sharing at least OVERLAP, the outer quarter of each overlap left
# out and the middle half cross-faded linearly: memory is one tile's activations plus the output, whatever the
# image's size. Tiled results are within 1/255 of untiled ones (max abs, uint8) for networks as deep as
# realesr-general-x4v3 or RRDBNets (tests/test_upscalers.py measures it); with an overlap of 32 a compact
# network of 32 convolutions at random weights reached 5/255.
TILE, OVERLAP = 256, 48
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a converted upscaler's folder name


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    arch: str  # "esrgan" | "srvgg" | "lanczos" | "nearest"
    scale: int  # the network's factor (1 for the built-in resamplers, which have none)
    folder: Path | None = None  # None for the built-ins


def reserved(name: str) -> bool:
    """Names requests give other meanings: the built-ins and the hires fix's latent modes."""
    return name.lower() in BUILT_IN or name.lower() in LATENT_UPSCALE_MODES


def tile_weights(starts: list[int], tile: int, scale: int) -> list[np.ndarray]:
    """Per tile, its output pixels' weights along one axis, summing to one over the tiles. Across an overlap of
    `o` with a neighbour, the outer o/4 (the pixels whose context the tile's edge cut off) weigh 0 and the next
    o/2 ramp linearly to 1, mirroring the neighbour's ramp. (Tiles are a grid, so the product of two axes'
    weights sums to one over the tiles too.)"""
    position = (np.arange(tile * scale) + 0.5) / scale  # output pixel centres, in input pixels
    weights = []
    for i, start in enumerate(starts):
        w = np.ones(tile * scale, np.float32)
        for neighbour, distance in ((i - 1, position), (i + 1, tile - position)):
            if 0 <= neighbour < len(starts):
                shared = tile - abs(start - starts[neighbour])
                w = np.minimum(w, np.clip((distance - shared / 4) / (shared / 2), 0.0, 1.0))
        weights.append(w)
    total = np.zeros((starts[-1] + tile) * scale, np.float32)
    for start, w in zip(starts, weights):
        total[start * scale : (start + tile) * scale] += w
    # (exactly one already where at most two tiles meet; where a short axis makes three, this makes it so)
    return [w / total[start * scale : (start + tile) * scale] for start, w in zip(starts, weights)]


def enlarge(network: UpscaleNetwork, pixels: np.ndarray, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """An (h, w, 3) uint8 image through `network`, in tiles of `tile` sharing `overlap` when larger: (h*s, w*s, 3)
    uint8, clamped to [0, 1] and rounded as A1111 makes the network's output an image. Each tile is computed
    and added into a float32 numpy image before the next: MLX holds one tile's activations at a time."""
    if not 0 < overlap < tile:
        raise ValueError(f"the overlap must be in [1, tile), got tile={tile}, overlap={overlap}")
    height, width, s = pixels.shape[0], pixels.shape[1], network.scale
    x = mx.array(pixels).astype(mx.float32) / 255.0
    out = np.zeros((height * s, width * s, 3), np.float32)
    th, tw = min(tile, height), min(tile, width)
    rows, cols = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    for top, wy in zip(rows, tile_weights(rows, th, s)):
        for left, wx in zip(cols, tile_weights(cols, tw, s)):
            result = network(x[None, top : top + th, left : left + tw])[0]
            part = np.array(result, copy=False)
            out[top * s : (top + th) * s, left * s : (left + tw) * s] += part * (wy[:, None, None] * wx[None, :, None])
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class UpscalerLibrary:
    def __init__(self, folder: Path, tile: int = TILE, overlap: int = OVERLAP):
        self.folder = Path(folder)
        self.tile, self.overlap = tile, overlap
        self._loaded: tuple[Path, int, UpscaleNetwork] | None = None  # (folder, config's mtime, network)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The built-in resamplers, then the converted upscalers by name."""
        converted = []
        if self.folder.is_dir():
            converted = sorted(
                entry.name
                for entry in self.folder.iterdir()
                if NAME.fullmatch(entry.name) and not reserved(entry.name) and (entry / CONFIG_FILE).is_file()
            )
        return list(BUILT_IN) + converted

    def folder_for(self, name: str) -> Path:
        """Where `convert` writes the upscaler `name`; a ValueError for a name requests could not give."""
        if not NAME.fullmatch(name) or reserved(name):
            raise ValueError(
                f"{name!r} cannot name an upscaler (letters, digits, '.', '_', '+', '-'; not "
                f"{', '.join([*BUILT_IN, *LATENT_UPSCALE_MODES])})"
            )
        return self.folder / name

    def info(self, name: str) -> UpscalerInfo:
        if name in BUILT_IN:
            return UpscalerInfo(name, name, 1)
        folder = self.folder / name
        if NAME.fullmatch(name) and not reserved(name) and (folder / CONFIG_FILE).is_file():
            config = read_config(folder)
            return UpscalerInfo(name, config["arch"], int(config["scale"]), folder)
        raise JobError(f"upscaler {shown(name)} not found", "upscaler", "upscaler_not_found", 404)

    def network(self, info: UpscalerInfo) -> UpscaleNetwork:
        """The converted upscaler's network, kept while the next request names the same one (reconverted
        in place, it is read again)."""
        assert info.folder is not None
        stamp = (info.folder / CONFIG_FILE).stat().st_mtime_ns
        with self._lock:
            if self._loaded is None or self._loaded[:2] != (info.folder, stamp):
                self._loaded = None  # the previous network goes before the next is read
                self._loaded = (info.folder, stamp, load_network(info.folder))
            return self._loaded[2]

    def upscale(self, name: str, image: Image.Image, scale: float) -> Image.Image:
        """`image` (RGB) enlarged to exactly round(w*scale) x round(h*scale). Runs MLX: the worker thread's."""
        info = self.info(name)
        image = image.convert("RGB")
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if info.folder is None:
            return image.resize(target, BUILT_IN[name])
        network = self.network(info)
        for i in range(MAX_PASSES):  # A1111's loop: a scale of 1 still runs a (restoring) network once
            if image.width >= target[0] and image.height >= target[1] and (i > 0 or scale != 1):
                break
            size = image.size
            image = Image.fromarray(enlarge(network, np.asarray(image), self.tile, self.overlap))
            if image.size == size:  # a 1x network: once is all it does
                break
        return image if image.size == target else image.resize(target, Image.Resampling.LANCZOS)
