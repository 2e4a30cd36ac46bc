"""Z-Image (Turbo and base): a Qwen3 text encoder, a single-stream rectified-flow DiT, FLUX.1's autoencoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
from mlx_sd_server.engine.families.zimage import single_file
from mlx_sd_server.engine.families.zimage.family import ZImageFamily
from mlx_sd_server.engine.families.zimage.lora import LORA
from mlx_sd_server.engine.families.zimage.transformer import ZIMAGE_TRANSFORMER, ZImageTransformerConfig
from mlx_sd_server.engine.sampling.samplers import FLOW_SAMPLERS
from mlx_sd_server.engine.sampling.schedules import FLOW_SCHEDULER_SETTINGS, FLOW_SCHEDULES
from mlx_sd_server.engine.text.qwen3 import QWEN3_ENCODER
from mlx_sd_server.engine.vae import AUTOENCODER_KL, downscale_factor

# Turbo: diffusers' example (8 steps, guidance_scale 0: no CFG). Base: ZImagePipeline's defaults, 50 steps and
# guidance_scale 5.0, which is cfg_scale 6 here (diffusers' pos + g(pos - neg) is our neg + (g + 1)(pos - neg)).
TURBO = Variant("turbo", ModelDefaults(8, 1.0, "euler", "discrete", 1024, 1024))
BASE = Variant("base", ModelDefaults(50, 6.0, "euler", "discrete", 1024, 1024))


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    """Turbo and base share their configs (the transformer's, the scheduler's fixed shift), so only the model's
    name tells them apart: Turbo when it says so (as `pull Tongyi-MAI/Z-Image-Turbo` names it), else base."""
    return TURBO if "turbo" in name.lower() else BASE


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    """Sides are multiples of the VAE's downscale times the transformer's patch (16); no ControlNet, no distilled
    guidance embedding; LoRAs on the transformer (lora.py); Qwen3 reads a fixed 512 tokens (no
    `max_sequence_length`, which is T5's)."""
    components = manifest["components"]
    patch = ZImageTransformerConfig.from_dict(components["transformer"]["config"]).patch_size
    return Capabilities(
        family="zimage",
        samplers=FLOW_SAMPLERS,
        schedulers=FLOW_SCHEDULES,
        controlnet=False,
        lora=True,
        size_multiple=downscale_factor(components["vae"]["config"]) * patch,
    )


SPEC = FamilySpec(
    name="zimage",
    manifest_names=("zimage",),
    runtime=ZImageFamily,
    denoiser="transformer",
    components=(
        ComponentSpec("text_encoder", (QWEN3_ENCODER,)),
        ComponentSpec("transformer", (ZIMAGE_TRANSFORMER,)),
        ComponentSpec("vae", (AUTOENCODER_KL,)),
    ),
    parameterization="flow",
    scheduler=FLOW_SCHEDULER_SETTINGS,
    latent={"zimage": LatentFormat(16, 0.3611, 0.1159, patch_size=2)},
    variant_of=variant_of,
    capabilities=capabilities,
    detect=Detection(
        diffusers_classes=("ZImageTransformer2DModel",), single_file=single_file.is_single_file, lora=LORA
    ),
    torch_pipelines={"zimage": "ZImagePipeline"},
    torch_cfg_offset=1.0,
    title="Z-Image",
    original=OriginalLayout(single_file.parts, single_file.read, single_file.EXPECTS, single_file.OPTIONS),
)
