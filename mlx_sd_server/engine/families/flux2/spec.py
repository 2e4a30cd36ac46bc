"""FLUX.2 klein (4B, 9B; distilled and base): Qwen3, the FLUX.2 transformer, the FLUX.2 autoencoder.

What it cannot do yet, and why:
- img2img and inpainting: diffusers has no klein img2img pipeline (Flux2KleinPipeline's `image` is reference
  images for edits), and Flux2KleinInpaintPipeline feeds the source image to the transformer as reference
  tokens besides noising it (and blends with a bilinear, not max-pooled, mask): the reference-image input
  (the instruction-editing issue) comes first, so the shared pipeline's img2img and inpainting are refused.
- LoRAs (no FLUX.2 LoRA rules yet), ControlNet (none exists), `max_sequence_length` (Qwen3 reads a fixed 512
  tokens, as for Z-Image), single files (recognised, then refused: diffusers folders only).
- FLUX.2 dev (a guidance embedding, a Mistral text encoder): refused at conversion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.flux2.family import HIDDEN_LAYERS, Flux2Family, is_distilled
from mlx_sd_server.engine.families.flux2.lora import LORA
from mlx_sd_server.engine.families.flux2.mapping import map_flux2_transformer_weight
from mlx_sd_server.engine.families.flux2.transformer import Flux2Transformer2DModel, Flux2TransformerConfig
from mlx_sd_server.engine.families.spec import (
    PIPELINE,
    Capabilities,
    ComponentSpec,
    Configs,
    Detection,
    FamilySpec,
    LatentFormat,
    ModelDefaults,
    Variant,
)
from mlx_sd_server.engine.sampling.samplers import FLOW_SAMPLERS
from mlx_sd_server.engine.sampling.schedules import FLOW_SCHEDULER_SETTINGS, FLOW_SCHEDULES
from mlx_sd_server.engine.source import CheckpointError
from mlx_sd_server.engine.text.qwen3 import QWEN3_ENCODER
from mlx_sd_server.engine.vae import AUTOENCODER_KL_FLUX2, Flux2VAEConfig, downscale_factor

TRANSFORMER = ComponentKind(
    ("Flux2Transformer2DModel",), Flux2TransformerConfig, Flux2Transformer2DModel, map_flux2_transformer_weight
)
PATCH = Flux2VAEConfig.patch_size[0]  # the pipelines cut the autoencoder's latents into 2x2 patches

# The released klein scheduler's settings where a folder has none: dynamic shifting, mu by FLUX.2's empirical
# rule (Flux2KleinPipeline's compute_empirical_mu), not FLUX.1's linear one.
SCHEDULER = {**FLOW_SCHEDULER_SETTINGS, "shift": 3.0, "use_dynamic_shifting": True, "mu_rule": "empirical"}

# Flux2KleinPipeline's defaults: step-distilled 4 steps without CFG; base 50 steps with CFG 4.
DISTILLED = Variant("distilled", ModelDefaults(4, 1.0, "euler", "discrete", 1024, 1024))
BASE = Variant("base", ModelDefaults(50, 4.0, "euler", "discrete", 1024, 1024))

# A FLUX.2 transformer in Black Forest Labs' layout (ComfyUI's files, bare or under its prefix): diffusers'
# own test for a FLUX.2 file. FLUX.1's files share `double_blocks.`, so FLUX.2 is asked first.
SINGLE_FILE_MARKER = "single_stream_modulation.lin.weight"
COMFYUI_PREFIX = "model.diffusion_model."


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    """Distilled or base, as the pipeline's `is_distilled` says (by name without one). Refuses what klein's
    pipeline would not run: a guidance embedding (FLUX.2 dev, whose text encoder is Mistral), or a Qwen3
    too shallow for the hidden states klein stacks."""
    if configs["transformer"].get("guidance_embeds", True):  # (diffusers' default: FLUX.2 dev's)
        raise CheckpointError(
            "this FLUX.2 transformer has a guidance embedding (FLUX.2 dev): only FLUX.2 klein models are supported"
        )
    layers = configs.get("text_encoder", {}).get("num_hidden_layers")
    if layers is not None and layers < max(HIDDEN_LAYERS):
        raise CheckpointError(
            f"FLUX.2 klein stacks Qwen3's hidden states {HIDDEN_LAYERS}, and this text encoder has {layers} layers"
        )
    return DISTILLED if is_distilled(configs.get(PIPELINE, {}), name) else BASE


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    """Sides are multiples of the VAE's downscale times the 2x2 patch (16); flow samplers and schedules; no
    img2img or inpainting yet, no ControlNet, no guidance embedding, no LoRAs (see the module docstring)."""
    vae = manifest["components"]["vae"]["config"]
    return Capabilities(
        family="flux2",
        samplers=FLOW_SAMPLERS,
        schedulers=FLOW_SCHEDULES,
        img2img=False,
        inpainting=False,
        controlnet=False,
        lora=False,
        size_multiple=downscale_factor(vae) * Flux2VAEConfig.from_dict(vae).patch_size[0],
    )


def is_single_file(names: Iterable[str]) -> bool:
    """A FLUX.2 transformer in its original layout: recognised, so that FLUX.1 does not take it, and refused
    (no `original` layout yet)."""
    return any(name.removeprefix(COMFYUI_PREFIX) == SINGLE_FILE_MARKER for name in names)


SPEC = FamilySpec(
    name="flux2",
    manifest_names=("flux2",),
    runtime=Flux2Family,
    denoiser="transformer",
    components=(
        ComponentSpec("text_encoder", (QWEN3_ENCODER,)),
        ComponentSpec("transformer", (TRANSFORMER,)),
        ComponentSpec("vae", (AUTOENCODER_KL_FLUX2,)),
    ),
    parameterization="flow",
    scheduler=SCHEDULER,
    # The autoencoder's 32 channels, no scale or shift: its batch-norm statistics (in its weights) normalise
    # the 2x2-patchified latents (128 channels) instead.
    latent={"flux2": LatentFormat(32, 1.0, 0.0, patch_size=PATCH)},
    variant_of=variant_of,
    capabilities=capabilities,
    detect=Detection(diffusers_classes=("Flux2Transformer2DModel",), single_file=is_single_file, lora=LORA),
    title="FLUX.2",
)
