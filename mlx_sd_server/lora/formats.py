"""LoRA files in the layouts people share them in, read into one form: diffusers layer names.

A LoRA adapts a layer's weight W by `scale * up @ down` (rank r much smaller than the layer). Files differ in
how they name the layer, the two factors and the scale:

    diffusers / PEFT   <component>.<layer>.lora_A.weight, .lora_B.weight; components unet., text_encoder.,
                       text_encoder_2., transformer. (FLUX, SD3). Older diffusers: .lora.down/.lora.up,
                       .lora_linear_layer.down/up, attention processors' [unet.]...attn1.processor.to_q_lora.down.
                       CLIP layers are text_model.encoder.layers.N... (files saved with transformers 5 drop the
                       `text_model.`). Scale: `.alpha` keys, else PEFT's LoraConfig in the metadata diffusers
                       writes (lora_alpha, alpha_pattern, use_rslora), else 1.
    kohya / A1111      lora_unet_<layer with dots as underscores>.lora_down.weight, .lora_up.weight, .alpha:
                       SD 1.x/2.x with diffusers names, SDXL with Stability's LDM ones (input_blocks_4_1_...);
                       text encoders lora_te_ (SD 1.x/2.x), lora_te1_ and lora_te2_ (SDXL: CLIP-L, OpenCLIP-G).
                       LoCon convolutions: down (r, in, kh, kw), up (out, r, 1, 1). No alpha: scale 1.
    FLUX               Black Forest Labs' layer names (families/flux/single_file.py): kohya's lora_unet_double_blocks_0_
                       img_attn_qkv (+ lora_te1_ for CLIP-L); BFL/ComfyUI's [diffusion_model.|transformer.]
                       double_blocks.0.img_attn.qkv with lora_A/B or lora_down/up; XLabs' double_blocks.0.processor.
                       qkv_lora1.down.weight (XLabs has no alpha: scale 1, as in diffusers).
    Z-Image, FLUX.2    their original names (Z-Image's fused attention.qkv, FLUX.2's BFL ones) under
                       diffusion_model. or kohya's lora_unet_ (families/zimage/lora.py, families/flux2/lora.py).

kohya's flattened names cannot be split at their underscores, so they are looked up in *layouts*, tables of
every layer a CLIP or T5 text encoder, an SD UNet (both namings) or a DiT family's transformer (its original
names) has. A fused projection (BFL's qkv, FLUX.1's single blocks' linear1 = q, k, v and the MLP input) is
split as its weight is: each part's `up` is a slice of the fused `up`'s rows, and the parts share `down`.
LyCORIS LoHa/LoKr, DoRA, full-weight differences and pickles are refused with a message saying so; so are
keys this reader does not know, rather than dropped.

What is a family's (its denoiser's layouts, its files' prefixes, XLabs' names, how to tell its LoRAs) is in
its folder's `lora.py` (`engine/families/lora.py` says how); this reader names none. It asks the families in
FAMILIES' order, each reading the file's names as its own (one name may be two families' layers: FLUX.1's and
FLUX.2's BFL double blocks, BFL's and Z-Image's `final_layer.`): the first that reads every key and claims
what it read is the LoRA's family, and its reading is the LoRA.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from convert.source import PICKLE_SUFFIXES, safetensors_header
from mlx_sd_server.engine.families import FAMILIES
from mlx_sd_server.engine.families.lora import CLIP, LoRAEntry, LoRATarget, old_attention
from mlx_sd_server.engine.source import CheckpointError, float32


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: delta W = scale * up @ down (conv: up 1x1 over a down conv)."""

    down: np.ndarray  # float32, (rank, in) for a linear layer, (rank, in, kh, kw) for a conv (torch layout)
    up: np.ndarray  # float32, (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank, or 1.0 when the file gives no alpha (diffusers' convention)


@dataclass(frozen=True)
class LoRAFile:
    family: str  # the manifest family the file fits (the families' LoRA rules tell)
    layers: dict[str, dict[str, LoRALayer]]  # component (unet, transformer, text_encoder[_2]) -> layer -> LoRA


class LoRAFormatError(ValueError):
    """A file that is not a LoRA this server can use; the message names the file and says why."""


# How files name a LoRA's two factors, longest first (`.lora.down.weight` also ends in `.down.weight`). The last
# is XLabs' (`qkv_lora1.down.weight`) and diffusers' first attention processors' (`to_q_lora.down.weight`).
FACTOR_NAMES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),  # PEFT's adapter name left in (diffusers drops it)
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".down.weight", ".up.weight"),
)
# Keys of adapters other than a LoRA -> what the file is (the families add their own: `LoRARules.refused`).
OTHER_ADAPTERS = (
    (r"\.hada_", "a LyCORIS LoHa"),
    (r"\.lokr_", "a LyCORIS LoKr"),
    (r"\.dora_scale$|lora_magnitude_vector", "a DoRA"),
    (r"\.lora_mid\.", "a LyCORIS LoCon with CP-decomposed convolutions (lora_mid)"),
    (r"\.diff(_b)?$", "a full-weight difference (LyCORIS 'full' / 'diff')"),
)
# kohya's CLIP text encoder prefixes (SD 1.x/2.x's one; the first and second of two, as SDXL's and FLUX's
# CLIP-L); the families add theirs (`LoRARules.kohya`)
KOHYA_TEXT_ENCODERS = {
    "lora_te_": ("text_encoder", CLIP),
    "lora_te1_": ("text_encoder", CLIP),
    "lora_te2_": ("text_encoder_2", CLIP),
}
# diffusers' component prefixes; the families add their files' own (`LoRARules.prefixes`)
PREFIXES = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
    "text_encoder_3.": "text_encoder_3",
    "transformer.": "transformer",
}
PEFT_METADATA = "lora_adapter_metadata"  # diffusers: per component, PEFT's LoraConfig (r, lora_alpha, ...)

# The families' LoRA rules, in FAMILIES' order, and what they add to the tables above
RULES = tuple(spec.detect.lora for spec in FAMILIES if spec.detect.lora is not None)
KOHYA_PREFIXES = tuple({prefix for table in (KOHYA_TEXT_ENCODERS, *(r.kohya for r in RULES)) for prefix in table})
ALL_PREFIXES = dict(
    sorted(
        {**PREFIXES, **{p: c for rules in RULES for p, c in rules.prefixes.items()}}.items(),
        key=lambda item: -len(item[0]),
    )
)  # longest first: model.diffusion_model. before ...
REFUSED = (*OTHER_ADAPTERS, *(item for rules in RULES for item in rules.refused.items()))


@cache
def _kohya_names(family: int) -> dict[str, LoRATarget]:
    """kohya's flattened names (prefix included) -> the layer each names, as family `family` (an index into
    RULES) reads them. A prefix names layers of several families' networks (lora_unet_: SD's UNet, FLUX's
    transformer, Z-Image's...), and one flattened name may be two families' layers (FLUX.1's and FLUX.2's
    double blocks share BFL's names but not their diffusers ones), so each family has its own table."""
    return {
        prefix + source.replace(".", "_"): target
        for table in (KOHYA_TEXT_ENCODERS, RULES[family].kohya)
        for prefix, (component, layout) in table.items()
        for source in layout.names()
        if (target := layout.target(component, source))
    }


def _resolve(stem: str, family: int) -> LoRATarget | None:
    """A LoRA's name in a file (its keys less the factor suffix) -> the layer it adapts as family `family` (an
    index into RULES) names its layers; None if unknown."""
    rules = RULES[family]
    if stem.startswith(KOHYA_PREFIXES):
        return _kohya_names(family).get(stem)
    if (own := rules.resolve(stem)) is not None:  # the family's own namings (XLabs', diffusers' first format)
        return own.layout.target(own.component, own.layer) if own.layout else own
    prefix = next((p for p in ALL_PREFIXES if stem.startswith(p)), "")
    component, name = ALL_PREFIXES.get(prefix), stem[len(prefix) :]
    for owner, layout in rules.original.items():  # an original layout (BFL's), with its component's prefix or none
        if component in (None, owner) and (target := layout.target(owner, name)):
            return target
    if component is None:
        return None
    if component.startswith("text_encoder") and name.startswith("encoder.layers."):  # transformers 5's CLIP
        name = "text_model." + name
    return LoRATarget(component, old_attention(component, name))


# --- the file's plan: which keys make which LoRA ------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One LoRA in a file: the layer it adapts and the keys of its factors and alpha."""

    target: LoRATarget
    down: str
    up: str
    alpha: str | None


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A LoRA file's tensor shapes and metadata, read from its header only."""
    if path.suffix in PICKLE_SUFFIXES:
        raise LoRAFormatError(
            f"{path} is a pickle file, which can run arbitrary code when loaded: use a "
            ".safetensors version of this LoRA"
        )
    if path.suffix != ".safetensors":
        raise LoRAFormatError(f"{path}: LoRAs are read from .safetensors files")
    try:
        header = safetensors_header(path)
    except CheckpointError as err:
        raise LoRAFormatError(str(err)) from None
    metadata = header.pop("__metadata__", None) or {}
    return {key: tuple(tensor["shape"]) for key, tensor in header.items()}, metadata


def _entries(path: Path, shapes: dict[str, tuple[int, ...]], family: int) -> tuple[list[_Entry], list[str]]:
    """The LoRAs in a file as family `family` (an index into RULES) names layers, from its keys and shapes,
    and the keys that are none of them."""
    entries: list[_Entry] = []
    used: set[str] = set()
    for key in shapes:
        factors = next((pair for pair in FACTOR_NAMES if key.endswith(pair[0])), None)
        if factors is None:
            continue
        down_suffix, up_suffix = factors
        stem = key[: -len(down_suffix)]
        up, alpha, target = stem + up_suffix, stem + ".alpha", _resolve(stem, family)
        if target is None or up not in shapes:
            continue  # reported with the other keys nothing used
        down_shape, up_shape = shapes[key], shapes[up]
        if len(down_shape) not in (2, 4) or len(up_shape) != len(down_shape) or up_shape[1] != down_shape[0]:
            raise LoRAFormatError(f"{path}: {key} {list(down_shape)} and {up} {list(up_shape)} are not LoRA factors")
        entries.append(_Entry(target, key, up, alpha if alpha in shapes else None))
        used.update((key, up, alpha))
    return entries, sorted(set(shapes) - used)


def _plan(path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[str, list[_Entry]]:
    """The family a LoRA fits and its LoRAs in that family's names: the first family in FAMILIES that names
    every key of the file and whose LoRA rules claim the layers it reads (each family's `lora_family` says
    when); LoRAFormatError for anything that is not a LoRA we know."""
    for pattern, kind in REFUSED:
        if any(re.search(pattern, key) for key in shapes):
            raise LoRAFormatError(f"{path} is {kind}, which is not supported; use a LoRA (kohya or diffusers format)")
    if not any("lora" in key.lower() for key in shapes):
        raise LoRAFormatError(
            f"{path} is not a LoRA: it has no LoRA weights"
            + (f" (keys like {sorted(shapes)[:3]})" if shapes else " (it is empty)")
        )
    fewest: list[str] | None = None  # the unknown keys of the family that names the most
    for family, rules in enumerate(RULES):
        entries, unknown = _entries(path, shapes, family)
        if unknown:
            fewest = unknown if fewest is None or len(unknown) < len(fewest) else fewest
            continue
        seen = [LoRAEntry(*e.target, e.down, shapes[e.down]) for e in entries]
        if (name := rules(seen)) is not None:
            return name, entries
    if fewest:
        raise LoRAFormatError(f"{path}: {len(fewest)} keys are not LoRA layers this server knows, e.g. {fewest[:3]}")
    raise LoRAFormatError(f"{path}: its layers fit no model family this server serves")


# --- reading ----------------------------------------------------------------------------------------------


def lora_family(path: Path) -> str:
    """The manifest family (sd1, sdxl, flux, ...) of a LoRA file, from its header only; LoRAFormatError if it
    is not a LoRA this server reads."""
    path = Path(path)
    shapes, _ = _header(path)
    return _plan(path, shapes)[0]


def _peft_scale(config: dict, component: str, layer: str, rank: int) -> float | None:
    """The scale a PEFT LoraConfig (as diffusers stores it in the metadata) gives a layer; None if none."""
    alpha = config.get(f"{component}.lora_alpha")
    if alpha is None:
        return None
    # PEFT's matching, on the name transformers 4 gives a CLIP layer and the one 5 gives (no `text_model.`)
    names = (layer, layer.removeprefix("text_model."))
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank)


def read_lora(path: Path) -> LoRAFile:
    """A LoRA file (.safetensors, any format above) in diffusers layer names, float32; LoRAFormatError (naming
    the file and the problem) for anything else."""
    import mlx.core as mx  # reads bfloat16, which numpy cannot

    path = Path(path)
    shapes, metadata = _header(path)
    family, entries = _plan(path, shapes)
    try:
        peft = json.loads(metadata.get(PEFT_METADATA) or "{}")
    except ValueError:
        raise LoRAFormatError(f"{path}: its {PEFT_METADATA} metadata is not JSON") from None
    tensors = mx.load(str(path))
    assert isinstance(tensors, dict)  # (what a .safetensors file loads as)
    layers: dict[str, dict[str, LoRALayer]] = {}
    for e in entries:
        (component_name, layer, layout), down, up = e.target, float32(tensors[e.down]), float32(tensors[e.up])
        if e.alpha is not None:
            scale = float(float32(tensors[e.alpha]).reshape(-1)[0]) / down.shape[0]
        else:
            scale = _peft_scale(peft, component_name, layer, down.shape[0])
        parts = layout.to_diffusers(layer, up, down.shape[1]) if layout and layout.to_diffusers else [(layer, up)]
        component = layers.setdefault(component_name, {})
        for name, part in parts:
            if name in component:
                raise LoRAFormatError(f"{path} adapts {component_name} layer {name} twice")
            if len(part):  # (XLabs' single-block qkv has no MLP part)
                component[name] = LoRALayer(down, part, 1.0 if scale is None else scale)
    return LoRAFile(family, layers)
