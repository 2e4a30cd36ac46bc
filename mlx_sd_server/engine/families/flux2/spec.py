"""FLUX.2 klein (4B, 9B; distilled and base): Qwen3, the FLUX.2 transformer, the FLUX.2 autoencoder.

Edits, as diffusers runs them (family.py):
- instruction edits (Flux2KleinPipeline's `image=[...]`): up to REFERENCES input images, each encoded into
  the latent space and read by the transformer as tokens after the noisy ones (`references`).
- inpainting (Flux2KleinInpaintPipeline): the source image noised to `strength` and blended back outside the
  mask every step, the mask brought to the 1/16 token grid bilinearly (`latent_mask`: partly repainted
  tokens at its edges, not max-pooled), and the source also read as the first reference image
  (`source_as_reference`), the request's other images (`image_reference`) after it.

What it cannot do yet, and why:
- img2img without a mask: diffusers has no klein img2img pipeline (Flux2KleinPipeline's `image` is reference
  images, not a start), so an image without a mask is an instruction edit.
- ControlNet (none exists), `max_sequence_length` (Qwen3 reads a fixed 512 tokens, as for Z-Image).
- FLUX.2 dev (a guidance embedding, a Mistral text encoder): refused at conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.flux2 import single_file
from mlx_sd_server.engine.families.flux2.family import HIDDEN_LAYERS, Flux2Family, is_distilled
from mlx_sd_server.engine.families.flux2.lora import LORA
from mlx_sd_server.engine.families.flux2.mapping import map_flux2_transformer_weight
from mlx_sd_server.engine.families.flux2.transformer import Flux2Transformer2DModel, Flux2TransformerConfig
from mlx_sd_server.engine.families.runtime import bilinear_mask
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
from mlx_sd_server.engine.text.qwen3 import QWEN3_ENCODER
from mlx_sd_server.engine.vae import AUTOENCODER_KL_FLUX2, Flux2VAEConfig, downscale_factor

TRANSFORMER = ComponentKind(
    ("Flux2Transformer2DModel",), Flux2TransformerConfig, Flux2Transformer2DModel, map_flux2_transformer_weight
)
PATCH = Flux2VAEConfig.patch_size[0]  # the pipelines cut the autoencoder's latents into 2x2 patches
# Reference images an edit may bring. diffusers sets no limit; memory and time do. Each costs up to 4096
# tokens (1024 x 1024 pixels at 1/16), so 4 make a 1024 x 1024 edit's sequence ~21k tokens with the text, 5x a
# txt2img's: klein 9B's widest activation (a single block's fused projection, 36864 wide) is then ~1.5 GB per
# image in 16 bits, a few GB over the weights, and the attention work ~25x a txt2img's per step.
REFERENCES = 4

# The released klein scheduler's settings where a folder has none: dynamic shifting, mu by FLUX.2's empirical
# rule (Flux2KleinPipeline's compute_empirical_mu), not FLUX.1's linear one.
SCHEDULER = {**FLOW_SCHEDULER_SETTINGS, "shift": 3.0, "use_dynamic_shifting": True, "mu_rule": "empirical"}

# Flux2KleinPipeline's defaults: step-distilled 4 steps without CFG; base 50 steps with CFG 4.
DISTILLED = Variant("distilled", ModelDefaults(4, 1.0, "euler", "discrete", 1024, 1024))
BASE = Variant("base", ModelDefaults(50, 4.0, "euler", "discrete", 1024, 1024))


def variant_of(family: str, prediction_type: str, configs: Configs, name: str) -> Variant:
    """Distilled or base, as the pipeline's `is_distilled` says (by name without one). Refuses what klein's
    pipeline would not run: a guidance embedding (FLUX.2 dev, whose text encoder is Mistral), or a Qwen3
    too shallow for the hidden states klein stacks, or of another width than the transformer reads (a split
    file's Qwen3-4B with klein 9B)."""
    transformer = configs["transformer"]
    if transformer.get("guidance_embeds", True):  # (diffusers' default: FLUX.2 dev's)
        raise CheckpointError(single_file.FLUX2_DEV_REFUSED)
    text_encoder = configs.get("text_encoder", {})
    layers = text_encoder.get("num_hidden_layers")
    if layers is not None and layers < max(HIDDEN_LAYERS):
        raise CheckpointError(
            f"FLUX.2 klein stacks Qwen3's hidden states {HIDDEN_LAYERS}, and this text encoder has {layers} layers"
        )
    width, reads = text_encoder.get("hidden_size"), transformer.get("joint_attention_dim")
    if width is not None and reads is not None and width * len(HIDDEN_LAYERS) != reads:
        raise CheckpointError(
            f"this FLUX.2 klein transformer reads {len(HIDDEN_LAYERS)} stacked {reads // len(HIDDEN_LAYERS)}-wide "
            f"Qwen3 hidden states, and this text encoder is {width} wide: give the Qwen3 it was trained with "
            "(klein 4B: Qwen3-4B, 2560 wide; klein 9B: Qwen3-8B, 4096)"
        )
    return DISTILLED if is_distilled(configs.get(PIPELINE, {}), name) else BASE


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool) -> Capabilities:
    """Sides are multiples of the VAE's downscale times the 2x2 patch (16); flow samplers and schedules;
    instruction edits with up to REFERENCES images and inpainting, no img2img without a mask, no ControlNet, no
    guidance embedding (see the module docstring); LoRAs on the transformer (lora.py)."""
    vae = manifest["components"]["vae"]["config"]
    return Capabilities(
        family="flux2",
        samplers=FLOW_SAMPLERS,
        schedulers=FLOW_SCHEDULES,
        img2img=False,
        inpainting=True,
        controlnet=False,
        lora=True,
        size_multiple=downscale_factor(vae) * Flux2VAEConfig.from_dict(vae).patch_size[0],
        references=REFERENCES,
    )


def torch_settings(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    """Flux2Klein*Pipeline's `is_distilled` (no CFG), decided as the MLX runtime decides it."""
    return {"is_distilled": is_distilled(manifest.get(PIPELINE, {}), manifest.get("name", ""))}


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
    latent_mask=bilinear_mask,
    source_as_reference=True,
    detect=Detection(diffusers_classes=("Flux2Transformer2DModel",), single_file=single_file.is_single_file, lora=LORA),
    torch_pipelines={"flux2": "Flux2KleinPipeline"},
    torch_settings=torch_settings,
    title="FLUX.2",
    original=OriginalLayout(single_file.parts, single_file.read, single_file.EXPECTS, single_file.OPTIONS),
)
