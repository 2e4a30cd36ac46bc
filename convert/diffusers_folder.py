"""Reading a diffusers pipeline folder (model_index.json + one sub-folder per component)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np

from convert.source import PICKLE_SUFFIXES, PickleRefusedError, read_pickle
from mlx_sd_server.engine.families import FAMILIES, family_of_denoiser
from mlx_sd_server.engine.families.spec import PIPELINE_CLASS, FamilySpec
from mlx_sd_server.engine.source import SourceModel

log = logging.getLogger(__name__)

# Every component any family has, in the families' order (text encoders, denoiser, VAE, ...).
WEIGHT_COMPONENTS = tuple(dict.fromkeys(c.name for spec in FAMILIES for c in spec.components))
# Text encoders a model may be converted without (SD3's T5, ~9.5 GB in float16: its pipelines read zeros in
# its place, and users leave it out).
OPTIONAL_COMPONENTS = tuple(name for spec in FAMILIES for name in spec.optional_text_encoders)
CONTROLNET = "controlnet"  # a lone ControlNet's component, and its manifest family


def tokenizer_folder(encoder: str) -> str:
    """The folder of a text encoder's tokenizer: text_encoder_2 -> tokenizer_2 (diffusers' and ours)."""
    return encoder.replace("text_encoder", "tokenizer")


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
            for key, value in cast(dict[str, mx.array], mx.load(str(path))).items():
                floating = mx.issubdtype(value.dtype, mx.floating)
                yield key, np.array(value.astype(mx.float32)) if floating else np.array(value)
        else:
            yield from read_pickle(path).items()


def read_diffusers_folder(path: Path, allow_pickle: bool = False, prediction_type: str | None = None) -> SourceModel:
    pipeline: dict[str, Any] = {}
    pipeline_class = None
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        pipeline_class = index.get("_class_name")
        names = [n for n in WEIGHT_COMPONENTS if n in index and index[n] and index[n][0] is not None]
        # the pipeline's own settings (components are [library, class] pairs; `_` keys are diffusers' bookkeeping)
        pipeline = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
        for name in [n for n in names if n in OPTIONAL_COMPONENTS and not (path / n).is_dir()]:
            log.warning("%s has no %s folder: converting without it", path, name)
            names.remove(name)
    else:  # a lone ControlNet folder
        names = [CONTROLNET]
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
    spec, family = family_of({name: config for name, (config, _) in components.items()})
    if pipeline_class in spec.detect.pipelines:  # a variant its configs cannot tell (FLUX.1 Kontext)
        pipeline[PIPELINE_CLASS] = pipeline_class
    return SourceModel(
        family=family,
        prediction_type=spec.parameterization or prediction_type or scheduler.get("prediction_type", "epsilon"),
        scheduler=scheduler,
        components={c.name: components[c.name] for c in spec.components if c.name in components},
        tokenizers={name: path / tokenizer_folder(name) for name in spec.text_encoders() if name in components},
        pipeline=pipeline,
    )


def family_of(configs: dict[str, dict[str, Any]]) -> tuple[FamilySpec, str]:
    """The family whose denoiser class a folder's components have, and the manifest family their configs show
    (a lone ControlNet: its own)."""
    classes = [config.get("_class_name") for config in configs.values()]
    spec = next((s for s in map(family_of_denoiser, classes) if s is not None), None)
    if spec is None and list(configs) == [CONTROLNET]:
        spec = next(s for s in FAMILIES if s.component(CONTROLNET) is not None)
        return spec, CONTROLNET
    if spec is None:
        raise ValueError(f"unsupported model: none of {classes} is a denoiser this version converts")
    return spec, spec.detect.diffusers_family(configs) if spec.detect.diffusers_family else spec.manifest_names[0]
