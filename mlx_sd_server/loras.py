"""The LoRA folder (`--lora-model-dir`): the LoRAs a request may name, and LoRAs bound to a loaded model.

A LoRA's name is its path in the folder without `.safetensors` (`detail` or `styles/ink`), as in A1111's
`<lora:name:weight>`. Listing reads only file headers (to tell each file's family); a LoRA's tensors are
read, and mapped onto a model's layers, when a job first uses it, and kept for the next jobs (a few, by
file and model). The base model is never touched: engine/lora.py puts the branches on for one job.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from convert.lora import LoRAFile, LoRAFormatError, lora_family, read_lora
from convert.model import file_sha256
from mlx_sd_server.engine.lora import Adapter, BoundLoRA, component_module, get_layer
from mlx_sd_server.engine.model_io import TEXT_ENCODERS, LoadedModel, component_kind
from mlx_sd_server.engine.errors import JobError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
LORA_FOLDER = "loras"  # the default LoRA folder, in the model folder
BOUND_CACHE = 4  # LoRAs kept mapped onto a model: a few MB to a few hundred MB each


@dataclass(frozen=True)
class LoRAInfo:
    name: str
    path: Path
    size: int
    modified: float
    family: str | None  # None: the file cannot be used (see `error`)
    error: str | None = None


class LoRALibrary:
    """The LoRAs in one folder (which may not exist yet: then there are none). Thread-safe."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._lock = threading.Lock()
        self._infos: dict[tuple[Path, int, float], LoRAInfo] = {}  # by (path, size, mtime): headers read once
        self._hashes: dict[tuple[Path, int, float], str] = {}
        self._bound: OrderedDict[tuple, BoundLoRA] = OrderedDict()

    def scan(self) -> dict[str, LoRAInfo]:
        """Every .safetensors file in the folder (and its sub-folders), by name; the folder is read each time,
        so LoRAs added while the server runs can be used at once."""
        if self.folder is None or not self.folder.is_dir():
            return {}
        found = {}
        for path in sorted(self.folder.rglob(f"*{SUFFIX}")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(self.folder).parts):
                continue
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime)
            with self._lock:
                info = self._infos.get(key)
            if info is None:
                name = path.relative_to(self.folder).with_suffix("").as_posix()
                try:
                    info = LoRAInfo(name, path, stat.st_size, stat.st_mtime, lora_family(path))
                except (LoRAFormatError, OSError, ValueError) as exc:
                    info = LoRAInfo(name, path, stat.st_size, stat.st_mtime, None, str(exc))
                    log.warning("LoRA folder: %s cannot be used: %s", path, exc)
                with self._lock:
                    self._infos[key] = info
            found[info.name] = info
        return found

    def available(self) -> list[LoRAInfo]:
        """The LoRAs a request can name."""
        return [info for info in self.scan().values() if info.family is not None]

    def info(self, name: str) -> LoRAInfo:
        """The LoRA called `name`, usable; a JobError (400) naming what is wrong otherwise."""
        infos = self.scan()
        info = infos.get(name)
        if info is None:
            usable = sorted(n for n, i in infos.items() if i.family is not None)
            where = f"in {self.folder}" if self.folder else "(no LoRA folder)"
            listing = f"; there are: {', '.join(usable[:20])}" if usable else "; there are none"
            raise JobError(f"no LoRA named {name!r} {where}{listing}", "loras", "lora_not_found")
        if info.family is None:
            raise JobError(f"LoRA {name!r} cannot be used: {info.error}", "loras", "invalid_lora")
        return info

    def family(self, name: str) -> str:
        return self.info(name).family

    def short_hash(self, name: str) -> str:
        """A1111's `Lora hashes` value: the first 12 hex digits of the file's sha256 (kept per file version)."""
        info = self.info(name)
        key = (info.path, info.size, info.modified)
        with self._lock:
            digest = self._hashes.get(key)
        if digest is None:
            digest = file_sha256(info.path)[:12]
            with self._lock:
                self._hashes[key] = digest
        return digest

    def bound(self, name: str, model: LoadedModel) -> BoundLoRA:
        """LoRA `name` mapped onto `model`'s layers (weight 1), read and kept on first use."""
        info = self.info(name)
        key = (info.path, info.size, info.modified, model.folder)  # adapters hold arrays, not layers
        with self._lock:
            if key in self._bound:
                self._bound.move_to_end(key)
                return self._bound[key]
        try:
            lora = read_lora(info.path)
        except (LoRAFormatError, OSError, ValueError) as exc:
            raise JobError(f"LoRA {name!r} cannot be used: {exc}", "loras", "invalid_lora") from None
        bound = bind(lora, model, name)
        log.info("LoRA %s: %d layers of %s", name, sum(len(layers) for layers in bound.values()),
                 model.manifest.get("name", model.folder.name))
        with self._lock:
            self._bound[key] = bound
            while len(self._bound) > BOUND_CACHE:
                self._bound.popitem(last=False)
        return bound


def bind(lora: LoRAFile, model: LoadedModel, name: str) -> BoundLoRA:
    """A LoRA in diffusers layout as branches on our layers. Each factor goes through its component's weight
    mapper, as a weight of that layer would: a conv's `down` is a kernel (to OHWI), SD1's 1x1-conv proj_in
    a matrix, CLIP's container prefixes go. Every layer must exist and fit, or the LoRA is refused."""
    model_name = model.manifest.get("name", model.folder.name)
    bound: BoundLoRA = {}
    for component, layers in lora.layers.items():
        entry = model.manifest["components"].get(component)
        if entry is None and component in TEXT_ENCODERS:  # an SD3 model converted without T5: nothing to adapt
            log.info("LoRA %s: %s has no %s, so that part of the LoRA has nothing to adapt", name, model_name,
                     component)
            continue
        if entry is None:
            raise JobError(f"LoRA {name!r} adapts a {component}, which {model_name} does not have", "loras",
                           "lora_mismatch")
        mapper = component_kind(component, entry["config"]).mapper
        root = component_module(model, component)
        bound[component] = {}
        for path, layer in layers.items():
            (key, down), = mapper(f"{path}.weight", layer.down)
            (_, up), = mapper(f"{path}.weight", layer.up)
            ours = key.removesuffix(".weight")
            adapter = Adapter(mx.array(down), mx.array(up.reshape(up.shape[0], -1)), layer.scale)
            _check_fits(adapter, root, ours, f"LoRA {name!r} does not fit {model_name}: {component}.{path}")
            bound[component][ours] = adapter
    return bound


def _check_fits(adapter: Adapter, root: nn.Module, path: str, what: str) -> None:
    try:
        layer = get_layer(root, path)
    except (KeyError, IndexError, ValueError, AttributeError):
        raise JobError(f"{what}: the model has no such layer", "loras", "lora_mismatch") from None
    if isinstance(layer, nn.QuantizedLinear):  # packed: its sizes are in the scales
        out_dims, in_shape = layer.scales.shape[0], (layer.scales.shape[1] * layer.group_size,)
    elif isinstance(layer, nn.Linear):
        out_dims, in_shape = layer.weight.shape[0], (layer.weight.shape[1],)
    elif isinstance(layer, nn.Conv2d):  # OHWI: the down conv has the base's kernel size
        out_dims, in_shape = layer.weight.shape[0], tuple(layer.weight.shape[1:])
    else:
        raise JobError(f"{what}: a {type(layer).__name__} takes no LoRA", "loras", "lora_mismatch")
    if tuple(adapter.down.shape[1:]) != in_shape or tuple(adapter.up.shape) != (out_dims, adapter.down.shape[0]):
        raise JobError(f"{what}: factors {tuple(adapter.up.shape)} x {tuple(adapter.down.shape)} do not fit a layer "
                       f"of {out_dims} x {in_shape}", "loras", "lora_mismatch")
