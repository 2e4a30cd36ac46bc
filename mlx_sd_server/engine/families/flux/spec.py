"""FLUX.1 (dev, schnell and Kontext): CLIP-L and T5-XXL, a rectified-flow transformer, a 16-channel autoencoder.

Kontext (kontext.py) is dev's networks run as an instruction-edit model: its input image is read whole beside
the prompt (`references`, one image as FluxKontextPipeline takes), never noised, so it has no img2img (no
`strength`) and no inpainting here (diffusers' FluxKontextInpaintPipeline is another pipeline: not yet).

Fill (fill.py) is dev with a wider transformer input, told apart by its config: it only inpaints, reading the
masked image and the mask as input channels (`inpainting_channels`), so a request needs an image and a mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.flux import single_file
from mlx_sd_server.engine.families.flux.family import PATCH, T5_MAX_LENGTH, FluxFamily
from mlx_sd_server.engine.families.flux.fill import FILL_GUIDANCE, FILL_STEPS, FILL_STRENGTH, fill_channels, is_fill
from mlx_sd_server.engine.families.flux.kontext import KONTEXT_PIPELINE, is_kontext, is_kontext_model
from mlx_sd_server.engine.families.flux.lora import LORA
from mlx_sd_server.engine.families.flux.mapping import map_flux_transformer_weight
from mlx_sd_server.engine.families.flux.transformer import FluxTransformer2DModel, FluxTransformerConfig
from mlx_sd_server.engine.families.spec import (
    DEFAULT_GUIDANCE,
    PIPELINE,
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


KONTEXT_GUIDANCE = 2.5  # FluxKontextPipeline's examples' and BFL's (its __call__ default is dev's 3.5)


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    """dev (a guidance embedding) ~28 steps with distilled guidance 3.5 and T5 trained on 512 tokens;
    Kontext (dev's networks, told apart as kontext.is_kontext says) the same with guidance 2.5; schnell 4
    steps and 256 tokens; all without CFG. Fill (its transformer's config says) as FluxFillPipeline: 50 steps,
    guidance 30, strength 1."""
    if is_fill(configs["transformer"]):
        defaults = ModelDefaults(FILL_STEPS, 1.0, "euler", "discrete", 1024, 1024, FILL_GUIDANCE, FILL_STRENGTH)
        return Variant("fill", defaults, {"text_encoder_2": 512})
    if configs["transformer"].get("guidance_embeds"):
        kontext = is_kontext(configs.get(PIPELINE, {}), name)
        guidance = KONTEXT_GUIDANCE if kontext else DEFAULT_GUIDANCE
        defaults = ModelDefaults(28, 1.0, "euler", "discrete", 1024, 1024, guidance)
        return Variant("kontext" if kontext else "dev", defaults, {"text_encoder_2": 512})
    return Variant("schnell", ModelDefaults(4, 1.0, "euler", "discrete", 1024, 1024), {"text_encoder_2": 256})


def torch_refusal(manifest: Mapping[str, Any]) -> str | None:
    """The torch engine runs FLUX.1 through FluxPipeline and its img2img/inpaint twins, which cannot feed Fill's
    384 input channels (FluxFillPipeline is not wired to it)."""
    if is_fill(manifest["components"]["transformer"]["config"]):
        return "the torch engine does not run FLUX.1 Fill (diffusers' FluxFillPipeline is not wired to it); MLX does"
    return None


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    """Flow samplers and schedules, sides in multiples of the VAE's downscale x the 2x2 patch, T5's length;
    dev and schnell edit by img2img and inpainting, Kontext by instruction (one reference image), Fill only
    inpaints (an image and a mask, always)."""
    components = manifest["components"]
    guidance = bool(components["transformer"]["config"].get("guidance_embeds"))
    fill = is_fill(components["transformer"]["config"])
    kontext = is_kontext_model(manifest)
    return Capabilities(
        family="flux",
        samplers=FLOW_SAMPLERS,
        schedulers=FLOW_SCHEDULES,
        guidance=guidance,
        img2img=not (kontext or fill),
        inpainting=not kontext,
        controlnet=False,
        size_multiple=downscale_factor(components["vae"]["config"]) * PATCH,
        text_length=TextLength.of(manifest, "text_encoder_2", T5_MAX_LENGTH),
        references=1 if kontext else 0,
        mask_required=fill,
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
    detect=Detection(
        diffusers_classes=("FluxTransformer2DModel",),
        single_file=single_file.is_single_file,
        lora=LORA,
        pipelines=(KONTEXT_PIPELINE,),
    ),
    torch_pipelines={"flux": "FluxPipeline"},
    torch_refusal=torch_refusal,
    title="FLUX.1",
    original=OriginalLayout(single_file.parts, single_file.read, single_file.EXPECTS, single_file.OPTIONS),
    inpainting_channels=fill_channels,
)
