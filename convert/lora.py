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
    FLUX               Black Forest Labs' layer names (convert.flux_files): kohya's lora_unet_double_blocks_0_
                       img_attn_qkv (+ lora_te1_ for CLIP-L); BFL/ComfyUI's [diffusion_model.|transformer.]
                       double_blocks.0.img_attn.qkv with lora_A/B or lora_down/up; XLabs' double_blocks.0.processor.
                       qkv_lora1.down.weight (XLabs has no alpha: scale 1, as in diffusers).

kohya's flattened names cannot be split at their underscores, so they are looked up in tables of every layer an
SD UNet (both namings), a CLIP text encoder or a FLUX transformer has. A fused FLUX projection (BFL's qkv, the
single blocks' linear1 = q, k, v and the MLP input) is split as its weight is: each part's `up` is a slice of
the fused `up`'s rows, and the parts share `down`. LyCORIS LoHa/LoKr, DoRA, full-weight differences and
pickles are refused with a message saying so; so are keys this reader does not know, rather than dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from convert.checkpoint import (
    PICKLE_SUFFIXES, RESNET_NAMES, UNET_FIXED_NAMES, CheckpointError, _float32, _safetensors_metadata, _unet_key,
)
from convert.flux_files import BLOCKS, FLUX_NAMES, map_bfl_transformer_weight


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: delta W = scale * up @ down (conv: up 1x1 over a down conv)."""

    down: np.ndarray  # float32, (rank, in) for a linear layer, (rank, in, kh, kw) for a conv (torch layout)
    up: np.ndarray  # float32, (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank, or 1.0 when the file gives no alpha (diffusers' convention)


@dataclass(frozen=True)
class LoRAFile:
    family: str  # the family the file fits: sd1 | sd2 | sdxl | flux | sd3 (see _family)
    layers: dict[str, dict[str, LoRALayer]]  # component (unet, transformer, text_encoder[_2]) -> layer -> LoRA


class LoRAFormatError(ValueError):
    """A file that is not a LoRA this server can use; the message names the file and says why."""


# How files name a LoRA's two factors, longest first (`.lora.down.weight` also ends in `.down.weight`). The last
# is XLabs' (`qkv_lora1.down.weight`) and diffusers' first attention processors' (`to_q_lora.down.weight`).
FACTOR_NAMES = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
                (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
                (".lora.down.weight", ".lora.up.weight"), (".down.weight", ".up.weight"))
# Keys of adapters other than a LoRA -> what the file is.
OTHER_ADAPTERS = ((r"\.hada_", "a LyCORIS LoHa"), (r"\.lokr_", "a LyCORIS LoKr"),
                  (r"\.dora_scale$|lora_magnitude_vector", "a DoRA"),
                  (r"\.lora_mid\.", "a LyCORIS LoCon with CP-decomposed convolutions (lora_mid)"),
                  (r"\.diff(_b)?$", "a full-weight difference (LyCORIS 'full' / 'diff')"),
                  (r"^lora_unet_joint_blocks_", "a kohya SD3 LoRA"))
# kohya's text encoder prefixes: CLIP (SD 1.x/2.x; SDXL's two; FLUX's CLIP-L) and sd-scripts' FLUX T5 (`lora_te3_`,
# FLUX's text_encoder_2; kohya SD3 LoRAs, whose T5 it also is, are refused above by their joint blocks)
KOHYA_TEXT_ENCODERS = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                       "lora_te3_": "text_encoder_2"}
KOHYA_PREFIXES = ("lora_unet_", *KOHYA_TEXT_ENCODERS)
PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
            "text_encoder_3.": "text_encoder_3",  # SD3's T5
            "transformer.": "transformer", "diffusion_model.": "transformer", "model.diffusion_model.": "transformer",
            "text_encoders.clip_l.transformer.": "text_encoder",
            "text_encoders.t5xxl.transformer.": "text_encoder_2"}  # the last three: ComfyUI's (FLUX)
# XLabs' attention processors' LoRAs -> the BFL layer each adapts. A single block's qkv_lora adapts linear1's
# q, k and v rows only (the MLP input's part of the split comes out empty).
XLABS_NAMES = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
               "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}
PEFT_METADATA = "lora_adapter_metadata"  # diffusers: per component, PEFT's LoraConfig (r, lora_alpha, ...)

# --- every layer a LoRA may adapt (bounds beyond any released model) -------------------------------------

TRANSFORMER_BLOCK_LAYERS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2")
                                 for proj in ("to_q", "to_k", "to_v", "to_out.0")) + ("ff.net.0.proj", "ff.net.2")
CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
               "mlp.fc2")
T5_LAYERS = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
             "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
             "layer.1.DenseReluDense.wo")
TRANSFORMER_DEPTH, CLIP_DEPTH, FLUX_DEPTH = 10, 48, 64  # SDXL's deepest attention has 10 blocks, bigG 32 layers


def _attention(prefix: str) -> list[str]:
    """A UNet attention's (Transformer2DModel's) layers."""
    blocks = [f"{prefix}.transformer_blocks.{i}.{layer}" for i in range(TRANSFORMER_DEPTH)
              for layer in TRANSFORMER_BLOCK_LAYERS]
    return [f"{prefix}.proj_in", f"{prefix}.proj_out", *blocks]


@cache
def _unet_layers() -> frozenset[str]:
    """An SD 1.x/2.x/XL UNet's layers (diffusers names): 4 levels, 2 resnets per down block, 3 per up block."""
    resnet = [name for name in RESNET_NAMES.values() if "norm" not in name]
    names = [name for name in UNET_FIXED_NAMES.values() if "norm" not in name]
    for level in range(4):
        for block, count, sampler in (("down_blocks", 2, "downsamplers"), ("up_blocks", 3, "upsamplers")):
            names.append(f"{block}.{level}.{sampler}.0.conv")
            for i in range(count):
                names += [f"{block}.{level}.resnets.{i}.{leaf}" for leaf in resnet]
                names += _attention(f"{block}.{level}.attentions.{i}")
    names += [f"mid_block.resnets.{i}.{leaf}" for i in range(2) for leaf in resnet]
    return frozenset(names + _attention("mid_block.attentions.0"))


@cache
def _ldm_unet_layers() -> dict[str, str]:
    """Stability's LDM UNet layer names -> diffusers ones (kohya trains SDXL, and sometimes SD 1.x, on that UNet).
    Every block/part/layer combination is mapped as a checkpoint's weight is (layers_per_block 2, as in every SD
    UNet); those that name no layer drop out."""
    leaves = [name for name in RESNET_NAMES if "norm" not in RESNET_NAMES[name]] + ["op", "conv"]
    blocks = ([f"input_blocks.{i}.{part}" for i in range(12) for part in range(2)]
              + [f"output_blocks.{i}.{part}" for i in range(12) for part in range(3)]
              + [f"middle_block.{part}" for part in range(3)])
    names = list(UNET_FIXED_NAMES) + [name for block in blocks
                                      for name in [f"{block}.{leaf}" for leaf in leaves] + _attention(block)]
    mapped = {name: (_unet_key(f"{name}.weight", 2) or "").removesuffix(".weight") for name in names}
    return {ldm: name for ldm, name in mapped.items() if name in _unet_layers()}


@cache
def _bfl_layers() -> frozenset[str]:
    """A FLUX transformer's layers in BFL names: its linears, not its norms."""
    names = list(FLUX_NAMES) + [f"{block}.{i}.{name}" for block, (_, table) in BLOCKS.items()
                                for i in range(FLUX_DEPTH) for name in table]
    return frozenset(name for name in names if "norm" not in name)


@cache
def _kohya_names() -> dict[str, tuple[str, str, bool]]:
    """kohya's flattened names (prefix included) -> (component, layer, whether the layer is a BFL name)."""
    clip = {name: name for name in (f"text_model.encoder.layers.{i}.{layer}" for i in range(CLIP_DEPTH)
                                    for layer in CLIP_LAYERS)}
    t5 = {name: name for name in (f"encoder.block.{i}.{layer}" for i in range(CLIP_DEPTH) for layer in T5_LAYERS)}
    tables = [("lora_unet_", "unet", False, {name: name for name in _unet_layers()} | _ldm_unet_layers()),
              ("lora_unet_", "transformer", True, {name: name for name in _bfl_layers()}),
              ("lora_te3_", "text_encoder_2", False, t5),
              *((prefix, component, False, clip) for prefix, component in KOHYA_TEXT_ENCODERS.items()
                if prefix != "lora_te3_")]
    return {prefix + source.replace(".", "_"): (component, layer, bfl)
            for prefix, component, bfl, names in tables for source, layer in names.items()}


def _old_attention(component: str, name: str) -> str:
    """diffusers' first format named attention processors' LoRAs: UNet `attn1.processor.to_out_lora` is
    `attn1.to_out.0`, CLIP `self_attn.to_q_lora` is `self_attn.q_proj`."""
    if (m := re.fullmatch(r"(.+?)(\.processor)?\.to_(q|k|v|out)_lora", name)) is None:
        return name
    if component.startswith("text_encoder"):
        return f"{m[1]}.{m[3]}_proj"
    return f"{m[1]}.to_{m[3]}" + (".0" if m[3] == "out" else "")


def _resolve(stem: str) -> tuple[str, str, bool] | None:
    """A LoRA's name in a file (its keys less the factor suffix) -> (component, layer, whether the layer is a BFL
    name, which reading maps to diffusers ones); None if unknown."""
    if stem.startswith(KOHYA_PREFIXES):
        return _kohya_names().get(stem)
    if m := re.fullmatch(r"(?:diffusion_model\.)?((?:double|single)_blocks\.\d+)\.processor\.(\w+)", stem):
        return ("transformer", f"{m[1]}.{XLABS_NAMES[m[2]]}", True) if m[2] in XLABS_NAMES else None
    prefix = next((p for p in PREFIXES if stem.startswith(p)), "")
    component, name = PREFIXES.get(prefix), stem[len(prefix):]
    if name in _bfl_layers() and component in (None, "transformer"):
        return "transformer", name, True
    if component is None:  # no prefix: diffusers' first format, which held the UNet's attention processors
        name = _old_attention("unet", name)
        return ("unet", name, False) if name in _unet_layers() else None
    if component.startswith("text_encoder") and name.startswith("encoder.layers."):  # transformers 5's CLIP
        name = "text_model." + name
    return component, _old_attention(component, name), False


# --- the file's plan: which keys make which LoRA ------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    """One LoRA in a file: the layer it adapts and the keys of its factors and alpha."""

    component: str
    layer: str
    bfl: bool  # `layer` is a BFL name (FLUX in its original layout)
    down: str
    up: str
    alpha: str | None


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A LoRA file's tensor shapes and metadata, read from its header only."""
    if path.suffix in PICKLE_SUFFIXES:
        raise LoRAFormatError(f"{path} is a pickle file, which can run arbitrary code when loaded: use a "
                              ".safetensors version of this LoRA")
    if path.suffix != ".safetensors":
        raise LoRAFormatError(f"{path}: LoRAs are read from .safetensors files")
    try:
        metadata = _safetensors_metadata(path)
    except CheckpointError as err:
        raise LoRAFormatError(str(err)) from None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, metadata


def _entries(path: Path, shapes: dict[str, tuple[int, ...]]) -> list[_Entry]:
    """The LoRAs in a file, from its keys and shapes; LoRAFormatError for anything that is not one we know."""
    for pattern, kind in OTHER_ADAPTERS:
        if any(re.search(pattern, key) for key in shapes):
            raise LoRAFormatError(f"{path} is {kind}, which is not supported; use a LoRA (kohya or diffusers format)")
    if not any("lora" in key.lower() for key in shapes):
        raise LoRAFormatError(f"{path} is not a LoRA: it has no LoRA weights"
                              + (f" (keys like {sorted(shapes)[:3]})" if shapes else " (it is empty)"))
    entries, used = [], set()
    for key in shapes:
        down_suffix, up_suffix = next((pair for pair in FACTOR_NAMES if key.endswith(pair[0])), (None, None))
        if down_suffix is None:
            continue
        stem = key[:-len(down_suffix)]
        up, alpha, target = stem + up_suffix, stem + ".alpha", _resolve(stem)
        if target is None or up not in shapes:
            continue  # reported below, with the other keys nothing used
        down_shape, up_shape = shapes[key], shapes[up]
        if len(down_shape) not in (2, 4) or len(up_shape) != len(down_shape) or up_shape[1] != down_shape[0]:
            raise LoRAFormatError(f"{path}: {key} {list(down_shape)} and {up} {list(up_shape)} are not LoRA factors")
        entries.append(_Entry(*target, key, up, alpha if alpha in shapes else None))
        used.update((key, up, alpha))
    unknown = sorted(set(shapes) - used)
    if unknown:
        raise LoRAFormatError(f"{path}: {len(unknown)} keys are not LoRA layers this server knows, e.g. {unknown[:3]}")
    return entries


CROSS_ATTENTION_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the text width each UNet attends to
SDXL_LAYERS = r"^add_embedding\.|^up_blocks\.0\.attentions\.|\.transformer_blocks\.[1-9]"
FLUX_LAYERS = ("single_transformer_blocks.", "x_embedder", "time_text_embed.guidance_embedder")
FLUX_WIDTH = 3072


def _family(entries: list[_Entry], shapes: dict[str, tuple[int, ...]]) -> str:
    """The family a LoRA fits, from its layer names and its factors' shapes, first rule that applies:

    flux  a BFL-named layer (kohya, BFL/ComfyUI, XLabs), or a diffusers transformer with FLUX-only layers
          (single blocks, x_embedder, guidance) or FLUX's width (3072)
    sd3   any other diffusers transformer (joint blocks only)
    sdxl  a second text encoder, kohya's lora_te1_ names, cross-attention from 2048 wide, or SDXL's UNet
          structure: add_embedding, attention in up_blocks.0, more than one transformer block per attention
    sd2   cross-attention from 1024 wide, a linear proj_in (SD 1.x has a 1x1 conv), a 1024-wide text encoder
    sd1   the rest. A LoRA of CLIP-L alone could be FLUX's as well: it is taken as SD 1.x's.
    (Before sdxl: SD3's T5 is its text_encoder_3; T5 layers otherwise, kohya's `lora_te3_` or ComfyUI's
    `text_encoders.t5xxl.`, are FLUX's text_encoder_2.)
    Released models' widths decide; the structural rules also place LoRAs of narrow test models."""
    def in_dim(entry: _Entry) -> int:
        return shapes[entry.down][1]

    if any(e.bfl for e in entries):
        return "flux"
    transformer = [e for e in entries if e.component == "transformer"]
    if transformer:
        flux = any(e.layer.startswith(FLUX_LAYERS) or in_dim(e) == FLUX_WIDTH for e in transformer)
        return "flux" if flux else "sd3"
    if any(e.component == "text_encoder_3" for e in entries):
        return "sd3"
    if any(e.layer.startswith("encoder.block.") for e in entries):
        return "flux"
    if any(e.component == "text_encoder_2" or e.down.startswith("lora_te1_") for e in entries):
        return "sdxl"
    unet = [e for e in entries if e.component == "unet"]
    for e in unet:
        if e.layer.endswith(("attn2.to_k", "attn2.to_v")) and in_dim(e) in CROSS_ATTENTION_FAMILIES:
            return CROSS_ATTENTION_FAMILIES[in_dim(e)]
    if any(re.search(SDXL_LAYERS, e.layer) for e in unet):
        return "sdxl"
    if any(e.layer.endswith("proj_in") and len(shapes[e.down]) == 2 for e in unet):
        return "sd2"
    return "sd2" if any(e.component == "text_encoder" and in_dim(e) == 1024 for e in entries) else "sd1"


# --- reading ----------------------------------------------------------------------------------------------

def lora_family(path: Path) -> str:
    """The family (sd1, sd2, sdxl, flux, sd3) of a LoRA file, from its header only; LoRAFormatError if it is
    not a LoRA this server reads."""
    path = Path(path)
    shapes, _ = _header(path)
    return _family(_entries(path, shapes), shapes)


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
    entries = _entries(path, shapes)
    try:
        peft = json.loads(metadata.get(PEFT_METADATA) or "{}")
    except ValueError:
        raise LoRAFormatError(f"{path}: its {PEFT_METADATA} metadata is not JSON") from None
    tensors = mx.load(str(path))
    layers: dict[str, dict[str, LoRALayer]] = {}
    for e in entries:
        down, up = _float32(tensors[e.down]), _float32(tensors[e.up])
        if e.alpha is not None:
            scale = float(_float32(tensors[e.alpha]).reshape(-1)[0]) / down.shape[0]
        else:
            scale = _peft_scale(peft, e.component, e.layer, down.shape[0])
        # BFL layers as their weights map: fused ones split along the rows (`down`'s width is the hidden size)
        parts = (map_bfl_transformer_weight(f"{e.layer}.weight", up, hidden_size=down.shape[1]) if e.bfl
                 else [(e.layer, up)])
        component = layers.setdefault(e.component, {})
        for name, part in parts:
            name = name.removesuffix(".weight")
            if name in component:
                raise LoRAFormatError(f"{path} adapts {e.component} layer {name} twice")
            if len(part):  # (XLabs' single-block qkv has no MLP part)
                component[name] = LoRALayer(down, part, 1.0 if scale is None else scale)
    return LoRAFile(_family(entries, shapes), layers)
