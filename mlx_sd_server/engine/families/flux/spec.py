"""FLUX.1 (dev and schnell): CLIP-L and T5-XXL, a rectified-flow transformer, a 16-channel autoencoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.flux import single_file
from mlx_sd_server.engine.families.flux.family import PATCH, T5_MAX_LENGTH, FluxFamily
from mlx_sd_server.engine.families.flux.lora import LORA
from mlx_sd_server.engine.families.flux.mapping import map_flux_transformer_weight
from mlx_sd_server.engine.families.flux.transformer import FluxTransformer2DModel, FluxTransformerConfig
from mlx_sd_server.engine.families.spec import (
    DEFAULT_GUIDANCE,
    Capabilities,
    ComponentSpec,
    Configs,
    Detection,
    FamilySpec,
    LatentFormat,
    ModelDefaults,
    OriginalLayout,
    TextLength,
    Variant,
)
from mlx_sd_server.engine.sampling.samplers import FLOW_SAMPLERS
from mlx_sd_server.engine.sampling.schedules import FLOW_SCHEDULER_SETTINGS, FLOW_SCHEDULES
from mlx_sd_server.engine.text.clip import CLIP_TEXT
from mlx_sd_server.engine.text.t5 import T5_ENCODER
from mlx_sd_server.engine.vae import AUTOENCODER_KL, downscale_factor

TRANSFORMER = ComponentKind(
    ("FluxTransformer2DModel",), FluxTransformerConfig, FluxTransformer2DModel, map_flux_transformer_weight
)


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    """dev (a guidance embedding) ~28 steps with distilled guidance 3.5 and T5 trained on 512 tokens;
    schnell 4 steps and 256 tokens; both without CFG."""
    if configs["transformer"].get("guidance_embeds"):
        return Variant(
            "dev", ModelDefaults(28, 1.0, "euler", "discrete", 1024, 1024, DEFAULT_GUIDANCE), {"text_encoder_2": 512}
        )
    return Variant("schnell", ModelDefaults(4, 1.0, "euler", "discrete", 1024, 1024), {"text_encoder_2": 256})


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    components = manifest["components"]
    return Capabilities(
        family="flux",
        samplers=FLOW_SAMPLERS,
        schedulers=FLOW_SCHEDULES,
        guidance=bool(components["transformer"]["config"].get("guidance_embeds")),
        controlnet=False,
        size_multiple=downscale_factor(components["vae"]["config"]) * PATCH,
        text_length=TextLength.of(manifest, "text_encoder_2", T5_MAX_LENGTH),
    )


SPEC = FamilySpec(
    name="flux",
    manifest_names=("flux",),
    runtime=FluxFamily,
    denoiser="transformer",
    components=(
        ComponentSpec("text_encoder", (CLIP_TEXT,)),
        ComponentSpec("text_encoder_2", (T5_ENCODER,)),
        ComponentSpec("transformer", (TRANSFORMER,)),
        ComponentSpec("vae", (AUTOENCODER_KL,)),
    ),
    parameterization="flow",
    scheduler=FLOW_SCHEDULER_SETTINGS,
    latent={"flux": LatentFormat(16, 0.3611, 0.1159, patch_size=PATCH)},
    variant_of=variant_of,
    capabilities=capabilities,
    detect=Detection(diffusers_classes=("FluxTransformer2DModel",), single_file=single_file.is_single_file, lora=LORA),
    torch_pipelines={"flux": "FluxPipeline"},
    title="FLUX.1",
    original=OriginalLayout(single_file.parts, single_file.read, single_file.EXPECTS, single_file.OPTIONS),
)
