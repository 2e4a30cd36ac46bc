"""Stable Diffusion's single files (CompVis/LDM for SD 1.x/2.x, Stability's SGM for SDXL) -> diffusers' layout.

These are the `.safetensors` files A1111, ComfyUI, CivitAI and stable-diffusion.cpp users have: one state dict
holding every component under its original names. Each is renamed to diffusers/transformers names and its
config.json inferred from tensor shapes, so the result goes through the same per-component mappings as a
diffusers folder.

    model.diffusion_model.*               -> unet
    first_stage_model.*                   -> vae
    cond_stage_model.transformer.*        -> text_encoder    (SD 1.x: OpenAI CLIP ViT-L, transformers names)
    cond_stage_model.model.*              -> text_encoder    (SD 2.x: OpenCLIP ViT-H, open_clip names)
    conditioner.embedders.0.transformer.* -> text_encoder    (SDXL: CLIP ViT-L)
    conditioner.embedders.1.model.*       -> text_encoder_2  (SDXL: OpenCLIP bigG, with projection)
    control_model.*                       -> controlnet      (ControlNet: a UNet encoder copy, hint block, zero convs)

A ControlNet file usually holds only `control_model.*` (or the same keys without the prefix, e.g.
thibaud/controlnet-sd21); it then converts to a lone "controlnet" component, attached to a base model at load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mlx_sd_server.engine.ldm_vae import norm_groups, read_vae
from mlx_sd_server.engine.source import (
    ArchitectureHints,
    CheckpointError,
    FilePart,
    Guess,
    OriginalComponent,
    OriginalModel,
    Tensors,
    count_distinct,
    guess,
    renamed_component,
    strip_prefix,
)
from mlx_sd_server.engine.text.single_file import read_clip, read_open_clip
from mlx_sd_server.engine.vae import downscale_factor

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.spec import FamilySpec

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only text encoder is OpenCLIP bigG
CONTROLNET_PREFIX = "control_model."
CONTROLNET_MARKER = "input_hint_block.0.weight"  # the control image's first conv: only ControlNets have it
CONTROLNET = "controlnet"  # the manifest family of a lone ControlNet
RELEASED_UNET_WIDTHS = ([320, 640, 1280, 1280], [320, 640, 1280])  # SD 1.x/2.x's, SDXL's block_out_channels
SDXL_ADM_CHANNELS = 2816  # SDXL's label_emb input: bigG's pooled 1280 and six 256-wide time ids

UNET = FilePart("the UNet", "input_blocks.0.0.weight", (UNET_PREFIX,))
VAE = FilePart("the VAE", "encoder.conv_in.weight", (VAE_PREFIX,))
CLIP = "embeddings.token_embedding.weight"  # under `text_model.`
OPEN_CLIP = "token_embedding.weight"
TEXT_ENCODERS = {  # by manifest family: the text encoders' parts
    "sd1": {"text_encoder": FilePart("the CLIP text encoder", CLIP, (SD1_CLIP_PREFIX,))},
    "sd2": {"text_encoder": FilePart("the OpenCLIP text encoder", OPEN_CLIP, (SD2_OPEN_CLIP_PREFIX,))},
    "sdxl": {
        "text_encoder": FilePart("the CLIP text encoder", CLIP, (SDXL_CLIP_PREFIX,)),
        "text_encoder_2": FilePart("the OpenCLIP text encoder", OPEN_CLIP, (SDXL_OPEN_CLIP_PREFIX,)),
    },
}
EXPECTS = (
    "a full Stable Diffusion checkpoint: expected a UNet (model.diffusion_model.*) and a VAE "
    "(first_stage_model.*), or a ControlNet (control_model.*)"
)


def is_single_file(names: Iterable[str]) -> bool:
    """CompVis/SGM checkpoints keep the UNet under model.diffusion_model. (asked after the DiT families, whose
    ComfyUI files use that prefix too); ControlNets have their hint block, bare or under control_model."""
    return any(
        name.startswith(UNET_PREFIX) or name.removeprefix(CONTROLNET_PREFIX) == CONTROLNET_MARKER for name in names
    )


def family_of_names(names: Collection[str]) -> str:
    """sd1, sd2 or sdxl, by the text encoders a full checkpoint holds."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in names)

    if not has(UNET_PREFIX) or not has(VAE_PREFIX):
        raise CheckpointError(
            f"not {EXPECTS}" + (f"; it has keys like {sorted(names)[:3]}" if names else "; it is empty")
        )
    if has(SDXL_CLIP_PREFIX) and has(SDXL_OPEN_CLIP_PREFIX):
        return "sdxl"
    if has(SDXL_REFINER_PREFIX):
        raise CheckpointError("SDXL refiner checkpoints are not supported (only base SD 1.x, 2.x and XL models)")
    if has(SD2_OPEN_CLIP_PREFIX):
        return "sd2"
    if has(SD1_CLIP_PREFIX):
        return "sd1"
    raise CheckpointError("unrecognised text encoder: expected SD 1.x (CLIP), SD 2.x (OpenCLIP) or SDXL keys")


def family_of_configs(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """A diffusers folder's: SDXL has text-time conditioning; SD 2.x has OpenCLIP's gelu text encoder; SD 1.x
    the rest."""
    if configs["unet"].get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if configs.get("text_encoder", {}).get("hidden_act") == "gelu" else "sd1"


def parts(names: Collection[str]) -> dict[str, FilePart]:
    """A lone ControlNet, or a full checkpoint (the original ControlNet training files hold a base model too)."""
    control = FilePart("the ControlNet", CONTROLNET_MARKER, (CONTROLNET_PREFIX, ""))
    if not any(name.startswith(UNET_PREFIX) for name in names) and CONTROLNET_MARKER in {
        name.removeprefix(CONTROLNET_PREFIX) for name in names
    }:
        return {CONTROLNET: control}
    return {
        "unet": UNET,
        "vae": VAE,
        **TEXT_ENCODERS[family_of_names(names)],
        CONTROLNET: FilePart(control.description, CONTROLNET_MARKER, (CONTROLNET_PREFIX,), required=False),
    }


def prediction_type_of(family: str, stated: str | None) -> str:
    """What the file states, else the family's usual: SD 2.x v (the 768-v models, with a warning), else epsilon."""
    if stated is not None:
        return stated
    if family == "sd2":
        log.warning(
            "this SD 2.x checkpoint does not say whether it predicts v or epsilon; assuming v_prediction (the "
            "768-v models). For a 512-base model pass --prediction-type epsilon."
        )
        return "v_prediction"
    return "epsilon"


def read(
    spec: FamilySpec,
    found: Mapping[str, tuple[Tensors, str]],
    stated_prediction_type: str | None,
    hints: ArchitectureHints,
) -> OriginalModel:
    if "unet" not in found:  # a lone ControlNet
        controlnet = read_controlnet(*found[CONTROLNET], hints)
        return OriginalModel(
            CONTROLNET, "epsilon", {**spec.scheduler, "prediction_type": "epsilon"}, {CONTROLNET: controlnet}
        )
    family = family_of_names(found["unet"][0])
    prediction_type = prediction_type_of(family, stated_prediction_type)
    components: dict[str, OriginalComponent] = {}
    if family == "sd2":
        components["text_encoder"] = read_open_clip(*found["text_encoder"], penultimate=True, hints=hints)
    else:
        components["text_encoder"] = read_clip(*found["text_encoder"], hints)
    if "text_encoder_2" in found:
        components["text_encoder_2"] = read_open_clip(*found["text_encoder_2"], penultimate=False, hints=hints)
    size = spec.variant_of(family, prediction_type, {}, "").defaults.width  # the image side it was trained at
    vae = read_vae(*found["vae"], spec.latent[family], size, hints)
    projection_dim = components["text_encoder_2"].config["projection_dim"] if "text_encoder_2" in components else None
    components["unet"] = read_unet(*found["unet"], family, projection_dim, hints, size // downscale_factor(vae.config))
    components["vae"] = vae
    if CONTROLNET in found:
        components[CONTROLNET] = read_controlnet(*found[CONTROLNET], hints)
    return OriginalModel(
        family,
        prediction_type,
        {**spec.scheduler, "prediction_type": prediction_type},
        components,
        inpainting=components["unet"].config["in_channels"] == 9,
    )  # latents + mask + masked image


# --- UNet -----------------------------------------------------------------------------------------------

RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
UNET_FIXED_NAMES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "time_embed.cond_proj": "time_embedding.cond_proj",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _resnet(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{RESNET_NAMES.get(module, module)}.{param}"


def unet_key(key: str, layers_per_block: int) -> str | None:
    """An LDM UNet key (prefix removed) -> its diffusers key; None if it is not a UNet weight we know.

    input_blocks: 0 is conv_in, then per level `layers_per_block` [resnet, attention] entries and a
    downsampler; output_blocks: per level `layers_per_block + 1` [resnet, attention, upsampler] entries."""
    module, _, param = key.rpartition(".")
    if module in UNET_FIXED_NAMES:
        return f"{UNET_FIXED_NAMES[module]}.{param}"
    stride = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", key):
        level, layer = divmod(int(m[1]) - 1, stride)
        part, rest = int(m[2]), m[3]
        if layer == layers_per_block and rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        if part == 0:
            return f"down_blocks.{level}.resnets.{layer}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{layer}.{rest}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        part, rest = int(m[1]), m[2]
        return f"mid_block.attentions.0.{rest}" if part == 1 else f"mid_block.resnets.{part // 2}.{_resnet(rest)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", key):
        level, layer = divmod(int(m[1]), stride)
        part, rest = int(m[2]), m[3]
        if rest.startswith("conv."):  # the upsampler: part 1 after a resnet, part 2 after an attention
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
        if part == 0:
            return f"up_blocks.{level}.resnets.{layer}.{_resnet(rest)}"
        return f"up_blocks.{level}.attentions.{layer}.{rest}"
    return None


def _encoder_config(
    unet: Tensors, family: str, text_projection_dim: int | None, hints: ArchitectureHints
) -> dict[str, Any]:
    """The config.json keys a UNet and a ControlNet share: those of the encoder half (time and text-time
    embeddings, conv_in, down and mid blocks), read from LDM weights (prefix removed)."""
    levels = count_distinct(unet, r"input_blocks\.(\d+)\.0\.op\.") + 1
    layers_per_block = (count_distinct(unet, r"input_blocks\.(\d+)\.") - 1 - (levels - 1)) // levels
    first_input = [1 + level * (layers_per_block + 1) for level in range(levels)]
    channels = [unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first_input]
    down_attention = [f"input_blocks.{i}.1.proj_in.weight" in unet for i in first_input]
    depths = [count_distinct(unet, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") or 1 for i in first_input]
    attention = next(i for i, has in zip(first_input, down_attention, strict=True) if has)
    proj_in = unet[f"input_blocks.{attention}.1.proj_in.weight"]  # a 1x1 conv in SD 1.x, a linear in SD 2.x/XL
    if family == "sd1":
        heads: int | list[int] = hints.value("sd1_unet_heads")
    else:
        heads = [max(1, c // hints.value("unet_head_dim")) for c in channels]

    config: dict[str, Any] = {
        "act_fn": "silu",
        "addition_embed_type": None,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": None,
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "class_embed_type": None,
        "cross_attention_dim": unet[f"input_blocks.{attention}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "downsample_padding": 1,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": unet["input_blocks.0.0.weight"].shape[1],
        "layers_per_block": layers_per_block,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": norm_groups(channels, hints),
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "upcast_attention": False,  # diffusers sets it for SD 2.1-v in fp16; shapes cannot tell 2.1 from 2.0
        "use_linear_projection": proj_in.ndim == 2,
    }
    if "label_emb.0.0.weight" in unet:  # SDXL: pooled text embedding + 6 Fourier-embedded size/crop numbers
        adm_channels = unet["label_emb.0.0.weight"].shape[1]
        config.update(
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=adm_channels,
            addition_time_embed_dim=(adm_channels - (text_projection_dim or 0)) // 6,
        )
    return config


def _encoder_guessed(config: dict[str, Any], family: str, hints: ArchitectureHints) -> tuple[Guess, ...]:
    """What a UNet's or ControlNet's config takes from hints not given: near-certain at the released widths."""
    standard = config["block_out_channels"] in RELEASED_UNET_WIDTHS
    heads = "sd1_unet_heads" if family == "sd1" else "unet_head_dim"
    guessed = guess(hints, heads, config, "attention_head_dim", standard)
    return guessed + guess(hints, "norm_num_groups", config, "norm_num_groups", standard)


def unet_config_from_ldm(
    unet: Tensors, family: str, text_projection_dim: int | None, hints: ArchitectureHints, sample_size: int
) -> dict[str, Any]:
    """The diffusers UNet config.json for LDM UNet weights (prefix removed); only their shapes are read.
    `sample_size`: the latent side the model was trained at."""
    config = _encoder_config(unet, family, text_projection_dim, hints)
    stride = config["layers_per_block"] + 1
    up_attention = [
        f"output_blocks.{level * stride}.1.proj_in.weight" in unet for level in range(len(config["block_out_channels"]))
    ]
    cond_proj = unet.get("time_embed.cond_proj.weight")
    return {
        "_class_name": "UNet2DConditionModel",
        **config,
        "attention_type": "default",
        "center_input_sample": False,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_norm": None,
        "dropout": 0.0,
        "dual_cross_attention": False,
        "mid_block_only_cross_attention": None,
        "out_channels": unet["out.2.weight"].shape[0],
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "reverse_transformer_layers_per_block": None,
        "sample_size": sample_size,
        "time_cond_proj_dim": cond_proj.shape[1] if cond_proj is not None else None,  # LCM's guidance input
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
    }


def read_unet(
    tensors: Tensors,
    prefix: str,
    family: str,
    text_projection_dim: int | None,
    hints: ArchitectureHints,
    sample_size: int,
) -> OriginalComponent:
    config = unet_config_from_ldm(strip_prefix(tensors, prefix), family, text_projection_dim, hints, sample_size)
    guessed = _encoder_guessed(config, family, hints)
    return renamed_component(
        tensors, prefix, lambda k: unet_key(k, config["layers_per_block"]), config, "UNet", guessed
    )


# --- ControlNet -----------------------------------------------------------------------------------------


def _hint_convs(controlnet: Tensors) -> list[int]:
    """The positions of the convs in the hint block (an nn.Sequential of convs and SiLUs): 0, 2, ..., 14."""
    return sorted({int(m[1]) for k in controlnet if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k))})


def controlnet_key(key: str, hint_convs: list[int], layers_per_block: int) -> str | None:
    """An LDM ControlNet key (prefix removed) -> its diffusers ControlNetModel key; None if unknown.

    The hint block's first and last convs are diffusers' conv_in and conv_out, the ones between its blocks."""
    module, _, param = key.rpartition(".")
    if m := re.fullmatch(r"input_hint_block\.(\d+)", module):
        position = hint_convs.index(int(m[1]))
        name = {0: "conv_in", len(hint_convs) - 1: "conv_out"}.get(position, f"blocks.{position - 1}")
        return f"controlnet_cond_embedding.{name}.{param}"
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0", module):
        return f"controlnet_down_blocks.{m[1]}.{param}"
    if module == "middle_block_out.0":
        return f"controlnet_mid_block.{param}"
    return unet_key(key, layers_per_block)


def _controlnet_family(controlnet: Tensors) -> str:
    """The base family a lone ControlNet was trained for, which decides its attention heads."""
    if "label_emb.0.0.weight" in controlnet:
        return "sdxl"
    proj_in = next(v for k, v in controlnet.items() if k.endswith(".proj_in.weight"))
    return "sd2" if proj_in.ndim == 2 else "sd1"  # SD 2.x projects with linears, SD 1.x with 1x1 convs


def controlnet_config_from_ldm(controlnet: Tensors, hints: ArchitectureHints) -> dict[str, Any]:
    """The diffusers ControlNetModel config.json for LDM ControlNet weights (prefix removed), from shapes."""
    hint_convs = _hint_convs(controlnet)
    hint = [controlnet[f"input_hint_block.{i}.weight"] for i in hint_convs]
    # conv_in and then every strided block conv (the second of each pair) set the embedding's widths
    embedding_channels = [hint[0].shape[0]] + [conv.shape[0] for conv in hint[2:-1:2]]
    return {
        "_class_name": "ControlNetModel",
        **_encoder_config(controlnet, _controlnet_family(controlnet), hints.value("sdxl_text_projection_dim"), hints),
        "conditioning_channels": hint[0].shape[1],
        "conditioning_embedding_out_channels": embedding_channels,
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }


def read_controlnet(tensors: Tensors, prefix: str, hints: ArchitectureHints) -> OriginalComponent:
    controlnet = strip_prefix(tensors, prefix)
    config = controlnet_config_from_ldm(controlnet, hints)
    hint_convs = _hint_convs(controlnet)
    guessed = _encoder_guessed(config, _controlnet_family(controlnet), hints)
    if config["addition_embed_type"] == "text_time":  # SDXL's: the time ids' width is what the pooled text leaves
        standard = config["projection_class_embeddings_input_dim"] == SDXL_ADM_CHANNELS
        guessed += guess(hints, "sdxl_text_projection_dim", config, "addition_time_embed_dim", standard)
    return renamed_component(
        tensors,
        prefix,
        lambda k: controlnet_key(k, hint_convs, config["layers_per_block"]),
        config,
        "ControlNet",
        guessed,
    )
