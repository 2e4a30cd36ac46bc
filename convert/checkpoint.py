"""Single-file checkpoints in the original layout (CompVis/LDM for SD 1.x/2.x, Stability's SGM for SDXL).

These are the `.safetensors` files A1111, ComfyUI, CivitAI and stable-diffusion.cpp users have: one state dict
holding every component under its original names. We rename them to diffusers/transformers names and infer
each component's config.json from tensor shapes, so the result looks exactly like a diffusers folder and goes
through the same per-component MLX mappings.

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

import json
import math
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from convert.source import PickleRefusedError, SourceModel, read_pickle

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".gguf") + PICKLE_SUFFIXES

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
CONTROLNET_PREFIX = "control_model."
CONTROLNET_MARKER = "input_hint_block.0.weight"  # the control image's first conv: only ControlNets have it

# The training schedule every SD 1.x/2.x/XL model shares (single files do not carry it).
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
DEFAULT_IMAGE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024, "flux": 1024, "sd3": 1024}
VAE_SCALING_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "flux": 0.3611, "sd3": 1.5305}
VAE_SHIFT_FACTOR = {"flux": 0.1159, "sd3": 0.0609}  # latents = (mean - shift) * scale; SD's VAEs have no shift
PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                    "v-prediction": "v_prediction"}


class CheckpointError(ValueError):
    """A file that is not a usable single-file SD checkpoint; the message says why, for the user."""


@dataclass(frozen=True)
class ArchitectureHints:
    """The hyperparameters tensor shapes cannot tell. Defaults are those of every released SD 1.x/2.x/XL model;
    tests pass others for their tiny models. Narrow models get as many heads and groups as their widths allow."""

    sd1_unet_heads: int = 8  # SD 1.x: a fixed number of heads per attention layer
    unet_head_dim: int = 64  # SD 2.x and SDXL: a fixed head size
    text_head_dim: int = 64  # CLIP ViT-L, OpenCLIP ViT-H and bigG
    norm_num_groups: int = 32  # UNet and VAE group norms
    # SDXL's pooled text embedding (OpenCLIP bigG's projection): a lone ControlNet has no text encoder to read
    # it from, and the time-id embedding's width is the rest of its label_emb input.
    sdxl_text_projection_dim: int = 1280


@dataclass
class DiffusersComponents:
    """A single-file checkpoint in diffusers layout: per component, (config.json dict, state dict)."""

    family: str  # sd1 | sd2 | sdxl | controlnet (a lone ControlNet)
    prediction_type: str  # epsilon | v_prediction
    inpainting: bool
    components: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=dict)


# --- reading files ------------------------------------------------------------------------------------

def read_state_dict(path: Path, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw tensors (MLX arrays, numpy from a pickle, GGUF tensors read when used) and the metadata of a
    checkpoint (safetensors' metadata, GGUF's string fields)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from convert.gguf_source import read_gguf

        return read_gguf(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefusedError(path)
        try:
            return read_pickle(path), {}
        except Exception as err:  # torch's errors for corrupt or non-tensor pickles are long and deep
            raise CheckpointError(f"cannot read {path} as a torch checkpoint: {err}") from err
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: unknown checkpoint format (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")
    metadata = _safetensors_metadata(path)
    import mlx.core as mx  # reads bfloat16, which numpy cannot

    try:
        return mx.load(str(path)), metadata
    except Exception as err:
        raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """Check the header against the file size (a partial download is common) and return its metadata."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (corrupt or truncated header)")
        try:
            header = json.loads(f.read(header_len))
            data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header: {err})") from None
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + header_len + data_end} bytes, the file has {size}. "
            "Download it again."
        )
    return header.get("__metadata__") or {}


def _float32(value: Any) -> np.ndarray:
    if hasattr(value, "dequantize"):  # a GGUF tensor (convert.gguf_source), read now
        value = value.dequantize()
    if not isinstance(value, np.ndarray):  # an MLX array
        import mlx.core as mx

        value = np.array(value.astype(mx.float32))
    return value.astype(np.float32, copy=False)


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --- family and prediction type -----------------------------------------------------------------------

def detect_family(keys: set[str]) -> str:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET_PREFIX) or not has(VAE_PREFIX):
        raise CheckpointError(
            "not a full Stable Diffusion checkpoint: expected a UNet (model.diffusion_model.*) and a VAE "
            "(first_stage_model.*), or a ControlNet (control_model.*)"
            + (f"; it has keys like {sorted(keys)[:3]}" if keys else "; it is empty")
        )
    if has(SDXL_CLIP_PREFIX) and has(SDXL_OPEN_CLIP_PREFIX):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise CheckpointError("SDXL refiner checkpoints are not supported (only base SD 1.x, 2.x and XL models)")
    if has(SD2_OPEN_CLIP_PREFIX):
        return "sd2"
    if has(SD1_CLIP_PREFIX):
        return "sd1"
    raise CheckpointError("unrecognised text encoder: expected SD 1.x (CLIP), SD 2.x (OpenCLIP) or SDXL keys")


def detect_prediction_type(family: str, metadata: dict[str, str], keys: set[str], explicit: str | None) -> str:
    """The explicit choice, else what the file says, else the family's usual (SD 2.x: v, with a warning)."""
    if explicit is not None:
        return _normalise_prediction_type(explicit, "the prediction_type argument")
    if "modelspec.prediction_type" in metadata:
        return _normalise_prediction_type(metadata["modelspec.prediction_type"], "modelspec.prediction_type")
    if metadata.get("ss_v_parameterization", "").lower() == "true" or "v_pred" in keys:  # kohya / ComfyUI markers
        return "v_prediction"
    if family == "sd2":
        log.warning(
            "this SD 2.x checkpoint does not say whether it predicts v or epsilon; assuming v_prediction (the "
            "768-v models). For a 512-base model pass --prediction-type epsilon."
        )
        return "v_prediction"
    return "epsilon"


def _normalise_prediction_type(value: str, source: str) -> str:
    try:
        return PREDICTION_TYPES[value.strip().lower()]
    except KeyError:
        raise CheckpointError(f"{source}: unknown prediction type {value!r} (epsilon or v_prediction)") from None


# --- UNet -----------------------------------------------------------------------------------------------

RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
UNET_FIXED_NAMES = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                    "time_embed.cond_proj": "time_embedding.cond_proj", "label_emb.0.0": "add_embedding.linear_1",
                    "label_emb.0.2": "add_embedding.linear_2", "input_blocks.0.0": "conv_in",
                    "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{RESNET_NAMES.get(module, module)}.{param}"


def _unet_key(key: str, layers_per_block: int) -> str | None:
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


def _norm_groups(channels: list[int], hints: ArchitectureHints) -> int:
    return math.gcd(hints.norm_num_groups, *channels)


def _count(keys: set[str], pattern: str) -> int:
    """How many distinct values the single group of `pattern` takes over `keys`."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def _encoder_config(unet: dict[str, Any], family: str, text_projection_dim: int | None,
                    hints: ArchitectureHints) -> dict[str, Any]:
    """The config.json keys a UNet and a ControlNet share: those of the encoder half (time and text-time
    embeddings, conv_in, down and mid blocks), read from LDM weights (prefix removed)."""
    keys = set(unet)
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.") + 1
    layers_per_block = (_count(keys, r"input_blocks\.(\d+)\.") - 1 - (levels - 1)) // levels
    first_input = [1 + level * (layers_per_block + 1) for level in range(levels)]
    channels = [unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first_input]
    down_attention = [f"input_blocks.{i}.1.proj_in.weight" in unet for i in first_input]
    depths = [_count(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") or 1 for i in first_input]
    attention = next(i for i, has in zip(first_input, down_attention) if has)
    proj_in = unet[f"input_blocks.{attention}.1.proj_in.weight"]  # a 1x1 conv in SD 1.x, a linear in SD 2.x/XL
    if family == "sd1":
        heads: int | list[int] = hints.sd1_unet_heads
    else:
        heads = [max(1, c // hints.unet_head_dim) for c in channels]

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
        "norm_num_groups": _norm_groups(channels, hints),
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


def unet_config_from_ldm(unet: dict[str, Any], family: str, text_projection_dim: int | None,
                         hints: ArchitectureHints) -> dict[str, Any]:
    """The diffusers UNet config.json for LDM UNet weights (prefix removed); only their shapes are read."""
    config = _encoder_config(unet, family, text_projection_dim, hints)
    stride = config["layers_per_block"] + 1
    up_attention = [f"output_blocks.{level * stride}.1.proj_in.weight" in unet
                    for level in range(len(config["block_out_channels"]))]
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
        "sample_size": DEFAULT_IMAGE_SIZE[family] // 8,
        "time_cond_proj_dim": cond_proj.shape[1] if cond_proj is not None else None,  # LCM's guidance input
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
    }


def convert_unet(unet: dict[str, Any], family: str, text_projection_dim: int | None,
                 hints: ArchitectureHints) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = unet_config_from_ldm(unet, family, text_projection_dim, hints)
    return config, _rename(unet, lambda k: _unet_key(k, config["layers_per_block"]), "UNet")


def _rename(state: dict[str, Any], rename: Callable[[str], str | None], component: str) -> dict[str, np.ndarray]:
    out, unknown = {}, []
    for key, value in state.items():
        new_key = rename(key)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = _float32(value)
    if unknown:
        log.warning("ignoring %d unrecognised %s weights, e.g. %s", len(unknown), component, unknown[:3])
    return out


# --- VAE ------------------------------------------------------------------------------------------------

VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_SAME_NAMES = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
                  "post_quant_conv"}


def _vae_key(key: str, levels: int) -> str | None:
    """An LDM VAE key -> its diffusers key. The decoder's `up` levels are numbered from the bottom."""
    module, _, param = key.rpartition(".")
    if module in VAE_SAME_NAMES:
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out", module):
        return f"{m[1]}.conv_norm_out.{param}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block\.\d+|downsample)\.(.+)", module):
        inner = m[2].replace("block.", "resnets.").replace("downsample", "downsamplers.0")
        return f"encoder.down_blocks.{m[1]}.{inner}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{param}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block\.\d+|upsample)\.(.+)", module):
        inner = m[2].replace("block.", "resnets.").replace("upsample", "upsamplers.0")
        level = levels - 1 - int(m[1])
        return f"decoder.up_blocks.{level}.{inner}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", module):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{param}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", module)) and m[2] in VAE_ATTENTION_NAMES:
        return f"{m[1]}.mid_block.attentions.0.{VAE_ATTENTION_NAMES[m[2]]}.{param}"
    return None


def vae_config_from_ldm(vae: dict[str, Any], family: str, hints: ArchitectureHints) -> dict[str, Any]:
    """The diffusers AutoencoderKL config.json for LDM VAE weights (prefix removed); only their shapes are read."""
    keys = set(vae)
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    channels = [vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": vae["encoder.conv_in.weight"].shape[1],
        "latent_channels": vae["decoder.conv_in.weight"].shape[1],
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": _count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
        "norm_num_groups": _norm_groups(channels, hints),
        "out_channels": vae["decoder.conv_out.weight"].shape[0],
        "sample_size": DEFAULT_IMAGE_SIZE[family],
        "scaling_factor": VAE_SCALING_FACTOR[family],
        "shift_factor": VAE_SHIFT_FACTOR.get(family),
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "use_quant_conv": "quant_conv.weight" in vae,
    }


def convert_vae(vae: dict[str, Any], family: str,
                hints: ArchitectureHints) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = vae_config_from_ldm(vae, family, hints)
    levels = len(config["block_out_channels"])
    state = _rename(vae, lambda k: _vae_key(k, levels), "VAE")
    for key, value in state.items():  # attention projections stored as 1x1 convolutions -> linear weights
        if ".mid_block.attentions." in key and value.ndim == 4:
            state[key] = value[:, :, 0, 0]
    return config, state


# --- ControlNet -----------------------------------------------------------------------------------------

def _hint_convs(controlnet: dict[str, Any]) -> list[int]:
    """The positions of the convs in the hint block (an nn.Sequential of convs and SiLUs): 0, 2, ..., 14."""
    return sorted({int(m[1]) for k in controlnet if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k))})


def _controlnet_key(key: str, hint_convs: list[int], layers_per_block: int) -> str | None:
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
    return _unet_key(key, layers_per_block)


def _controlnet_family(controlnet: dict[str, Any]) -> str:
    """The base family a lone ControlNet was trained for, which decides its attention heads."""
    if "label_emb.0.0.weight" in controlnet:
        return "sdxl"
    proj_in = next(v for k, v in controlnet.items() if k.endswith(".proj_in.weight"))
    return "sd2" if proj_in.ndim == 2 else "sd1"  # SD 2.x projects with linears, SD 1.x with 1x1 convs


def controlnet_config_from_ldm(controlnet: dict[str, Any], hints: ArchitectureHints) -> dict[str, Any]:
    """The diffusers ControlNetModel config.json for LDM ControlNet weights (prefix removed), from shapes."""
    hint_convs = _hint_convs(controlnet)
    hint = [controlnet[f"input_hint_block.{i}.weight"] for i in hint_convs]
    # conv_in and then every strided block conv (the second of each pair) set the embedding's widths
    embedding_channels = [hint[0].shape[0]] + [conv.shape[0] for conv in hint[2:-1:2]]
    return {
        "_class_name": "ControlNetModel",
        **_encoder_config(controlnet, _controlnet_family(controlnet), hints.sdxl_text_projection_dim, hints),
        "conditioning_channels": hint[0].shape[1],
        "conditioning_embedding_out_channels": embedding_channels,
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }


def convert_controlnet(controlnet: dict[str, Any],
                       hints: ArchitectureHints) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = controlnet_config_from_ldm(controlnet, hints)
    hint_convs = _hint_convs(controlnet)
    return config, _rename(controlnet, lambda k: _controlnet_key(k, hint_convs, config["layers_per_block"]),
                           "ControlNet")


def _controlnet_weights(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's ControlNet weights, prefix removed: under control_model., or the whole file when it is
    a bare ControlNet state dict; None when it has no ControlNet."""
    controlnet = _strip(raw, CONTROLNET_PREFIX)
    if CONTROLNET_MARKER in controlnet:
        return controlnet
    return raw if CONTROLNET_MARKER in raw else None


# --- text encoders --------------------------------------------------------------------------------------

def _text_config(state: dict[str, np.ndarray], hidden_act: str, pad_token_id: int | None, with_projection: bool,
                 hints: ArchitectureHints) -> dict[str, Any]:
    vocab_size, hidden_size = state["text_model.embeddings.token_embedding.weight"].shape
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab_size - 2,  # <|startoftext|>, <|endoftext|>: the last two entries of CLIP's vocabulary
        "eos_token_id": vocab_size - 1,
        "hidden_act": hidden_act,
        "hidden_size": hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0],
        "model_type": "clip_text_model",
        "num_attention_heads": max(1, hidden_size // hints.text_head_dim),
        "num_hidden_layers": _count(set(state), r"text_model\.encoder\.layers\.(\d+)\."),
        "pad_token_id": vocab_size - 1 if pad_token_id is None else pad_token_id,
        "projection_dim": state["text_projection.weight"].shape[0] if "text_projection.weight" in state
        else hidden_size,
        "vocab_size": vocab_size,
    }


def convert_clip(clip: dict[str, Any], hints: ArchitectureHints) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """OpenAI CLIP ViT-L (SD 1.x, SDXL's first encoder): already transformers names; it pads with <|endoftext|>."""
    state = {k: _float32(v) for k, v in clip.items() if not k.endswith("position_ids")}
    return _text_config(state, "quick_gelu", None, with_projection=False, hints=hints), state


OPEN_CLIP_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def convert_open_clip(clip: dict[str, Any], penultimate: bool,
                      hints: ArchitectureHints) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """OpenCLIP (SD 2.x's ViT-H, SDXL's bigG) -> transformers CLIP names; it pads with "!" (id 0).

    SD 2.x uses the penultimate layer's output, so diffusers drops the last layer and the projection;
    SDXL's second encoder keeps both (its pooled, projected output conditions the UNet)."""
    layers = _count(set(clip), r"transformer\.resblocks\.(\d+)\.")
    state: dict[str, np.ndarray] = {
        "text_model.embeddings.token_embedding.weight": _float32(clip["token_embedding.weight"]),
        "text_model.embeddings.position_embedding.weight": _float32(clip["positional_embedding"]),
        "text_model.final_layer_norm.weight": _float32(clip["ln_final.weight"]),
        "text_model.final_layer_norm.bias": _float32(clip["ln_final.bias"]),
    }
    if not penultimate:
        state["text_projection.weight"] = _float32(clip["text_projection"]).T.copy()  # x @ P -> Linear(P.T)
    for i in range(layers - 1 if penultimate else layers):
        source, target = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for old, new in OPEN_CLIP_NAMES.items():
            for param in ("weight", "bias"):
                state[f"{target}{new}.{param}"] = _float32(clip[f"{source}{old}.{param}"])
        for param in ("weight", "bias"):  # one packed q/k/v projection -> three
            packed = _float32(clip[f"{source}attn.in_proj_{param}"])
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(packed, 3)):
                state[f"{target}self_attn.{name}.{param}"] = part
    config = _text_config(state, "gelu", 0, with_projection=not penultimate, hints=hints)
    return config, state


# --- the whole checkpoint -------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, allow_pickle: bool = False, prediction_type: str | None = None,
                    hints: ArchitectureHints = ArchitectureHints()) -> DiffusersComponents:
    """Read a single-file SD 1.x/2.x/XL checkpoint or ControlNet into diffusers-layout configs and float32
    state dicts.

    Pickle files (.ckpt/.pt/.bin) are refused unless `allow_pickle`; `prediction_type` overrides the file."""
    raw, metadata = read_state_dict(Path(path), allow_pickle)
    controlnet = _controlnet_weights(raw)
    if controlnet is not None and not any(k.startswith(UNET_PREFIX) for k in raw):  # a lone ControlNet
        return DiffusersComponents(family="controlnet", prediction_type="epsilon", inpainting=False,
                                   components={"controlnet": convert_controlnet(controlnet, hints)})
    keys = set(raw)
    family = detect_family(keys)
    result = DiffusersComponents(
        family=family,
        prediction_type=detect_prediction_type(family, metadata, keys, prediction_type),
        inpainting=False,
    )
    components = result.components
    if family == "sd1":
        components["text_encoder"] = convert_clip(_strip(raw, SD1_CLIP_PREFIX), hints)
    elif family == "sd2":
        components["text_encoder"] = convert_open_clip(_strip(raw, SD2_OPEN_CLIP_PREFIX), True, hints)
    else:
        components["text_encoder"] = convert_clip(_strip(raw, SDXL_CLIP_PREFIX), hints)
        components["text_encoder_2"] = convert_open_clip(_strip(raw, SDXL_OPEN_CLIP_PREFIX), False, hints)
    projection_dim = components["text_encoder_2"][0]["projection_dim"] if family == "sdxl" else None
    components["unet"] = convert_unet(_strip(raw, UNET_PREFIX), family, projection_dim, hints)
    components["vae"] = convert_vae(_strip(raw, VAE_PREFIX), family, hints)
    if controlnet is not None:  # the original ControlNet training files hold the base model too
        components["controlnet"] = convert_controlnet(controlnet, hints)
    result.inpainting = components["unet"][0]["in_channels"] == 9  # latents + mask + masked-image latents
    return result


def read_checkpoint(path: str | Path, allow_pickle: bool = False, prediction_type: str | None = None,
                    hints: ArchitectureHints = ArchitectureHints()) -> SourceModel:
    """`load_checkpoint` as the conversion pipeline's `SourceModel` (single files carry no tokenizer)."""
    checkpoint = load_checkpoint(path, allow_pickle=allow_pickle, prediction_type=prediction_type, hints=hints)
    return SourceModel(
        family=checkpoint.family,
        prediction_type=checkpoint.prediction_type,
        scheduler={**SCHEDULER, "prediction_type": checkpoint.prediction_type},
        components={name: (config, state.items()) for name, (config, state) in checkpoint.components.items()},
    )
