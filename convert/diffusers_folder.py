"""Reading a diffusers pipeline folder (model_index.json + one sub-folder per component)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from convert.source import PickleRefusedError, SourceModel, family_of

log = logging.getLogger(__name__)

WEIGHT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae", "controlnet")
# SD3's T5 (~9.5 GB in float16) is optional: the SD3 pipelines read zeros in its place, and users leave it out.
OPTIONAL_COMPONENTS = ("text_encoder_3",)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").exists() or _is_component_folder(path))


def _is_component_folder(path: Path) -> bool:
    """A lone component folder (e.g. a ControlNet: config.json + weights)."""
    return (path / "config.json").exists()


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of one component folder: safetensors (sharded or not), preferring full precision."""
    for pattern in ("*.safetensors.index.json",):
        for index in sorted(folder.glob(pattern)):
            if ".fp16." in index.name and len(list(folder.glob(pattern))) > 1:
                continue
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        full = [p for p in safetensors if ".fp16." not in p.name]
        return [(full or safetensors)[0]]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise PickleRefusedError(pickles[0])
    if pickles:
        return [pickles[0]]
    raise FileNotFoundError(f"no weights (*.safetensors) in {folder}")


def read_weights(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Key/value pairs as float32 numpy, one file at a time (mx.load reads bfloat16 too)."""
    for path in files:
        if path.suffix == ".safetensors":
            for key, value in mx.load(str(path)).items():
                yield key, np.array(value.astype(mx.float32)) if mx.issubdtype(value.dtype, mx.floating) else np.array(value)
        else:
            from convert.source import read_pickle

            yield from read_pickle(path).items()


def read_diffusers_folder(path: Path, allow_pickle: bool = False, prediction_type: str | None = None) -> SourceModel:
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        names = [n for n in WEIGHT_COMPONENTS if n in index and index[n] and index[n][0] is not None]
        for name in [n for n in names if n in OPTIONAL_COMPONENTS and not (path / n).is_dir()]:
            log.warning("%s has no %s folder: converting without it", path, name)
            names.remove(name)
    else:  # a lone ControlNet folder
        names = ["controlnet"]
    components = {}
    for name in names:
        folder = path / name if (path / "model_index.json").exists() else path
        config = json.loads((folder / "config.json").read_text())
        files = weight_files(folder, allow_pickle)
        components[name] = (config, read_weights(files))
        log.info("reading %s from %s", name, ", ".join(f.name for f in files))

    scheduler = {}
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.exists():
        scheduler = json.loads(scheduler_file.read_text())
    tokenizers = {
        encoder: path / folder
        for encoder, folder in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                                ("text_encoder_3", "tokenizer_3"))
        if encoder in components
    }
    flow = scheduler.get("_class_name") in FLOW_SCHEDULERS
    return SourceModel(
        family=family_of(components) if "unet" in components or "transformer" in components else "controlnet",
        prediction_type="flow" if flow else prediction_type or scheduler.get("prediction_type", "epsilon"),
        scheduler=scheduler,
        components=components,
        tokenizers=tokenizers,
    )
