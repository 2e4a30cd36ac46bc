"""Qwen-Image: Qwen2.5-VL (7B) as its text encoder, a 20B dual-stream MMDiT, the Wan-style autoencoder.

txt2img, img2img and inpainting as diffusers' QwenImagePipeline, QwenImageImg2ImgPipeline and
QwenImageInpaintPipeline run them (family.py); the edit models (Qwen-Image-Edit, -Edit-2509/2511) as
QwenImageEditPipeline and QwenImageEditPlusPipeline (edit.py); from diffusers folders or the split files ComfyUI
users have (single_file.py). Not yet: the edit models' inpainting, ControlNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_sd_server.engine.families.qwenimage import single_file
from mlx_sd_server.engine.families.qwenimage.edit import EDIT_PIPELINE, EDIT_PLUS_PIPELINE, REFERENCES, edit_kind
from mlx_sd_server.engine.families.qwenimage.family import PATCH, QwenImageFamily
from mlx_sd_server.engine.families.qwenimage.lora import LORA
from mlx_sd_server.engine.families.qwenimage.transformer import QWENIMAGE_TRANSFORMER
from mlx_sd_server.engine.families.qwenimage.vae import AUTOENCODER_KL_QWENIMAGE, QwenImageVAEConfig
from mlx_sd_server.engine.families.runtime import nearest_mask
from mlx_sd_server.engine.families.spec import (
    PIPELINE,
    Capabilities,
    ComponentSpec,
    Configs,
    Detection,
    FamilySpec,
    LatentFormat,
    ModelDefaults,
    OriginalLayout,
    Variant,
)
from mlx_sd_server.engine.sampling.samplers import FLOW_SAMPLERS
from mlx_sd_server.engine.sampling.schedules import FLOW_SCHEDULER_SETTINGS, FLOW_SCHEDULES
from mlx_sd_server.engine.source import CheckpointError
from mlx_sd_server.engine.text.qwen25vl import QWEN25VL_ENCODER

# The released scheduler's settings beyond FLUX.1's: the sigmas stretched to end at shift_terminal, and the
# exponential time shift (the only one family.py computes).
SCHEDULER = {**FLOW_SCHEDULER_SETTINGS, "shift_terminal": None, "time_shift_type": "exponential"}

# The model card's: 50 steps, true CFG 4, its 1:1 size (1328 x 1328; diffusers' own default is 1024 x 1024).
QWEN_IMAGE = Variant("qwen-image", ModelDefaults(50, 4.0, "euler", "discrete", 1328, 1328))
# QwenImageEdit(Plus)Pipeline's: 50 steps, true CFG 4; without a size an edit keeps its input's aspect ratio
EDITS = {kind: Variant(kind, ModelDefaults(50, 4.0, "euler", "discrete", 1024, 1024)) for kind in REFERENCES}


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    """Qwen-Image, or an edit model as edit.py's `edit_kind` tells them; refuses a scheduler whose time shift
    family.py does not compute."""
    shift = configs.get("scheduler", {}).get("time_shift_type", "exponential")
    if shift != "exponential":
        raise CheckpointError(f"Qwen-Image: a scheduler with time_shift_type {shift!r} is not supported")
    kind = edit_kind(configs.get(PIPELINE, {}), name)
    return QWEN_IMAGE if kind is None else EDITS[kind]


def torch_refusal(manifest: Mapping[str, Any]) -> str | None:
    """The torch engine runs Qwen-Image on QwenImage(Img2Img|Inpaint)Pipeline; the edit models' pipelines take
    their images in ways it does not pass yet."""
    kind = edit_kind(manifest.get(PIPELINE, {}), manifest.get("name", ""))
    return None if kind is None else "the torch engine does not run the Qwen-Image edit models (the MLX engine does)"


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    """Sides are multiples of the VAE's downscale times the 2x2 patch (16); flow samplers and schedules;
    Qwen-Image edits by img2img and inpainting, the edit models by instruction (edit.REFERENCES images; their
    inpainting pipeline is not here yet); LoRAs on the transformer (lora.py); no ControlNet, no guidance
    embedding, no `max_sequence_length` (T5's field: Qwen2.5-VL reads up to 512 prompt tokens)."""
    kind = edit_kind(manifest.get(PIPELINE, {}), manifest.get("name", ""))
    return Capabilities(
        family="qwenimage",
        samplers=FLOW_SAMPLERS,
        schedulers=FLOW_SCHEDULES,
        img2img=kind is None,
        inpainting=kind is None,
        controlnet=False,
        lora=True,
        references=0 if kind is None else REFERENCES[kind],
        size_multiple=QwenImageVAEConfig.from_dict(manifest["components"]["vae"]["config"]).latent_scale * PATCH,
    )


SPEC = FamilySpec(
    name="qwenimage",
    manifest_names=("qwenimage",),
    runtime=QwenImageFamily,
    denoiser="transformer",
    components=(
        ComponentSpec("text_encoder", (QWEN25VL_ENCODER,)),
        ComponentSpec("transformer", (QWENIMAGE_TRANSFORMER,)),
        ComponentSpec("vae", (AUTOENCODER_KL_QWENIMAGE,)),
    ),
    parameterization="flow",
    scheduler=SCHEDULER,
    # 16 channels; the autoencoder's per-channel mean and std (in its config) normalise them (vae.py)
    latent={"qwenimage": LatentFormat(16, 1.0, 0.0, patch_size=PATCH)},
    variant_of=variant_of,
    capabilities=capabilities,
    latent_mask=nearest_mask,
    low_memory_unreads_denoiser=True,  # 20B at 4 bits (~11.5 GB) and Qwen2.5-VL (~4.8 GB) exceed a 16 GB Mac
    detect=Detection(
        diffusers_classes=("QwenImageTransformer2DModel",),
        single_file=single_file.is_single_file,
        lora=LORA,
        pipelines=(EDIT_PIPELINE, EDIT_PLUS_PIPELINE),
    ),
    torch_pipelines={"qwenimage": "QwenImagePipeline"},
    torch_refusal=torch_refusal,
    title="Qwen-Image",
    original=OriginalLayout(single_file.parts, single_file.read, single_file.EXPECTS, single_file.OPTIONS),
)
