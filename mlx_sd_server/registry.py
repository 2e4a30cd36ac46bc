"""Which models this server can serve, by name, and loading them on demand.

A model spec (from `--model`) is one of: a name in the model directory; a path to a converted folder; a
diffusers folder or single-file checkpoint (converted into the model directory on first use); a Hugging
Face repo id (pulled on first use); or the built-in `tiny-random-sd` (random weights, for testing clients).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from convert.model import SplitFiles, convert_model
from mlx_sd_server.client import NoServerError, ServerError, model_path, server_from
from mlx_sd_server.engine.errors import JobError, shown
from mlx_sd_server.engine.families import capabilities, spec_for
from mlx_sd_server.engine.families.spec import Capabilities, ModelDefaults
from mlx_sd_server.engine.model_io import CONVERTING, MANIFEST, ModelFormatError, read_manifest
from mlx_sd_server.job import Job
from mlx_sd_server.lora.library import LORA_FOLDER, LoRALibrary
from mlx_sd_server.paths import CONTROLNET_FOLDER, model_dir
from mlx_sd_server.residency import CONTROLNET, MODEL, ModelTooLargeError, Residency, gigabytes
from mlx_sd_server.torch_engine import capabilities as torch_capabilities
from mlx_sd_server.upscale.library import UPSCALER_FOLDER, UpscalerLibrary

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
    def memory_bytes(self) -> int: ...


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
    if (models / CONTROLNET_FOLDER / spec / MANIFEST).exists():  # a ControlNet by name (--control-net NAME)
        return models / CONTROLNET_FOLDER / spec
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

        return resolve_spec(name_for(spec), models)  # a model, or a ControlNet (in controlnets/)
    raise ModelNotFoundError(f"model {spec!r} not found: not in {models}, not a path, not a Hugging Face id")


def is_random(folder: Path) -> bool:
    """The built-in test model (random weights), by its manifest or its name."""
    return folder.name == TINY_MODEL_NAME or _kind(folder) == "random"


def _manifest_time(folder: Path) -> int | None:
    try:
        return (folder / MANIFEST).stat().st_mtime_ns
    except OSError:
        return None


@functools.lru_cache(maxsize=1024)
def _kind_at(folder: Path, mtime: int) -> str:
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError, ModelFormatError):
        return "unreadable"
    if manifest.get("random_weights"):
        return "random"
    return "controlnet" if manifest.get("family") == "controlnet" else "model"


def _kind(folder: Path) -> str:
    """model, controlnet (a lone one), random (the built-in model), unreadable; gone: no manifest (any more)."""
    mtime = _manifest_time(folder)
    return "gone" if mtime is None else _kind_at(folder, mtime)


def installed_models(models: Path) -> list[Path]:
    """The converted models in the model directory, newest first (by when their manifest was written), the
    built-in random-weights model and lone ControlNets left out."""
    found = [
        (mtime, p.name, p)
        for p in models.glob("*")
        if not p.name.startswith(".") and (mtime := _manifest_time(p)) is not None and not is_random(p)
    ]
    return [p for _, _, p in sorted(found, reverse=True) if _kind(p) in ("model", "unreadable")]


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
# --max-memory's default share of physical memory. macOS lets the GPU hold about 75% of unified memory
# (Metal's recommendedMaxWorkingSetSize); weights up to 60% leave the rest of that, 15% of memory, for a
# job's activations (an SDXL 1024x1024 decode peaks near 3 GB on a 24 GB Mac), and a quarter of it for
# macOS and the user's other applications.
DEFAULT_MEMORY_SHARE = 0.6
DEFAULT_KEEP_ALIVE = 300.0  # seconds, as Ollama's default


def physical_memory() -> int:
    """Bytes of RAM (Linux and macOS)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelBusyError(RuntimeError):
    """The model is being converted into the model directory right now (HTTP 409)."""


@dataclass(frozen=True)
class ControlNetInfo:
    name: str
    family: str  # the base models it fits: sd1, sd2 or sdxl
    folder: Path
    created: int
    config: dict[str, Any]


def controlnet_family(config: Mapping[str, Any]) -> str:
    """The SD family a ControlNet's config was made for: SDXL's take its added time embedding; SD 2.x's
    attend to OpenCLIP-H's 1024 channels, SD 1.x's to CLIP-L's 768."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


def read_controlnet(folder: Path) -> ControlNetInfo | None:
    """A converted lone ControlNet's name and family; None when the folder holds something else."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError, ModelFormatError):
        return None
    entry = manifest.get("components", {}).get("controlnet")
    if manifest.get("family") != "controlnet" or entry is None:
        return None
    config = entry["config"]
    created = int((folder / MANIFEST).stat().st_mtime)
    return ControlNetInfo(manifest.get("name", folder.name), controlnet_family(config), folder, created, config)


def installed_controlnets(models: Path) -> list[ControlNetInfo]:
    """The converted ControlNets: in `controlnets/`, then (converted before it existed) in the model directory."""
    found: dict[str, ControlNetInfo] = {}
    for folder in [*sorted((models / CONTROLNET_FOLDER).glob("*")), *sorted(models.glob("*"))]:
        if not folder.name.startswith(".") and _kind(folder) == "controlnet":
            info = read_controlnet(folder)
            if info is not None:
                found.setdefault(info.name, info)
    return list(found.values())


def converting(models: Path, name: str) -> bool:
    """Whether a live process is converting a model of this name into the model directory."""
    for work in models.glob(f".{name}.partial-*"):
        try:
            pid = int((work / CONVERTING).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue  # no pid file, or its process is gone: a crashed conversion's leftovers
        return True
    return False


@dataclass(frozen=True)
class ModelStatus:
    """Whether a model is in memory, and for how long."""

    loaded: bool
    memory_bytes: int | None = None  # its weights, when loaded
    expires_at: float | None = None  # when its keep-alive ends (time.time()); None: in use, kept, or not loaded
    in_use: bool = False
    keep_alive: float | None = None  # seconds after its last job (math.inf: kept), when loaded


class ModelRegistry:
    """The servable models: those in the model directory as it is now (a model converted while the server
    runs is served at once; one removed stops being listed and leaves memory), plus models given by path.
    `acquire(job)` loads a job's model (and ControlNet) within the memory budget; `release(job)` starts its
    keep-alive. Loading and unloading happen on the worker thread only."""

    def __init__(
        self,
        specs: list[str | SplitFiles],
        models: Path,
        *,
        control_net: str | None = None,
        dtype: str | None = None,
        engine: str = "mlx",
        max_memory: int | None = None,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        low_memory: bool | None = None,
        model_name: str | None = None,
        strict_model_names: bool = False,
        lora_dir: str | os.PathLike | None = None,
        lora_fuse_budget: int = 0,
    ):
        """`specs`: the models given at start (`--model`), the first the default; none: the most recently
        converted in `models`, else the built-in random-weights model. `model_name` renames the default, as the
        reference's --model-name; with `strict_model_names` a request must name a served model exactly (see
        `resolve`). `control_net` (--control-net) is the default model's ControlNet. `max_memory`: bytes the
        loaded models may take (default DEFAULT_MEMORY_SHARE of physical memory); `keep_alive`: seconds a model
        stays loaded after its last job (math.inf: until evicted). LoRAs come from `lora_dir`, default the
        `loras` folder in the model folder; a job's LoRAs are fused into copies of the float layers they adapt
        up to `lora_fuse_budget` bytes of weights (never in low-memory mode), side branches elsewhere."""
        self.models = models
        self.loras = LoRALibrary(Path(lora_dir).expanduser() if lora_dir else models / LORA_FOLDER)
        self.upscalers = UpscalerLibrary(models / UPSCALER_FOLDER)
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
        self.strict_model_names = strict_model_names
        budget = max_memory if max_memory is not None else int(physical_memory() * DEFAULT_MEMORY_SHARE)
        self.residency = Residency(budget, keep_alive)
        self._lock = threading.Lock()
        self._read_cache: dict[Path, tuple[int, ModelInfo | None]] = {}  # folder -> (manifest mtime, info)
        if not specs:
            specs = [folder.name for folder in installed_models(models)[:1]]
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
        # Models outside the model directory (a path, the built-in one) are served beside its models.
        self._pinned = [folder for folder in folders if folder.parent != models or is_random(folder)]
        self._default_folder = folders[0]
        self._renamed = {folders[0]: model_name} if model_name else {}
        self._control: dict[str, str] = {}  # model name -> its ControlNet by default (--control-net)
        self._pinned_controlnets: dict[str, ControlNetInfo] = {}
        first = self._read(folders[0])
        if first is None:
            raise ModelFormatError(f"{folders[0]} is not a model this server can serve")
        self.start_default = first.name
        if control_net:
            control = read_controlnet(resolve_spec(control_net, models))
            if control is None:
                raise ModelFormatError(f"--control-net: {control_net} is not a converted ControlNet")
            self.check_controlnet_fits(first, control, option="--control-net")
            self._pinned_controlnets[control.name] = control
            self._control[first.name] = control.name

    # --- the catalogue ---------------------------------------------------------------------------------

    def _read(self, folder: Path) -> ModelInfo | None:
        """The model's info, read once per version of its manifest; None for a ControlNet or a broken folder."""
        try:
            mtime = (folder / MANIFEST).stat().st_mtime_ns
        except OSError:
            return None
        cached = self._read_cache.get(folder)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        info: ModelInfo | None = None
        try:
            if read_manifest(folder).get("family") != "controlnet":
                info = read_info(folder, None, self.engine)
                if folder in self._renamed:
                    info = dataclasses.replace(info, name=self._renamed[folder])
        except (OSError, ValueError, KeyError, TypeError, ModelFormatError) as exc:
            log.warning("%s is not servable: %s", folder, exc)
        self._read_cache[folder] = (mtime, info)
        return info

    def _catalogue(self) -> dict[str, ModelInfo]:
        """Name -> info of every servable model, now: the pinned first, then the model directory's, newest first."""
        with self._lock:
            found: dict[str, ModelInfo] = {}
            for folder in [*self._pinned, *installed_models(self.models)]:
                info = self._read(folder)
                if info is not None and info.name in self._control:  # --control-net: its ControlNet by default
                    info = dataclasses.replace(
                        info, has_controlnet=True, capabilities=dataclasses.replace(info.capabilities, controlnet=True)
                    )
                if info is not None:
                    found.setdefault(info.name, info)
            return found

    @property
    def default_name(self) -> str:
        """The default model: the one chosen at start while it is servable, else the newest converted one."""
        catalogue = self._catalogue()
        if self.start_default in catalogue or not catalogue:
            return self.start_default
        return next(iter(catalogue))

    def set_default(self, name: str) -> None:
        """Make a served model the default (A1111's `sd_model_checkpoint`): requests naming none get it."""
        self.start_default = self.info(name).name

    def names(self) -> list[str]:
        return list(self._catalogue())

    def info(self, name: str | None = None) -> ModelInfo:
        catalogue = self._catalogue()
        name = name or self.default_name
        info = catalogue.get(name)
        if info is not None:
            return info
        if self._converting(name):
            raise ModelBusyError(f"model {name!r} is being converted; send the request again when it is done")
        raise ModelNotFoundError(f"model {name!r} not found; this server has: {', '.join(catalogue)}")

    def _converting(self, name: str) -> bool:
        return Path(name).name == name and converting(self.models, name)

    def resolve(self, requested: str | None) -> ModelInfo:
        """The model that serves a request's `model`: that model; else, unless names are strict, the
        default for an OpenAI model name or for any name while only one model is served; else 404."""
        catalogue = self._catalogue()
        unknown = requested and requested not in catalogue and not self.strict_model_names
        if unknown and requested and self._converting(requested):  # (not served by the default: it is coming)
            return self.info(requested)
        if unknown and (requested in OPENAI_MODEL_ALIASES or len(catalogue) == 1):
            default = self.default_name
            log.info("model %r is not served here: the default model %s serves the request", requested, default)
            return self.info(default)
        return self.info(requested)

    def size_bytes(self, name: str) -> int:
        return disk_size(self.info(name).folder)

    def status(self, name: str) -> ModelStatus:
        resident = self.residency.get((MODEL, name))
        if resident is None:
            return ModelStatus(False)
        return ModelStatus(True, resident.memory_bytes, resident.expires_at, resident.users > 0, resident.keep_alive)

    def memory(self) -> dict[str, int]:
        """The memory budget (--max-memory) and what the loaded models and ControlNets take of it, in bytes."""
        return {"budget_bytes": self.residency.budget, "used_bytes": self.residency.used_bytes()}

    def controlnet_status(self, name: str) -> ModelStatus:
        resident = self.residency.get((CONTROLNET, name))
        if resident is None:
            return ModelStatus(False)
        return ModelStatus(True, resident.memory_bytes, resident.expires_at, resident.users > 0, resident.keep_alive)

    def loaded(self) -> list[str]:
        return [resident.key[1] for resident in self.residency.loaded(MODEL)]

    # --- ControlNets -----------------------------------------------------------------------------------

    def controlnets(self) -> list[ControlNetInfo]:
        found = {info.name: info for info in installed_controlnets(self.models)}
        return [*self._pinned_controlnets.values(), *(i for n, i in found.items() if n not in self._pinned_controlnets)]

    def controlnet(self, name: str) -> ControlNetInfo:
        for info in self.controlnets():
            if info.name == name:
                return info
        known = ", ".join(info.name for info in self.controlnets()) or "none"
        raise JobError(
            f"ControlNet {shown(name)} not found (GET /v1/controlnets lists them: {known})",
            "control_net",
            "controlnet_not_found",
            404,
        )

    def check_controlnet_fits(self, model: ModelInfo, control: ControlNetInfo, option: str = "control_net") -> None:
        """Refuse a ControlNet made for another family (or width) of model than `model`."""
        if not spec_for(model.family).component("controlnet"):
            raise JobError(
                f"{model.name} is a {model.family} model: it takes no ControlNet", option, "controlnet_unsupported"
            )
        unet = read_manifest(model.folder)["components"]["unet"]["config"]
        same_width = unet.get("block_out_channels") == control.config.get("block_out_channels")
        if control.family != model.family or not same_width:
            fits = f"{control.family} models" + (" of another width" if control.family == model.family else "")
            raise JobError(
                f"ControlNet {control.name} is made for {fits}; {model.name} is a {model.family} model",
                option,
                "controlnet_mismatch",
            )

    def models_using_controlnet(self, name: str) -> list[str]:
        """The models whose ControlNet it is by default (--control-net)."""
        return [model for model, control in self._control.items() if control == name]

    def controlnet_for(self, model: ModelInfo, requested: str | None) -> str | None:
        """The ControlNet a request on `model` uses: the one it names (checked to fit), else the model's own
        from --control-net; None: the one bundled in the model's folder, or none."""
        if requested is None:
            return self._control.get(model.name)
        control = self.controlnet(requested)
        self.check_controlnet_fits(model, control)
        if self.engine == "torch" and self._control.get(model.name) != control.name:
            raise JobError(
                "the torch engine runs a model with the ControlNet given at start (--control-net) only",
                "control_net",
                "controlnet_unsupported",
            )
        return control.name

    # --- loading ---------------------------------------------------------------------------------------

    def acquire(self, job: Any) -> Pipeline:
        """The job's model as a pipeline, with the job's ControlNet attached, loaded (blocking) if needed and
        marked in use until `release(job)`. Call from the worker thread."""
        info = self.info(job.model)
        pipeline = self.residency.acquire((MODEL, info.name), lambda: self._load(info), info.name)
        control = getattr(job, "control_net", None) or self._control.get(info.name)
        try:
            if hasattr(pipeline, "use_controlnet"):  # (MLX: ControlNets are attached per job)
                module = None
                if control is not None:
                    module = self.residency.acquire(
                        (CONTROLNET, control), lambda: self._load_controlnet(control), f"ControlNet {control}"
                    )
                pipeline.use_controlnet(module)
        except BaseException:
            self.residency.release((MODEL, info.name))
            raise
        return pipeline

    def pipeline(self, name: str | None = None) -> Pipeline:
        """A model's pipeline for the caller's own use (the command line, tests): loaded if needed, its
        keep-alive started at once."""
        job = Job(prompt="", model=name or self.default_name)
        pipeline = self.acquire(job)
        self.release(job)
        return pipeline

    def release(self, job: Any) -> None:
        """The job is done with its model (and ControlNet): their keep-alive (the job's, else the server's) starts."""
        keep_alive = getattr(job, "keep_alive", None)
        name = job.model or self.default_name
        self.residency.release((MODEL, name), keep_alive)
        control = getattr(job, "control_net", None) or self._control.get(name)
        if control is not None:
            self.residency.release((CONTROLNET, control), keep_alive)

    def load(self, name: str, keep_alive: float | None = None) -> ModelStatus:
        """Load a model's weights into memory now (POST /v1/models/{id}/load), its keep-alive starting now."""
        info = self.info(name)
        pipeline = self.residency.acquire((MODEL, info.name), lambda: self._load(info), info.name)
        try:
            if hasattr(pipeline, "materialize"):
                pipeline.materialize()
        finally:
            self.residency.release((MODEL, info.name), keep_alive)
        return self.status(info.name)

    def unload(self, name: str, reason: str = "asked to unload") -> bool:
        """Unload a model now (or when its running job ends). False: it was not loaded."""
        return self.residency.unload((MODEL, name), reason)

    def expire(self) -> None:
        """Unload what has been idle past its keep-alive, and what was removed from the model directory."""
        if not self.residency.loaded(MODEL) and not self.residency.loaded(CONTROLNET):
            return
        catalogue = self._catalogue()
        controlnets = {info.name for info in self.controlnets()}

        def gone(key: tuple[str, str]) -> bool:
            return key[1] not in (catalogue if key[0] == MODEL else controlnets)

        self.residency.expire(gone)

    def next_expiry(self) -> float | None:
        return self.residency.next_expiry()

    def _load(self, info: ModelInfo) -> tuple[Pipeline, int]:
        """MLX, or the diffusers/torch fallback when asked for, or ("auto") when MLX cannot load the model;
        with the bytes of its weights."""
        try:
            return self._load_engine(info)
        except (OSError, ValueError, ModelFormatError, MemoryError, ImportError) as exc:
            if isinstance(exc, ModelTooLargeError):
                raise
            raise ModelLoadError(f"could not load {info.name}: {exc}") from exc

    def _load_engine(self, info: ModelInfo) -> tuple[Pipeline, int]:
        if self.engine != "torch":
            try:
                from mlx_sd_server.engine.model_io import load_model
                from mlx_sd_server.engine.pipeline import DiffusionPipeline

                mlx = DiffusionPipeline(
                    load_model(info.folder, dtype=self.dtype, low_memory=self.low_memory),
                    loras=self.loras.bound,
                    lora_fuse_budget=0 if self.low_memory else self.lora_fuse_budget,
                    upscale=self.upscalers.upscale,
                )
                log.info("engine: MLX for %s", info.name)
                return mlx, mlx.memory_bytes()
            except (ImportError, RuntimeError, MemoryError, ValueError) as exc:
                if self.engine != "auto":
                    raise
                log.warning("MLX cannot load %s (%s): falling back to diffusers/torch", info.name, exc)
        from mlx_sd_server.torch_engine import TorchPipeline

        estimate = torch_estimate(info.folder, self.dtype)
        if estimate > self.residency.budget:  # refused before torch allocates it
            raise ModelTooLargeError(
                f"{info.name} needs about {gigabytes(estimate)} of memory under the torch engine, more than the whole "
                f"budget of {gigabytes(self.residency.budget)} (--max-memory)",
                estimate,
                self.residency.budget,
            )
        control = self._control.get(info.name)
        folder = self.controlnet(control).folder if control else None
        log.info("engine: diffusers/torch for %s", info.name)
        torch = TorchPipeline.from_folder(info.folder, control_net=folder, dtype=self.dtype)
        return torch, torch.memory_bytes()

    def _load_controlnet(self, name: str) -> tuple[Any, int]:
        from mlx_sd_server.engine.model_io import load_controlnet, module_bytes

        module = load_controlnet(self.controlnet(name).folder, self.dtype)
        return module, module_bytes(module)


def torch_estimate(folder: Path, dtype: str | None) -> int:
    """The torch engine's memory for a converted folder, before loading it: its weight files, scaled from the
    dtype they are stored in to the one they run in (float32 on the CPU unless told)."""
    manifest = read_manifest(folder)
    stored = 4 if manifest.get("dtype") == "float32" else 2
    running = 4 if (dtype or "float32") == "float32" else 2
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    return weights * running // stored


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


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, the last one as it is (a SOURCE can be long)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def print_models(args: argparse.Namespace) -> int:
    """`mlx-sd-server models`: a table of the installed models, newest first (the first is what `serve` picks
    without --model), then the built-in random-weights model; then the ControlNets; then where they live."""
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
    print_table(rows)
    controlnets = installed_controlnets(models)
    if controlnets:  # FITS: the family of the models it fits, as GET /v1/controlnets says it
        print()
        print_table(
            [
                ("NAME", "FITS", "SIZE", "SOURCE"),
                *(
                    (
                        info.folder.name,
                        info.family,
                        human_size(disk_size(info.folder)),
                        _source(read_manifest(info.folder)),
                    )
                    for info in controlnets
                ),
            ]
        )
    print(f"# model directory: {models}", file=sys.stderr)
    return 0


def remove_model(args: argparse.Namespace) -> int:
    """`mlx-sd-server rm NAME`: delete a model's folder from the model directory, or a ControlNet's (from
    `controlnets/`, or the model directory where older conversions put them). A running server (`--url`) is
    asked to unload the model first; no server running is no error."""
    models = model_dir(args.model_dir)
    name = args.name
    if name == TINY_MODEL_NAME:
        print(
            f"mlx-sd-server rm: {TINY_MODEL_NAME} is built in (it is rebuilt when asked for); nothing to remove",
            file=sys.stderr,
        )
        return 1
    plain = name not in ("", ".", "..") and Path(name).name == name
    found = [f for f in (models / name, models / CONTROLNET_FOLDER / name) if plain and (f / MANIFEST).exists()]
    if not found:
        known = ", ".join(p.name for p in installed_models(models)) or "none"
        controlnets = ", ".join(info.folder.name for info in installed_controlnets(models)) or "none"
        print(
            f"mlx-sd-server rm: no model named {name!r} in {models} (installed: {known}; ControlNets: {controlnets})",
            file=sys.stderr,
        )
        return 1
    if len(found) > 1:  # (convert and pull never make both)
        print(f"mlx-sd-server rm: {name!r} names both {found[0]} and {found[1]}: remove one by hand", file=sys.stderr)
        return 1
    folder = found[0]
    controlnet = _kind(folder) == "controlnet"
    size = disk_size(folder)
    if controlnet:
        loaded_at = controlnet_loaded_in_server(args, folder)
    else:
        unload_in_server(args, folder)
    shutil.rmtree(folder)
    if controlnet:
        print(f"removed ControlNet {name} from {folder.parent} ({human_size(size)} freed)")
        if loaded_at:  # (there is no endpoint to unload a ControlNet: the server drops those whose files are gone)
            print(f"the server at {loaded_at} had it loaded: it unloads it when idle, its files being gone")
    else:
        print(f"removed {name} ({human_size(size)} freed)")
    return 0


def api_name(folder: Path) -> str:
    """The name a server knows a converted folder by: its manifest's, else the folder's."""
    try:
        return str(read_manifest(folder).get("name", folder.name))
    except (OSError, ValueError, ModelFormatError):
        return folder.name


def unload_in_server(args: argparse.Namespace, folder: Path) -> None:
    """Before `rm` deletes a model: the running server unloads it, if it holds this very model (the same name and
    size on disk; one of the same name from another model directory is left alone). A server that is not
    running is not asked; one that cannot unload it (busy, another key) drops it once it finds the files gone."""
    name = api_name(folder)
    try:
        server = server_from(args)
        model = server.get(model_path(name))
        if not model.get("loaded") or model.get("size_bytes") != disk_size(folder):
            return
        if server.post(model_path(name, "unload")).get("unloaded"):
            print(f"{folder.name} was loaded in the server at {server.url}: unloaded first")
    except NoServerError:
        return
    except ServerError as exc:
        if exc.status != 404:  # (404: that server does not serve it)
            print(
                f"mlx-sd-server rm: {name} was not unloaded first ({exc}); a server that holds it unloads it "
                "once it finds its files gone",
                file=sys.stderr,
            )


def controlnet_loaded_in_server(args: argparse.Namespace, folder: Path) -> str | None:
    """The url of the running server that holds this very ControlNet in memory (same name and size on disk)."""
    name = api_name(folder)
    try:
        server = server_from(args)
        listing = server.get("/v1/controlnets").get("data", [])
    except ServerError:
        return None  # (not running, or not answering us: its own idle check drops what was removed)
    size = disk_size(folder)
    held = any(c.get("id") == name and c.get("loaded") and c.get("size_bytes") == size for c in listing)
    return server.url if held else None


STOP_WAIT = 600.0  # seconds: the server unloads between jobs, so a job running on the model ends first


def print_loaded(args: argparse.Namespace) -> int:
    """`mlx-sd-server ps`: the models the running server holds in memory, as `ollama ps`: how much memory each
    takes and until when it stays (its keep-alive), "kept" (keep_alive -1) or "in use" (a job is running on it)."""
    try:
        server = server_from(args)
        answer = server.get("/v1/models")
    except ServerError as exc:
        print(f"mlx-sd-server ps: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    rows = [("NAME", "FAMILY", "MEMORY", "UNTIL")]
    for model in answer.get("data", []):
        if model.get("loaded"):
            memory = model.get("memory_bytes")
            rows.append(
                (
                    model["id"],
                    model.get("family", "?"),
                    "-" if memory is None else human_size(memory),
                    until(model, now),
                )
            )
    print_table(rows)
    memory = answer.get("memory") or {}
    if "used_bytes" in memory and "budget_bytes" in memory:  # (with loaded ControlNets, beyond the rows' sum)
        used, budget = human_size(memory["used_bytes"]), human_size(memory["budget_bytes"])
        print(f"# {server.url}: {used} of {budget} (--max-memory) in use", file=sys.stderr)
    return 0


def until(model: Mapping[str, Any], now: float) -> str:
    """When a loaded model (as GET /v1/models shows it) leaves memory: "kept" (keep_alive -1), "in use" (no
    keep-alive running: a job holds it), else "in 4 minutes"."""
    if model.get("keep_alive") == -1:
        return "kept"
    expires_at = model.get("expires_at")
    if expires_at is None:
        return "in use"
    return in_time(expires_at - now)


def in_time(seconds: float) -> str:
    """ "in 45 seconds", "in 5 minutes", "in 2 hours", "in 3 days" (the nearest whole unit); "now" when due."""
    if seconds < 0.5:
        return "now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= 1.5 * size:
            count = round(seconds / size)
            return f"in {count} {unit}s"
    count = round(seconds)
    return f"in {count} second" + ("s" if count != 1 else "")


def stop_model(args: argparse.Namespace) -> int:
    """`mlx-sd-server stop NAME`: the running server unloads the model now (after the job running on it)."""
    try:
        server = server_from(args)
        model = server.get(model_path(args.name))
        if model.get("loaded"):
            if until(model, time.time()) == "in use":
                print(f"{args.name} is in use: it unloads when its job ends", file=sys.stderr)
            unloaded = bool(server.post(model_path(args.name, "unload"), timeout=STOP_WAIT).get("unloaded"))
        else:
            unloaded = False
    except ServerError as exc:
        print(f"mlx-sd-server stop: {exc}", file=sys.stderr)
        return 1
    if unloaded:
        memory = model.get("memory_bytes")
        print(f"unloaded {args.name}" + ("" if memory is None else f" ({human_size(memory)} freed)"))
    else:
        print(f"{args.name} was not loaded")
    return 0
