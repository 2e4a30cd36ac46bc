"""Random LoRA files in every format lora.formats reads (and a few it refuses), made for torch models' own layers.

    write_lora(path, fmt, models, *, rank=4, alpha=None, seed=0, targets=None) -> layers

models   diffusers pipeline component name -> torch module: "unet" (UNet2DConditionModel) or "transformer"
         (FluxTransformer2DModel; SD3Transformer2DModel in "peft" only), plus optionally "text_encoder" and
         "text_encoder_2" (transformers CLIPTextModel[WithProjection]). Shapes come from the modules, so
         real-size models built on the meta device (`with torch.device("meta"):`) cost no memory.
fmt      peft        diffusers/PEFT: <component>.<layer>.lora_A.weight / .lora_B.weight; an alpha goes into the
                     metadata as diffusers writes it (lora_adapter_metadata: r, lora_alpha, alpha_pattern; text
                     encoders' names there without `text_model.`, so they fit transformers 4 and 5 alike)
         peft_old    older diffusers names: .lora.down/.lora.up (UNet, transformer), .lora_linear_layer.down/up
                     (text encoders); no alpha
         kohya       kohya/A1111 with diffusers names flattened (SD 1.x/2.x): lora_unet_..., lora_te_ (lora_te1_,
                     lora_te2_ when there are two text encoders); .lora_down/.lora_up, .alpha
         kohya_ldm   the same with Stability's LDM UNet names (kohya's SDXL): lora_unet_input_blocks_4_1_...
         flux_kohya  FLUX by kohya/sd-scripts: lora_unet_double_blocks_0_img_attn_qkv (BFL names), lora_te1_
         flux_comfy  FLUX, BFL names under diffusion_model. (CLIP under text_encoders.clip_l.transformer.) with
                     .lora_down/.lora_up/.alpha, as ComfyUI exports it
         flux_bfl    the same names with .lora_A/.lora_B/.alpha (diffusers cannot load this one)
         flux_xlabs  FLUX by XLabs: double_blocks.N.processor.{qkv,proj}_lora{1,2}.down/.up, single_blocks.N.
                     processor.{qkv,proj}_lora (attention layers only, transformer only, no alpha)
         loha, lokr, dora   not LoRAs lora.formats reads: kohya-named LyCORIS LoHa and LoKr factors, a kohya LoRA
                     with dora_scale (a few UNet/transformer layers, for error messages)
         zimage_comfy   Z-Image (ZImageTransformer2DModel) in Tongyi-MAI's names under diffusion_model.: the fused
                     attention.qkv, attention.out, x_embedder, final_layer; .lora_down/.lora_up/.alpha (ComfyUI's)
         zimage_kohya   the same names flattened under lora_unet_ (musubi-tuner's)
         flux2_bfl   FLUX.2 (Flux2Transformer2DModel) in BFL names under diffusion_model. with .lora_A/.lora_B and
                     no alpha (ai-toolkit's; diffusers cannot read an alpha there)
         flux2_kohya FLUX.2 by kohya/sd-scripts: lora_unet_double_blocks_0_img_attn_qkv, .lora_down/.lora_up/.alpha
         (Z-Image and FLUX.2 in diffusers' names: peft)
targets  a regex searched in each diffusers layer name (a fused FLUX layer is kept when one of its parts
         matches); default: every nn.Linear and nn.Conv2d (text encoders: their encoder layers), convolutions as
         LoCon factors. The FLUX formats adapt BFL layers (fused qkv and linear1), the others diffusers ones.
alpha    None (the file has none: scale 1), a number, or a function (component, layer in the file: a diffusers
         name, or a BFL one in the FLUX formats) -> alpha. scale = alpha / rank.

Returns what the file means, as lora.formats reads it: {component: {diffusers layer: LoRALayer(down, up,
scale)}} (fused layers' `up` split by rows, FLUX's final shift/scale rows swapped); {} for loha, lokr and dora.
Values: down ~ N(0, 1/fan_in), up ~ N(0, 0.1^2), so a LoRA changes outputs visibly but not absurdly. Each
(component, layer in the file) draws from its own seed: a layer gets the same factors in every format and
with any `targets`.

What diffusers 0.42's `load_lora_weights` gets wrong or cannot read, for parity tests through it (found by
tests/test_lora_formats.py; lora.formats reads all of these):
  - kohya FLUX (flux_kohya, flux_comfy): single blocks' linear1 is split at FLUX.1's widths (an AssertionError
    on a narrow model), and the layers outside the blocks (img_in, txt_in, time_in, vector_in, guidance_in,
    final_layer) are dropped: use targets="^(transformer_blocks|text_model)[.]" on tiny models;
  - kohya with different alphas per layer: attention layers (UNet's, CLIP's out_proj) get the most common
    alpha instead of their own;
  - kohya_ldm: only StableDiffusionXLPipeline maps LDM names (SD 1.x files with them are not loaded);
  - kohya with diffusers names on SDXL: add_embedding is dropped (kohya's SDXL files use LDM names anyway);
  - flux_bfl: not read at all.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
from safetensors.numpy import save_file

from mlx_sd_server.engine.families.flux.single_file import BLOCKS, FLUX_NAMES, SHIFT_SCALE_MODULES
from mlx_sd_server.lora.formats import LoRALayer

FORMATS = ("peft", "peft_old", "kohya", "kohya_ldm", "flux_kohya", "flux_comfy", "flux_bfl", "flux_xlabs",
           "loha", "lokr", "dora")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
NO_ALPHA = ("peft_old", "flux_xlabs")
# XLabs' processors in a double / single block -> the diffusers layers each adapts (fused: rows in order)
XLABS = {"double_blocks": {"qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora1": ("attn.to_out.0",),
                           "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                           "proj_lora2": ("attn.to_add_out",)},
         "single_blocks": {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",)}}
LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
LDM_FIXED = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}


def ldm_name(unet: torch.nn.Module, layer: str) -> str:
    """A diffusers UNet layer's name in Stability's LDM UNet (layers_per_block 2, as in every SD model)."""
    def leaf(kind: str, rest: str) -> str:
        return LDM_RESNET[rest] if kind == "resnets" else rest

    if layer in LDM_FIXED:
        return LDM_FIXED[layer]
    if m := re.fullmatch(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", layer):
        return f"input_blocks.{1 + 3 * int(m[1]) + int(m[3])}.{int(m[2] == 'attentions')}.{leaf(m[2], m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv", layer):
        return f"input_blocks.{3 + 3 * int(m[1])}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", layer):
        return f"output_blocks.{3 * int(m[1]) + int(m[3])}.{int(m[2] == 'attentions')}.{leaf(m[2], m[4])}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv", layer):  # after the attention, if any
        return f"output_blocks.{3 * int(m[1]) + 2}.{2 if hasattr(unet.up_blocks[int(m[1])], 'attentions') else 1}.conv"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", layer):
        return f"middle_block.{2 * int(m[1])}.{LDM_RESNET[m[2]]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", layer):
        return f"middle_block.1.{m[1]}"
    raise KeyError(f"no LDM name for UNet layer {layer}")


def _layers(component: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """A component's adaptable layers by diffusers name: linears and convs. A text encoder's are its encoder
    layers', named as in transformers' checkpoints (transformers 5's CLIPTextModel has no `text_model.` level)."""
    if component not in TEXT_ENCODERS:
        return {name: module for name, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    return {"text_model." + name.removeprefix("text_model."): module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "encoder.layers." in name}


def _fused_layers(fmt: str, model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """A FLUX transformer's layers as a FLUX format names them -> the diffusers layers each covers (in row order)."""
    have = _layers("transformer", model)
    found: dict[str, tuple[str, ...]] = {}
    if fmt == "flux_xlabs":
        for block, (diffusers_block, _) in BLOCKS.items():
            for i in range(len(getattr(model, diffusers_block))):
                for name, parts in XLABS[block].items():
                    found[f"{block}.{i}.processor.{name}"] = tuple(f"{diffusers_block}.{i}.{p}" for p in parts)
        return found
    tables = [("", "", FLUX_NAMES)] + [(f"{block}.{i}.", f"{diffusers_block}.{i}.", table)
                                        for block, (diffusers_block, table) in BLOCKS.items()
                                        for i in range(len(getattr(model, diffusers_block)))]
    for prefix, diffusers_prefix, table in tables:
        for name, target in table.items():
            parts = tuple(diffusers_prefix + p for p in ((target,) if isinstance(target, str) else target))
            if all(p in have for p in parts):  # (norms are not linears; schnell has no guidance layers)
                found[prefix + name] = parts
    return found


def _factors(seed: int, component: str, name: str, rank: int, out: int, in_shape: tuple[int, ...]):
    rng = np.random.default_rng([seed, zlib.crc32(f"{component}.{name}".encode())])
    down = rng.normal(0, 1 / np.sqrt(np.prod(in_shape)), (rank, *in_shape)).astype(np.float32)
    up = rng.normal(0, 0.1, (out, rank, *(1,) * (len(in_shape) - 1))).astype(np.float32)
    return down, up


def _file_name(fmt: str, component: str, name: str,
               models: Mapping[str, torch.nn.Module]) -> tuple[str, str, str]:
    """(down key, up key, alpha key) of a layer (its name in the file's own layout) in format `fmt`."""
    flat = name.replace(".", "_")
    te = {"text_encoder": "lora_te1_" if "text_encoder_2" in models or fmt == "flux_kohya" else "lora_te_",
          "text_encoder_2": "lora_te2_"}
    if fmt == "peft":
        stem, down, up = f"{component}.{name}", ".lora_A.weight", ".lora_B.weight"
    elif fmt == "peft_old":
        stem = f"{component}.{name}"
        down, up = ((".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight") if component in TEXT_ENCODERS
                    else (".lora.down.weight", ".lora.up.weight"))
    elif fmt in ("kohya", "kohya_ldm", "flux_kohya", "loha", "lokr", "dora"):
        stem, down, up = te.get(component, "lora_unet_") + flat, ".lora_down.weight", ".lora_up.weight"
    elif fmt in ("flux_comfy", "flux_bfl"):
        stem = ("text_encoders.clip_l.transformer." if component == "text_encoder" else "diffusion_model.") + name
        down, up = ((".lora_down.weight", ".lora_up.weight") if fmt == "flux_comfy"
                    else (".lora_A.weight", ".lora_B.weight"))
    elif fmt in DIT_FORMATS:
        stem = DIT_FORMATS[fmt].prefix + (name.replace(".", "_") if DIT_FORMATS[fmt].prefix == "lora_unet_" else name)
        down, up = DIT_FORMATS[fmt].factors
    else:  # flux_xlabs
        stem, down, up = name, ".down.weight", ".up.weight"
    return stem + down, stem + up, stem + ".alpha"


def write_lora(path: Path, fmt: str, models: Mapping[str, torch.nn.Module], *, rank: int = 4,
               alpha: float | Callable[[str, str], float] | None = None, seed: int = 0,
               targets: str | None = None) -> dict[str, dict[str, LoRALayer]]:
    """Write a random LoRA for `models` in format `fmt` to `path` (see the module docstring)."""
    if fmt not in FORMATS + tuple(DIT_FORMATS):
        raise ValueError(f"unknown LoRA format {fmt!r}; one of {FORMATS + tuple(DIT_FORMATS)}")
    tensors: dict[str, np.ndarray] = {}
    alphas: dict[str, dict[str, float]] = {}  # peft: per component, per layer
    written: dict[str, dict[str, LoRALayer]] = {}
    for component, model in models.items():
        layers = _layers(component, model)
        if component == "transformer" and fmt.startswith("flux_"):
            covered = _fused_layers(fmt, model)
        elif component == "transformer" and fmt in DIT_FORMATS:
            covered = DIT_FORMATS[fmt].layers(model)
        elif fmt == "flux_xlabs":  # XLabs adapts the transformer alone
            continue
        else:
            covered = {name: (name,) for name in layers}
        covered = {name: parts for name, parts in covered.items()
                   if targets is None or any(re.search(targets, p) for p in parts)}
        if fmt in ("loha", "lokr", "dora"):
            covered = dict(list(covered.items())[:3]) if component not in TEXT_ENCODERS else {}
        for name, parts in covered.items():
            weights = [layers[p].weight.shape for p in parts]
            down, up = _factors(seed, component, name, rank, sum(w[0] for w in weights), tuple(weights[0][1:]))
            file_name = ldm_name(model, name) if fmt == "kohya_ldm" and component == "unet" else name
            down_key, up_key, alpha_key = _file_name(fmt, component, file_name, models)
            if fmt in ("loha", "lokr", "dora"):
                tensors.update(_other_adapter(fmt, down_key.removesuffix(".lora_down.weight"), down, up))
                continue
            tensors[down_key], tensors[up_key] = down, up
            no_alpha = fmt in NO_ALPHA or fmt == "flux2_bfl"
            layer_alpha = None if no_alpha else alpha(component, name) if callable(alpha) else alpha
            if layer_alpha is not None and fmt == "peft":
                alphas.setdefault(component, {})[name] = float(layer_alpha)
            elif layer_alpha is not None:
                tensors[alpha_key] = np.array(layer_alpha, dtype=np.float32)
            scale = 1.0 if layer_alpha is None else layer_alpha / rank
            if name in SHIFT_SCALE_MODULES and fmt.startswith(("flux_", "flux2_")):  # BFL's (shift, scale)
                up = np.concatenate(np.split(up, 2)[::-1])
            rows = np.cumsum([w[0] for w in weights])[:-1]
            for part, part_up in zip(parts, np.split(up, rows)):
                written.setdefault(component, {})[part] = LoRALayer(down, part_up, scale)
    save_file(tensors, str(path), metadata=_peft_metadata(alphas, rank))
    return {} if fmt in ("loha", "lokr", "dora") else written


def _peft_metadata(alphas: dict[str, dict[str, float]], rank: int) -> dict[str, str]:
    """diffusers' lora_adapter_metadata: per component, the PEFT LoraConfig fields that set the scales."""
    config = {}
    for component, by_layer in alphas.items():
        # Text encoders' names without `text_model.` (transformers 5's CLIPTextModel lacks that level, its
        # CLIPTextModelWithProjection has it); others' anchored (`proj_out` would match every block's too).
        anchor = "" if component in TEXT_ENCODERS else "^"
        by_layer = {anchor + name.removeprefix("text_model."): value for name, value in by_layer.items()}
        common = max(set(by_layer.values()), key=list(by_layer.values()).count)
        config |= {f"{component}.r": rank, f"{component}.lora_alpha": common,
                   f"{component}.target_modules": sorted(name.lstrip("^") for name in by_layer),
                   f"{component}.alpha_pattern": {k: v for k, v in by_layer.items() if v != common}}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config)} if config else {"format": "pt"}


def _other_adapter(fmt: str, stem: str, down: np.ndarray, up: np.ndarray) -> dict[str, np.ndarray]:
    """LyCORIS LoHa / LoKr factors, or a DoRA LoRA, for one layer (shapes plausible, values random)."""
    rank, out = down.shape[0], up.shape[0]
    down2 = down.reshape(rank, -1)
    if fmt == "loha":
        factors = {"hada_w1_a": up[:, :, 0, 0] if up.ndim == 4 else up, "hada_w1_b": down2}
        factors |= {"hada_w2_a": factors["hada_w1_a"][::-1].copy(), "hada_w2_b": down2[:, ::-1].copy()}
    elif fmt == "lokr":
        factors = {"lokr_w1": np.eye(2, dtype=np.float32), "lokr_w2_a": up.reshape(out, rank)[: out // 2],
                   "lokr_w2_b": down2[:, : down2.shape[1] // 2]}
    else:
        factors = {"lora_down.weight": down, "lora_up.weight": up,
                   "dora_scale": np.ones((1, down2.shape[1]), np.float32)}
    return {f"{stem}.{name}": np.ascontiguousarray(value) for name, value in factors.items()}


# --- Z-Image and FLUX.2 in their original layouts (written here from diffusers' converters, not from ours) ----

def zimage_layers(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """A ZImageTransformer2DModel's layers in Tongyi-MAI's names -> the diffusers layers each covers (diffusers'
    convert_z_image_transformer_checkpoint_to_diffusers, inverted)."""
    found: dict[str, tuple[str, ...]] = {}
    for name in _layers("transformer", model):
        if m := re.fullmatch(r"(.+\.attention\.)to_([qkv])", name):
            found.setdefault(m[1] + "qkv", tuple(f"{m[1]}to_{p}" for p in "qkv"))
        elif name.endswith(".attention.to_out.0"):
            found[name.removesuffix("to_out.0") + "out"] = (name,)
        else:
            original = name.replace("all_x_embedder.2-1", "x_embedder").replace("all_final_layer.2-1.", "final_layer.")
            found[original] = (name,)
    return found


FLUX2_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
             "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
             "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
             "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
             "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
             "single_stream_modulation.lin": "single_stream_modulation.linear"}
FLUX2_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
                "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
                "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
FLUX2_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}


def flux2_layers(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """A Flux2Transformer2DModel's layers in BFL names -> the diffusers layers each covers (diffusers'
    convert_flux2_transformer_checkpoint_to_diffusers, inverted)."""
    found = {name: (target,) for name, target in FLUX2_TOP.items()}
    for block, diffusers_block, table in (("double_blocks", "transformer_blocks", FLUX2_DOUBLE),
                                          ("single_blocks", "single_transformer_blocks", FLUX2_SINGLE)):
        for i in range(len(getattr(model, diffusers_block))):
            found |= {f"{block}.{i}.{name}": tuple(f"{diffusers_block}.{i}.{p}" for p in parts)
                      for name, parts in table.items()}
    have = _layers("transformer", model)
    return {name: parts for name, parts in found.items() if all(p in have for p in parts)}


class DiTFormat(NamedTuple):
    layers: Callable[[torch.nn.Module], dict[str, tuple[str, ...]]]  # names in the file -> diffusers layers
    prefix: str  # lora_unet_: kohya's, the names flattened
    factors: tuple[str, str]


LORA_DOWN_UP = (".lora_down.weight", ".lora_up.weight")
DIT_FORMATS = {
    "zimage_comfy": DiTFormat(zimage_layers, "diffusion_model.", LORA_DOWN_UP),
    "zimage_kohya": DiTFormat(zimage_layers, "lora_unet_", LORA_DOWN_UP),
    "flux2_bfl": DiTFormat(flux2_layers, "diffusion_model.", (".lora_A.weight", ".lora_B.weight")),
    "flux2_kohya": DiTFormat(flux2_layers, "lora_unet_", LORA_DOWN_UP),
}


def write_peft_twin(path: Path, layers: dict[str, dict[str, LoRALayer]]) -> None:
    """The diffusers/PEFT file meaning the same as `layers` (write_lora's result): each layer's factors under its
    diffusers name, its scale folded into `up` (a fused layer's parts each get the shared `down`)."""
    tensors = {}
    for component, by_name in layers.items():
        for name, layer in by_name.items():
            tensors[f"{component}.{name}.lora_A.weight"] = np.ascontiguousarray(layer.down)
            tensors[f"{component}.{name}.lora_B.weight"] = np.ascontiguousarray(layer.up * np.float32(layer.scale))
    save_file(tensors, str(path), metadata={"format": "pt"})
