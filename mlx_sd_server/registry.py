"""Which models this server can serve, by name, and loading them on demand.

A model spec (from `--model`) is one of: a name in the model directory; a path to a converted folder; a
diffusers folder or single-file checkpoint (converted into the model directory on first use); a Hugging
Face repo id (pulled on first use); or the built-in `tiny-random-sd` (random weights, for testing clients).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from convert.model import SplitFiles, convert_model
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.spec import Capabilities, ModelDefaults
from mlx_sd_server.engine.model_io import MANIFEST, ModelFormatError, read_manifest
from mlx_sd_server.lora.library import LORA_FOLDER, LoRALibrary
from mlx_sd_server.paths import model_dir
from mlx_sd_server.torch_engine import capabilities as torch_capabilities

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-random-sd"
# Model names OpenAI clients send. A request naming one is served by the default model (as is any unknown
# name while only one model is served, since the reference ignores the field), unless names are strict.
OPENAI_MODEL_ALIASES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")


class ModelNotFoundError(LookupError):
    """No model of that name is servable here."""


class ModelLoadError(RuntimeError):
    """A model exists but could not be loaded (corrupt files, out of memory, missing dependency)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    created: int
    defaults: ModelDefaults
    has_controlnet: bool
    folder: Path
    capabilities: Capabilities
    random_weights: bool = False  # the built-in test model: it draws noise


class Pipeline(Protocol):
    def total_steps(self, job: Any) -> int: ...
    def generate(self, job: Any) -> Any: ...


def resolve_spec(spec: str | SplitFiles, models: Path) -> Path:
    """A model spec -> a converted folder, converting or pulling it first if needed. Conversions of files
    are cached in the model directory under the file's name, so the next start loads them at once."""
    if isinstance(spec, SplitFiles):
        return _converted(spec, spec.diffusion_model, models)
    if spec == TINY_MODEL_NAME:
        from mlx_sd_server.engine.tiny import ensure_tiny_model

        return ensure_tiny_model(models / TINY_MODEL_NAME)
    if (models / spec / MANIFEST).exists():
        return models / spec
    path = Path(spec).expanduser()
    if (path / MANIFEST).exists():
        return path
    if path.exists():
        return _converted(path, path, models)
    if "/" in spec and not spec.startswith((".", "/", "~")):
        from convert.pull import main as pull

        if pull(
            argparse.Namespace(
                repo_id=spec, model_dir=str(models), dtype="float16", quantize=None, name=None, no_t5=False
            )
        ):
            raise ModelNotFoundError(f"could not pull {spec} (see the log above)")
        from convert.pull import name_for

        return models / name_for(spec)
    raise ModelNotFoundError(f"model {spec!r} not found: not in {models}, not a path, not a Hugging Face id")


def is_random(folder: Path) -> bool:
    """The built-in test model (random weights), by its manifest or its name."""
    if folder.name == TINY_MODEL_NAME:
        return True
    try:
        return bool(read_manifest(folder).get("random_weights"))
    except (OSError, ValueError, ModelFormatError):
        return False


def installed_models(models: Path) -> list[Path]:
    """The converted models in the model directory, newest first (by when their manifest was written), the
    built-in random-weights model left out."""
    found = [p for p in models.glob("*") if not p.name.startswith(".") and (p / MANIFEST).exists()]
    return sorted(
        (p for p in found if not is_random(p)), key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name), reverse=True
    )


def _converted(source: Path | SplitFiles, main_file: Path, models: Path) -> Path:
    dst = models / main_file.stem.lower()
    if not (dst / MANIFEST).exists():
        log.info("converting %s into %s (first use; later starts load it from there)", main_file, dst)
        convert_model(source, dst, progress=False)
    return dst


def read_info(folder: Path, control_net: Path | None = None, engine: str = "mlx") -> ModelInfo:
    """The model's name, defaults and capabilities; the torch engine's narrower ones when it serves the
    model (with "auto", MLX serves it unless it cannot load it, and the fallback refuses what it cannot do
    when the job runs)."""
    manifest = read_manifest(folder)
    defaults = ModelDefaults(**manifest.get("defaults", {}))
    attached = control_net is not None or "controlnet" in manifest["components"]
    can_do = capabilities(manifest, attached)
    if engine == "torch":
        can_do = torch_capabilities(manifest, can_do)
    if control_net is not None and not can_do.controlnet:
        raise ModelFormatError(
            f"--control-net: {manifest['family']} models take no ControlNet "
            f"({folder.name} cannot use {control_net.name})"
        )
    return ModelInfo(
        name=manifest.get("name", folder.name),
        family=manifest["family"],
        created=int((folder / MANIFEST).stat().st_mtime),
        defaults=defaults,
        has_controlnet=can_do.controlnet,
        folder=folder,
        capabilities=can_do,
        random_weights=bool(manifest.get("random_weights")),
    )


# Machines with this much memory or less (a base 8 GB Mac) get the low-memory mode unless told otherwise.
LOW_MEMORY_MACHINE = 8 * 2**30


def physical_memory() -> int:
    """Bytes of RAM (Linux and macOS)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelRegistry:
    """The servable models. `pipeline()` loads on demand and keeps the `max_loaded` most recent in memory."""

    def __init__(
        self,
        specs: list[str | SplitFiles],
        models: Path,
        *,
        control_net: str | None = None,
        dtype: str | None = None,
        engine: str = "mlx",
        max_loaded: int = 1,
        low_memory: bool | None = None,
        model_name: str | None = None,
        strict_model_names: bool = False,
        lora_dir: str | os.PathLike | None = None,
        lora_fuse_budget: int = 0,
    ):
        """`model_name` renames the default (first) model, as the reference's --model-name; with
        `strict_model_names` a request must name a served model exactly (see `resolve`). LoRAs come from
        `lora_dir`, default the `loras` folder in the model folder; a job's LoRAs are fused into copies of the
        float layers they adapt up to `lora_fuse_budget` bytes of weights (never in low-memory mode), side
        branches elsewhere (engine/adapters.py)."""
        self.loras = LoRALibrary(Path(lora_dir).expanduser() if lora_dir else models / LORA_FOLDER)
        self.lora_fuse_budget = lora_fuse_budget
        self.dtype = dtype
        self.low_memory = low_memory if low_memory is not None else physical_memory() <= LOW_MEMORY_MACHINE
        if self.low_memory:
            log.info(
                "low-memory mode: text encoders freed after each job's prompts, large images decoded in tiles "
                "(%.0f GB of memory)",
                physical_memory() / 2**30,
            )
        self.engine = engine
        self.max_loaded = max_loaded
        self.strict_model_names = strict_model_names
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, Pipeline] = OrderedDict()
        if not specs:
            specs = [folder.name for folder in installed_models(models)]
            if specs:
                log.info(
                    "default model: %s, the most recently converted of %s (choose with --model NAME)", specs[0], models
                )
            else:
                log.warning(
                    "no models in %s: serving the built-in %s (random weights, it draws noise). "
                    "Get a real one with: mlx-sd-server pull stabilityai/sd-turbo",
                    models,
                    TINY_MODEL_NAME,
                )
                specs = [TINY_MODEL_NAME]
        folders = [resolve_spec(spec, models) for spec in specs]
        control_folder = resolve_spec(control_net, models) if control_net else None
        self._infos: dict[str, ModelInfo] = {}
        self._control: dict[str, Path] = {}
        for i, folder in enumerate(folders):
            attached = control_folder if i == 0 else None  # --control-net attaches to the default model
            info = read_info(folder, attached, engine)
            if i == 0 and model_name:
                info = dataclasses.replace(info, name=model_name)
            if i == 0:
                self.default_name = info.name
            self._infos[info.name] = info
            if attached:
                self._control[info.name] = attached

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str | None = None) -> ModelInfo:
        try:
            return self._infos[name or self.default_name]
        except KeyError:
            raise ModelNotFoundError(f"model {name!r} not found; this server has: {', '.join(self._infos)}") from None

    def resolve(self, requested: str | None) -> ModelInfo:
        """The model that serves a request's `model`: that model; else, unless names are strict, the
        default for an OpenAI model name or for any name while only one model is served; else 404."""
        unknown = requested and requested not in self._infos and not self.strict_model_names
        if unknown and (requested in OPENAI_MODEL_ALIASES or len(self._infos) == 1):
            log.info(
                "model %r is not served here: the default model %s serves the request", requested, self.default_name
            )
            return self.info()
        return self.info(requested)

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def pipeline(self, name: str | None = None) -> Pipeline:
        """The model's pipeline, loading it (blocking) if needed. Call from the worker thread."""
        info = self.info(name)
        with self._lock:
            if info.name in self._loaded:
                self._loaded.move_to_end(info.name)
                return self._loaded[info.name]
            while len(self._loaded) >= self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("unloaded %s to make room", evicted)
            try:
                pipeline = self._load(info)
            except (OSError, ValueError, ModelFormatError, MemoryError, ImportError) as exc:
                raise ModelLoadError(f"could not load {info.name}: {exc}") from exc
            self._loaded[info.name] = pipeline
            return pipeline

    def _load(self, info: ModelInfo) -> Pipeline:
        """MLX, or the diffusers/torch fallback when asked for, or ("auto") when MLX cannot load the model."""
        control = self._control.get(info.name)
        if self.engine != "torch":
            try:
                from mlx_sd_server.engine.model_io import load_model
                from mlx_sd_server.engine.pipeline import DiffusionPipeline

                pipeline = DiffusionPipeline(
                    load_model(info.folder, dtype=self.dtype, controlnet=control, low_memory=self.low_memory),
                    loras=self.loras.bound,
                    lora_fuse_budget=0 if self.low_memory else self.lora_fuse_budget,
                )
                log.info("engine: MLX for %s", info.name)
                return pipeline
            except (ImportError, RuntimeError, MemoryError, ValueError) as exc:
                if self.engine != "auto":
                    raise
                log.warning("MLX cannot load %s (%s): falling back to diffusers/torch", info.name, exc)
        from mlx_sd_server.torch_engine import TorchPipeline

        log.info("engine: diffusers/torch for %s", info.name)
        return TorchPipeline.from_folder(info.folder, control_net=control, dtype=self.dtype)


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} GB"  # not reached


def _precision(manifest: dict[str, Any]) -> str:
    quantization = manifest.get("quantization")
    bits = f" q{quantization['bits']}" if quantization else ""
    return f"{manifest.get('dtype', '?')}{bits}"


def _source(manifest: dict[str, Any]) -> str:
    source = manifest.get("source")
    if not isinstance(source, dict):
        return "-"
    when = str(source.get("converted", ""))[:10]
    return f"{source.get('from', '?')}" + (f" ({when})" if when else "")


def print_models(args: argparse.Namespace) -> int:
    """`mlx-sd-server models`: a table of the installed models, newest first (the first is what `serve` picks
    without --model), then the built-in random-weights model, then where they live."""
    models = model_dir(args.model_dir)
    rows = [("NAME", "FAMILY", "SIZE", "DTYPE", "SOURCE")]
    for folder in installed_models(models):
        try:
            manifest = read_manifest(folder)
        except (OSError, ValueError, ModelFormatError) as exc:
            rows.append((folder.name, "?", human_size(disk_size(folder)), "?", f"unreadable: {exc}"))
            continue
        rows.append(
            (
                folder.name,
                manifest.get("family", "?"),
                human_size(disk_size(folder)),
                _precision(manifest),
                _source(manifest),
            )
        )
    rows.append((TINY_MODEL_NAME, "sd1", "-", "float32", "built in: RANDOM WEIGHTS, draws noise (for testing clients)"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    print(f"# model directory: {models}", file=sys.stderr)
    return 0


def remove_model(args: argparse.Namespace) -> int:
    """`mlx-sd-server rm NAME`: delete a model's folder from the model directory."""
    models = model_dir(args.model_dir)
    name = args.name
    if name == TINY_MODEL_NAME:
        print(
            f"mlx-sd-server rm: {TINY_MODEL_NAME} is built in (it is rebuilt when asked for); nothing to remove",
            file=sys.stderr,
        )
        return 1
    folder = models / name
    if name in ("", ".", "..") or Path(name).name != name or not (folder / MANIFEST).exists():
        known = ", ".join(p.name for p in installed_models(models)) or "none"
        print(f"mlx-sd-server rm: no model named {name!r} in {models} (installed: {known})", file=sys.stderr)
        return 1
    size = disk_size(folder)
    shutil.rmtree(folder)
    print(f"removed {name} ({human_size(size)} freed)")
    return 0
