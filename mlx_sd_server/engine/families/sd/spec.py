"""Stable Diffusion 1.x, 2.x and XL (and their LCM/Turbo variants): CLIP text encoders, a UNet, a 4-channel VAE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.sd import single_file
from mlx_sd_server.engine.families.sd.controlnet import ControlNetConfig, ControlNetModel
from mlx_sd_server.engine.families.sd.family import StableDiffusionFamily
from mlx_sd_server.engine.families.sd.lora import LORA
from mlx_sd_server.engine.families.sd.mapping import map_unet_weight
from mlx_sd_server.engine.families.sd.unet import UNetConfig, UNetModel
from mlx_sd_server.engine.families.spec import (
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
from mlx_sd_server.engine.text.clip import CLIP_TEXT
from mlx_sd_server.engine.vae import AUTOENCODER_KL, downscale_factor

UNET = ComponentKind(("UNet2DConditionModel",), UNetConfig, UNetModel, map_unet_weight)
# A ControlNet is the UNet's down half plus plain convs, so the UNet's mapping applies unchanged.
CONTROLNET = ComponentKind(("ControlNetModel",), ControlNetConfig, ControlNetModel, map_unet_weight)

# The training schedule every SD 1.x/2.x/XL model shares (single files do not carry it).
BETA_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
NATIVE_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}  # SD 2.x's v-prediction models: 768


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    """Turbo models (by name) take 1 step without CFG; LCM-distilled UNets (a guidance input) 4 steps with
    guidance 8.5; a model named LCM (an LCM-LoRA fused in) 4 steps with little CFG; the rest 20 steps."""
    size = 768 if family == "sd2" and prediction_type == "v_prediction" else NATIVE_SIZE[family]
    lowered = name.lower()
    if "turbo" in lowered:
        return Variant("turbo", ModelDefaults(steps=1, cfg_scale=1.0, sample_method="euler_a", scheduler="trailing"))
    base = ModelDefaults(width=size, height=size)
    if configs.get("unet", {}).get("time_cond_proj_dim"):
        return Variant("lcm", ModelDefaults(4, 8.5, "lcm", "lcm", size, size))
    if "lcm" in lowered:
        return Variant("lcm-lora", ModelDefaults(4, 1.5, "lcm", "lcm", size, size))
    return Variant(family, base)


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    vae = manifest["components"]["vae"]["config"]
    return Capabilities(family=manifest["family"], controlnet=has_controlnet, size_multiple=downscale_factor(vae))


SPEC = FamilySpec(
    name="sd",
    manifest_names=("sd1", "sd2", "sdxl", "controlnet"),  # controlnet: a lone ControlNet, attached at load
    runtime=StableDiffusionFamily,
    denoiser="unet",
    components=(
        ComponentSpec("text_encoder", (CLIP_TEXT,)),
        ComponentSpec("text_encoder_2", (CLIP_TEXT,), required=False),  # SDXL's OpenCLIP bigG
        ComponentSpec("unet", (UNET,)),
        ComponentSpec("vae", (AUTOENCODER_KL,)),
        ComponentSpec("controlnet", (CONTROLNET,), required=False),
    ),
    parameterization=None,  # epsilon or v_prediction, as the model says
    scheduler=BETA_SCHEDULE,
    latent={"sd1": LatentFormat(4, 0.18215), "sd2": LatentFormat(4, 0.18215), "sdxl": LatentFormat(4, 0.13025)},
    variant_of=variant_of,
    capabilities=capabilities,
    detect=Detection(
        diffusers_classes=("UNet2DConditionModel",),
        single_file=single_file.is_single_file,
        lora=LORA,
        diffusers_family=single_file.family_of_configs,
    ),
    open_clip_encoders={"sd2": ("text_encoder",), "sdxl": ("text_encoder_2",)},
    torch_pipelines={
        "sd1": "StableDiffusionPipeline",
        "sd2": "StableDiffusionPipeline",
        "sdxl": "StableDiffusionXLPipeline",
    },
    title="Stable Diffusion",
    original=OriginalLayout(single_file.parts, single_file.read, single_file.EXPECTS),
)
