"""The LoRA folder (`--lora-model-dir`): the LoRAs a request may name, and LoRAs bound to a loaded model.

A LoRA's name is its path in the folder without `.safetensors` (`detail` or `styles/ink`), as in A1111's
`<lora:name:weight>`. Listing reads only file headers (to tell each file's family); a LoRA's tensors are
read (formats.py), and mapped onto a model's layers (bind.py), when a job first uses it, and kept for the
next jobs (a few, by file and model). The base model is never touched: the pipeline puts the branches on
for one job (engine/adapters.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from convert.model import file_sha256
from mlx_sd_server.engine.adapters import Adapters
from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.model_io import LoadedModel
from mlx_sd_server.lora.bind import bind
from mlx_sd_server.lora.formats import LoRAFormatError, lora_family, read_lora
from mlx_sd_server.paths import without_paths

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
        self._bound: OrderedDict[tuple, Adapters] = OrderedDict()

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
            where = "in the LoRA folder" if self.folder else "(no LoRA folder)"  # its path is the server's own
            listing = f"; there are: {', '.join(usable[:20])}" if usable else "; there are none"
            raise JobError(f"no LoRA named {name!r} {where}{listing}", "loras", "lora_not_found")
        if info.family is None:
            raise JobError(
                f"LoRA {name!r} cannot be used: {self._public(info.error or '', info)}", "loras", "invalid_lora"
            )
        return info

    def _public(self, reason: str, info: LoRAInfo) -> str:
        """Why a LoRA cannot be used, for a client: the file named by its place in the LoRA folder
        (`styles/ink.safetensors`), and no other absolute path (the log has them)."""
        reason = reason.replace(str(info.path), f"{info.name}{SUFFIX}")
        if self.folder is not None:
            reason = reason.replace(str(self.folder), "the LoRA folder")
        return without_paths(reason)

    def family(self, name: str) -> str:
        family = self.info(name).family
        assert family is not None  # (info refuses the LoRAs that have none)
        return family

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

    def bound(self, name: str, model: LoadedModel) -> Adapters:
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
            log.warning("LoRA %s (%s) cannot be used: %s", name, info.path, exc)
            raise JobError(
                f"LoRA {name!r} cannot be used: {self._public(str(exc), info)}", "loras", "invalid_lora"
            ) from None
        bound = bind(lora, model, name)
        log.info(
            "LoRA %s: %d layers of %s",
            name,
            sum(len(layers) for layers in bound.values()),
            model.manifest.get("name", model.folder.name),
        )
        with self._lock:
            self._bound[key] = bound
            while len(self._bound) > BOUND_CACHE:
                self._bound.popitem(last=False)
        return bound
