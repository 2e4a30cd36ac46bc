"""Reading and writing converted model folders (format: docs/model-format.md).

A converted folder holds `model.json` (the manifest) and one safetensors file per component, already in
MLX parameter names and NHWC layout. `load_model` builds the MLX modules from the manifest's configs and
loads their weights; `save_component` is the converter's way of writing one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_sd_server.engine.clip import CLIPTextConfig, CLIPTextModel
from mlx_sd_server.engine.controlnet import ControlNetConfig, ControlNetModel
from mlx_sd_server.engine.tokenizer import CLIPTokenizer
from mlx_sd_server.engine.unet import UNetConfig, UNetModel
from mlx_sd_server.engine.vae import Autoencoder, VAEConfig

log = logging.getLogger(__name__)

FORMAT = "mlx-sd-server/1"
MANIFEST = "model.json"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass(frozen=True)
class ComponentKind:
    """How to build one kind of component from its config dict."""

    config_class: type
    model_class: type

    def build(self, config: dict) -> nn.Module:
        return self.model_class(self.config_class.from_dict(config))


COMPONENT_KINDS = {
    "text_encoder": ComponentKind(CLIPTextConfig, CLIPTextModel),
    "text_encoder_2": ComponentKind(CLIPTextConfig, CLIPTextModel),
    "unet": ComponentKind(UNetConfig, UNetModel),
    "vae": ComponentKind(VAEConfig, Autoencoder),
    "controlnet": ComponentKind(ControlNetConfig, ControlNetModel),
}


class ModelFormatError(ValueError):
    """A folder is not a converted model this version can read."""


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{folder} is not a converted model (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: unsupported format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, **manifest}
    write_atomically(Path(folder) / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))


def write_atomically(path: Path, write: Callable[[str], None], suffix: str = "") -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quantizable(group_size: int) -> Callable[[str, nn.Module], bool]:
    """Linear layers whose input size the group size divides; everything else stays as it is."""
    return lambda _path, module: isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def save_component(
    folder: Path,
    name: str,
    config: dict,
    weights: list[tuple[str, mx.array]],
    dtype: mx.Dtype,
    quantization: dict | None = None,
) -> dict[str, Any]:
    """Build the module, load `weights` (strictly), optionally quantize, save; returns its manifest entry."""
    model = COMPONENT_KINDS[name].build(config)
    model.load_weights(weights, strict=True)
    model.set_dtype(dtype)
    if quantization:
        nn.quantize(model, quantization["group_size"], quantization["bits"], class_predicate=quantizable(quantization["group_size"]))
    params = dict(tree_flatten(model.parameters()))
    filename = f"{name}.safetensors"
    write_atomically(folder / filename, lambda p: mx.save_safetensors(p, params))
    return {"config": config, "weights": filename}


@dataclass
class LoadedModel:
    """A converted model's modules, ready for the pipeline."""

    folder: Path
    manifest: dict[str, Any]
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[CLIPTokenizer]
    controlnet: nn.Module | None = None
    dtype: mx.Dtype = mx.float32
    vae_dtype: mx.Dtype = mx.float32
    # Low-memory mode: text encoders are read from disk for each job and dropped once the prompts are
    # encoded, and large images are decoded in tiles.
    low_memory: bool = False
    _build_text_encoders: Callable[[], list[nn.Module]] | None = None

    @property
    def family(self) -> str:
        return self.manifest["family"]

    def text_encoding_done(self) -> None:
        """In low-memory mode, free the text encoders' weights: they come back, lazily, on next use."""
        if self.low_memory and self._build_text_encoders is not None:
            self.text_encoders = self._build_text_encoders()  # unevaluated: read from disk when next used


def load_component(folder: Path, name: str, entry: dict, dtype: mx.Dtype, quantization: dict | None) -> nn.Module:
    model = COMPONENT_KINDS[name].build(entry["config"])
    weights = mx.load(str(folder / entry["weights"]))
    if quantization:
        group_size = quantization["group_size"]
        nn.quantize(
            model, group_size, quantization["bits"],
            class_predicate=lambda path, m: quantizable(group_size)(path, m) and f"{path}.scales" in weights,
        )
    model.load_weights(list(weights.items()), strict=True)
    if not quantization:
        model.set_dtype(dtype)
    else:
        # Quantized weights stay packed; only the float parameters follow the compute dtype.
        model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)
    model.eval()
    return model


def load_model(folder: str | os.PathLike, dtype: str | None = None, controlnet: str | os.PathLike | None = None,
               low_memory: bool = False) -> LoadedModel:
    """Load a converted model folder. `dtype` defaults to float16 on a GPU, float32 on the CPU.

    `controlnet` is another converted folder whose manifest has a "controlnet" component; it overrides one
    bundled in this model's manifest. `low_memory`: see `LoadedModel`. Weights are read lazily, on first use.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    dtype_name = dtype or ("float16" if mx.default_device() == mx.gpu else "float32")
    compute_dtype = DTYPES[dtype_name]
    quantization = manifest.get("quantization")
    components = manifest["components"]

    def load(name: str, where: Path = folder, entry: dict | None = None, dt: mx.Dtype = compute_dtype) -> nn.Module:
        return load_component(where, name, entry or components[name], dt, quantization if where == folder else None)

    encoder_names = [n for n in ("text_encoder", "text_encoder_2") if n in components]

    def build_text_encoders() -> list[nn.Module]:
        return [load(n) for n in encoder_names]

    tokenizers = [CLIPTokenizer.from_dir(folder / components[n]["tokenizer"]) for n in encoder_names]
    # VAEs that overflow in float16 (SDXL's) say so with force_upcast; they run in float32.
    vae_dtype = mx.float32 if components["vae"]["config"].get("force_upcast") and compute_dtype == mx.float16 else compute_dtype

    control = None
    if controlnet is not None:
        cn_folder = Path(controlnet)
        cn_manifest = read_manifest(cn_folder)
        if "controlnet" not in cn_manifest["components"]:
            raise ModelFormatError(f"{cn_folder} has no controlnet component")
        control = load_component(cn_folder, "controlnet", cn_manifest["components"]["controlnet"], compute_dtype, cn_manifest.get("quantization"))
    elif "controlnet" in components:
        control = load("controlnet")

    model = LoadedModel(
        folder=folder,
        manifest=manifest,
        unet=load("unet"),
        vae=load("vae", dt=vae_dtype),
        text_encoders=build_text_encoders(),
        tokenizers=tokenizers,
        controlnet=control,
        dtype=compute_dtype,
        vae_dtype=vae_dtype,
        low_memory=low_memory,
        _build_text_encoders=build_text_encoders,
    )
    log.info("loaded %s (%s, %s%s%s) from %s", manifest.get("name", folder.name), manifest["family"], dtype_name,
             f", {quantization['bits']}-bit" if quantization else "",
             ", low memory" if low_memory else "", folder)
    return model
