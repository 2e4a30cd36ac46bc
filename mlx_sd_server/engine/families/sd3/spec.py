"""Stable Diffusion 3 and 3.5: CLIP-L, CLIP-G and (optionally) T5-XXL, an MMDiT, a 16-channel VAE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.sd3 import single_file
from mlx_sd_server.engine.families.sd3.family import T5_MAX_LENGTH, SD3Family
from mlx_sd_server.engine.families.sd3.lora import LORA
from mlx_sd_server.engine.families.sd3.mapping import map_sd3_transformer_weight
from mlx_sd_server.engine.families.sd3.transformer import SD3Transformer2DModel, SD3TransformerConfig
from mlx_sd_server.engine.families.spec import (
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
    ("SD3Transformer2DModel",), SD3TransformerConfig, SD3Transformer2DModel, map_sd3_transformer_weight
)
# (steps, cfg) from the model cards' examples. The transformer's config tells the releases apart (SD3.5
# normalises queries and keys, only SD3.5-medium has MMDiT-X dual attention); large-turbo, whose config is
# large's, only by its name.
RELEASES = {"sd3-medium": (28, 7.0), "sd3.5-medium": (40, 4.5), "sd3.5-large": (28, 3.5), "sd3.5-large-turbo": (4, 1.0)}


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    config = configs["transformer"]
    release = (
        "sd3.5-large-turbo"
        if "turbo" in name.lower()
        else "sd3-medium"
        if not config.get("qk_norm")
        else "sd3.5-medium"
        if config.get("dual_attention_layers")
        else "sd3.5-large"
    )
    steps, cfg_scale = RELEASES[release]
    return Variant(
        release, ModelDefaults(steps, cfg_scale, "euler", "discrete", 1024, 1024), {"text_encoder_3": T5_MAX_LENGTH}
    )


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    """Sides are multiples of the VAE's downscale times the patch; the transformer has position embeddings
    for at most pos_embed_max_size patches a side. A model without T5 takes `max_sequence_length` too, as
    diffusers' pipeline does with text_encoder_3=None: it is the length of the zeros read in T5's place."""
    components = manifest["components"]
    transformer = components["transformer"]["config"]
    patch_pixels = downscale_factor(components["vae"]["config"]) * transformer.get("patch_size", 2)
    largest = transformer.get("pos_embed_max_size", SD3TransformerConfig.pos_embed_max_size)
    return Capabilities(
        family="sd3",
        samplers=FLOW_SAMPLERS,
        schedulers=FLOW_SCHEDULES,
        controlnet=False,
        size_multiple=patch_pixels,
        largest_side=patch_pixels * largest if largest else None,
        text_length=TextLength.of(manifest, "text_encoder_3", T5_MAX_LENGTH),
    )


SPEC = FamilySpec(
    name="sd3",
    manifest_names=("sd3",),
    runtime=SD3Family,
    denoiser="transformer",
    components=(
        ComponentSpec("text_encoder", (CLIP_TEXT,)),
        ComponentSpec("text_encoder_2", (CLIP_TEXT,)),
        ComponentSpec("text_encoder_3", (T5_ENCODER,), required=False),
        ComponentSpec("transformer", (TRANSFORMER,)),
        ComponentSpec("vae", (AUTOENCODER_KL,)),
    ),
    parameterization="flow",
    scheduler=FLOW_SCHEDULER_SETTINGS,
    latent={"sd3": LatentFormat(16, 1.5305, 0.0609, patch_size=2)},
    variant_of=variant_of,
    capabilities=capabilities,
    detect=Detection(diffusers_classes=("SD3Transformer2DModel",), single_file=single_file.is_single_file, lora=LORA),
    open_clip_encoders={"sd3": ("text_encoder_2",)},
    optional_text_encoders=("text_encoder_3",),
    title="SD3/SD3.5",
    original=OriginalLayout(single_file.parts, single_file.read, single_file.EXPECTS, single_file.OPTIONS),
)
