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
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families import component_kinds
from mlx_sd_server.engine.ops.layers import transform_each_call

log = logging.getLogger(__name__)

FORMAT = "mlx-sd-server/1"
MANIFEST = "model.json"
CONVERTING = "converting.pid"  # in a conversion's working folder: the converting process's id
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


# Manifests written before components named their class: every component was one of these.
CLASS_BY_COMPONENT = {
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModel",
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "controlnet": "ControlNetModel",
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the manifest names text encoders take


def component_class(name: str, config: dict) -> str:
    """The diffusers/transformers class of component `name`, as its config.json names it."""
    class_name = config.get("_class_name") or next(iter(config.get("architectures") or []), None)
    class_name = class_name or CLASS_BY_COMPONENT.get(name)
    if class_name not in component_kinds():
        raise ModelFormatError(f"component {name}: unsupported class {class_name!r}")
    return class_name


def component_kind(name: str, config: dict) -> ComponentKind:
    return component_kinds()[component_class(name, config)]


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


def write_atomically(path: Path, write: Callable[[str], object], suffix: str = "") -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quantizable(group_size: int) -> Callable[[str, nn.Module | None], bool]:
    """Linear layers whose input size the group size divides; everything else stays as it is."""
    return lambda _path, module: isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight that arrives already in MLX's affine quantized layout (a GGUF Q4_0/Q4_1/Q8_0 tensor,
    repacked exactly by convert.gguf_source). save_component stores it as it is, whatever quantization is
    asked, if it lands on a Linear layer of its shape; anywhere else it is dequantized."""

    weight: mx.array  # uint32 codes, (out, in * bits / 32)
    scales: mx.array  # (out, in / group_size)
    biases: mx.array
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 32 // self.bits

    def dequantize(self) -> mx.array:
        return mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, dtype=mx.float32)


def _exactly_in(dtype: mx.Dtype, x: mx.array) -> mx.array:
    """`x` in `dtype` if that holds it exactly, else as it is (GGUF's float16 scales do not fit bfloat16)."""
    narrow = x.astype(dtype)
    return narrow if mx.array_equal(narrow.astype(x.dtype), x).item() else x


def quantized_layers(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, dict[str, int]]:
    """The stored quantized Linear layers (those with `.scales`), each with the group size and bits its arrays
    say: the packed weight is (out, in * bits / 32) uint32, the scales (out, in / group_size)."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{path}.scales" in weights:
            in_dims = module.weight.shape[1]
            layers[path] = {
                "group_size": in_dims // weights[f"{path}.scales"].shape[1],
                "bits": weights[f"{path}.weight"].shape[1] * 32 // in_dims,
            }
    return layers


def save_component(
    folder: Path,
    name: str,
    config: dict,
    weights: Iterable[tuple[str, mx.array | QuantizedWeight]],
    dtype: mx.Dtype,
    quantization: dict | None = None,
) -> dict[str, Any]:
    """Build the module, load `weights` (strictly), optionally quantize, save; returns its manifest entry.

    Weights are cast (and quantized) one at a time as they arrive, so converting a 12B-parameter FLUX
    transformer needs its converted size in memory, not four times its float32 size. `quantization`
    ({"bits", "group_size"}) quantizes the Linear layers whose input size its group size divides; a
    `QuantizedWeight` keeps its own bits and group size, so layers may differ (load_component reads each
    layer's from its arrays). The entry's "quantization" is the setting most of its quantized layers have.
    """
    kind = component_kind(name, config)
    dtype = kind.instead_of_float16 if dtype == mx.float16 and kind.instead_of_float16 else dtype
    model = kind.build(config)  # lazily initialised: its random weights are never computed
    linears = {path: module for path, module in model.named_modules() if isinstance(module, nn.Linear)}
    asked = {"group_size": quantization["group_size"], "bits": quantization["bits"]} if quantization else None
    layers: dict[str, dict[str, int]] = {}  # the quantized Linear layers: their group size and bits
    params: dict[str, mx.array] = {}
    for key, value in weights:
        module, _, param = key.rpartition(".")
        if isinstance(value, QuantizedWeight):
            if param == "weight" and module in linears and tuple(linears[module].weight.shape) == value.shape:
                layers[module] = {"group_size": value.group_size, "bits": value.bits}
                params[key] = value.weight
                params[f"{module}.scales"] = _exactly_in(dtype, value.scales)
                params[f"{module}.biases"] = _exactly_in(dtype, value.biases)
                mx.eval(params[key], params[f"{module}.scales"], params[f"{module}.biases"])
                continue
            value = value.dequantize()
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(mx.float32 if kind.keeps_float32(key) else dtype)
        if param == "weight" and asked and quantizable(asked["group_size"])(module, linears.get(module)):
            layers[module] = asked
            value, params[f"{module}.scales"], params[f"{module}.biases"] = mx.quantize(value, **asked)
            mx.eval(params[f"{module}.scales"], params[f"{module}.biases"])
        params[key] = value
        mx.eval(value)  # now, so that the float32 source can be freed
    if layers:
        nn.quantize(model, class_predicate=lambda path, _: dict(layers[path]) if path in layers else False)
    model.load_weights(list(params.items()), strict=True)
    filename = f"{name}.safetensors"
    write_atomically(folder / filename, lambda p: mx.save_safetensors(p, dict(tree_flatten(model.parameters()))))
    entry: dict[str, Any] = {"config": config, "weights": filename}
    if layers:
        settings = Counter(tuple(sorted(setting.items())) for setting in layers.values())
        entry["quantization"] = dict(settings.most_common(1)[0][0])
    return entry


@dataclass
class LoadedModel:
    """A converted model's modules, ready for the pipeline, by manifest name: its text encoders and their
    tokenizers (`text_encoder`, `text_encoder_2`, ...: those the model has, in that order), and the rest
    (`unet` or `transformer`, `vae`, maybe `controlnet`)."""

    folder: Path
    manifest: dict[str, Any]
    components: dict[str, nn.Module]
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, Any]
    dtype: mx.Dtype = mx.float32
    vae_dtype: mx.Dtype = mx.float32
    # Low-memory mode: text encoders are read from disk for each job and dropped once the prompts are
    # encoded, large images are decoded in tiles, and on the CPU no Winograd kernel transforms are kept.
    low_memory: bool = False
    _build_text_encoders: Callable[[], dict[str, nn.Module]] | None = None

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def vae(self) -> nn.Module:
        return self.components["vae"]

    @property
    def unet(self) -> nn.Module:
        return self.components["unet"]

    @property
    def controlnet(self) -> nn.Module | None:
        return self.components.get("controlnet")

    def unread_denoisers(self) -> None:
        """In low-memory mode, free the denoiser's weights (not the VAE's) until they are next used: they come
        back from disk, lazily, when the denoiser first runs, so that a text encoder and the denoiser are never
        both in memory (families whose spec asks: `FamilySpec.low_memory_unreads_denoiser`)."""
        if not self.low_memory:
            return
        for name, module in self.components.items():
            if name not in ("vae", "controlnet"):
                unread_component(self.folder, name, self.manifest["components"][name], module, self.dtype)

    def text_encoding_done(self) -> None:
        """In low-memory mode, free the text encoders' weights: they come back, lazily, on next use."""
        if self.low_memory and self._build_text_encoders is not None:
            self.text_encoders = self._build_text_encoders()  # unevaluated: read from disk when next used


def load_component(folder: Path, name: str, entry: dict, dtype: mx.Dtype) -> nn.Module:
    kind = component_kind(name, entry["config"])
    model = kind.build(entry["config"])
    weights = mx.load(str(folder / entry["weights"]))
    assert isinstance(weights, dict)  # (what a .safetensors file loads as)
    # Each quantized layer's bits and group size come from its arrays (a GGUF's layers keep their own).
    layers = quantized_layers(model, weights)
    if layers:
        nn.quantize(model, class_predicate=lambda path, _: dict(layers[path]) if path in layers else False)
    read_weights(model, kind, weights, dtype, quantized=bool(layers))
    model.eval()
    return model


def read_weights(model: nn.Module, kind: ComponentKind, weights: dict, dtype: mx.Dtype, quantized: bool) -> None:
    """Put a component's weights (as `mx.load` gives them: lazy, read on first use) into its module, in the dtype
    its precision rule gives."""
    if dtype == mx.float16 and kind.instead_of_float16 is not None:
        dtype = kind.instead_of_float16
    model.load_weights(list(weights.items()), strict=True)
    if not quantized:
        model.set_dtype(dtype)
    else:
        # Quantized weights stay packed; only the float parameters follow the compute dtype.
        model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)
    kept = [(key, value.astype(mx.float32)) for key, value in weights.items() if kind.keeps_float32(key)]
    if kept:  # (the component's precision rule)
        model.load_weights(kept, strict=False)


def unread_component(folder: Path, name: str, entry: dict, model: nn.Module, dtype: mx.Dtype) -> None:
    """Give back the memory of a loaded component's weights: the module gets them again lazily from its file,
    to be read on next use (low-memory mode's denoiser while prompts are encoded)."""
    weights = mx.load(str(folder / entry["weights"]))
    assert isinstance(weights, dict)
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    read_weights(model, component_kind(name, entry["config"]), weights, dtype, quantized)


def check_vocabulary(name: str, encoder: nn.Module, tokenizer: Any) -> None:
    """Refuse a text encoder whose token embedding has no row for some of its tokenizer's ids: the lookup
    would read past the table (single files have come with 536 rows for CLIP's 49,408 tokens)."""
    rows = encoder.token_rows
    if tokenizer.max_id >= rows:
        raise ModelFormatError(
            f"component {name}: its token embedding has {rows} rows, but its tokenizer has {tokenizer.vocab_size} "
            f"tokens (ids up to {tokenizer.max_id}); the text encoder's weights do not fit its tokenizer"
        )


def default_dtype() -> str:
    """float16 on a GPU, float32 on the CPU."""
    return "float16" if mx.default_device() == mx.gpu else "float32"


def load_controlnet(folder: str | os.PathLike, dtype: str | None = None) -> nn.Module:
    """A converted lone ControlNet (a folder whose manifest has a "controlnet" component), lazily read."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if "controlnet" not in manifest["components"]:
        raise ModelFormatError(f"{folder} has no controlnet component")
    return load_component(folder, "controlnet", manifest["components"]["controlnet"], DTYPES[dtype or default_dtype()])


def module_bytes(module: nn.Module) -> int:
    """The bytes of a module's weights as they are held (read or not yet: the size is their shapes')."""
    arrays = dict(tree_flatten(module.parameters())).values()
    return sum(array.nbytes for array in arrays if isinstance(array, mx.array))


def load_model(
    folder: str | os.PathLike,
    dtype: str | None = None,
    controlnet: str | os.PathLike | None = None,
    low_memory: bool = False,
) -> LoadedModel:
    """Load a converted model folder. `dtype` defaults to float16 on a GPU, float32 on the CPU.

    `controlnet` is another converted folder whose manifest has a "controlnet" component; it overrides one
    bundled in this model's manifest. `low_memory`: see `LoadedModel`. Weights are read lazily, on first use.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    dtype_name = dtype or default_dtype()
    compute_dtype = DTYPES[dtype_name]
    quantization = manifest.get("quantization")
    components = manifest["components"]

    def load(name: str, dt: mx.Dtype = compute_dtype) -> nn.Module:
        return load_component(folder, name, components[name], dt)

    encoder_names = [n for n in TEXT_ENCODERS if n in components]

    def build_text_encoders() -> dict[str, nn.Module]:
        return {n: load(n) for n in encoder_names}

    tokenizers = {
        n: component_kind(n, components[n]["config"]).tokenizer_class.from_dir(folder / components[n]["tokenizer"])
        for n in encoder_names
    }
    text_encoders = build_text_encoders()
    for name in encoder_names:
        check_vocabulary(name, text_encoders[name], tokenizers[name])
    # VAEs that overflow in float16 (SDXL's) say so with force_upcast; they run in float32.
    vae_dtype = (
        mx.float32 if components["vae"]["config"].get("force_upcast") and compute_dtype == mx.float16 else compute_dtype
    )

    control = None
    if controlnet is not None:
        control = load_controlnet(controlnet, dtype_name)
    elif "controlnet" in components:
        control = load("controlnet")

    denoisers = [n for n in components if n not in TEXT_ENCODERS and n not in ("vae", "controlnet")]
    modules = {n: load(n) for n in denoisers} | {"vae": load("vae", dt=vae_dtype)}
    if control is not None:
        modules["controlnet"] = control
    if low_memory:
        for module in modules.values():
            transform_each_call(module)
    model = LoadedModel(
        folder=folder,
        manifest=manifest,
        components=modules,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        dtype=compute_dtype,
        vae_dtype=vae_dtype,
        low_memory=low_memory,
        _build_text_encoders=build_text_encoders,
    )
    log.info(
        "loaded %s (%s, %s%s%s) from %s",
        manifest.get("name", folder.name),
        manifest["family"],
        dtype_name,
        f", {quantization['bits']}-bit" if quantization else "",
        ", low memory" if low_memory else "",
        folder,
    )
    return model
