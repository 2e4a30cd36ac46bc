"""The FamilySpec: everything true of a model family, declared once, in the family's folder.

A family folder (`families/sd/`, `families/flux/`, ...) holds its networks, its weight mappers and one
`SPEC`: its names and variants, how to recognise its files, its component table, its latent format, its
parameterization and schedule, its per-variant defaults and what its models can do. The converter, the
registry, job validation, the LoRA reader, `pull` and the torch engine read specs; none of them names a
family. `families/__init__.py` lists the specs in `FAMILIES`; detection iterates that list.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.lora import LoRARules
from mlx_sd_server.engine.families.runtime import (
    InpaintingChannels,
    LatentMask,
    downsample_mask,
    pooled_mask_channels,
)
from mlx_sd_server.engine.sampling.samplers import SAMPLE_METHODS
from mlx_sd_server.engine.sampling.schedules import SCHEDULERS
from mlx_sd_server.engine.source import ArchitectureHints, FilePart, OriginalModel, Tensors

if TYPE_CHECKING:
    from mlx_sd_server.engine.families.runtime import Family

DEFAULT_GUIDANCE = 3.5  # distilled guidance when a guidance-embedding model's manifest names none (FLUX.1-dev's)

# A component's config dicts by manifest name (text_encoder, unet, transformer, vae, ...), and under PIPELINE
# the diffusers pipeline's own settings where its model_index.json has some (FLUX.2 klein's `is_distilled`).
Configs = Mapping[str, Mapping[str, Any]]
PIPELINE = "pipeline"
PIPELINE_CLASS = "_class_name"  # in `pipeline`: the class where it tells a variant (Detection.pipelines)


def no_pipeline_settings(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    """`FamilySpec.torch_settings` of a family whose diffusers pipelines take only their modules."""
    return {}


def torch_runs_all(manifest: Mapping[str, Any]) -> str | None:
    """`FamilySpec.torch_refusal` of a family whose every model its torch pipelines run."""
    return None


@dataclass(frozen=True)
class ModelDefaults:
    """A model's generation defaults (a manifest's `defaults` overlay its family variant's)."""

    steps: int = 20
    cfg_scale: float = 7.0
    sample_method: str = "euler_a"
    scheduler: str = "discrete"
    width: int = 512
    height: int = 512
    guidance: float | None = None  # distilled guidance, for models with a guidance embedding
    strength: float | None = None  # edits' strength where the model has its own (FLUX.1 Fill: 1); None: the table's


T5_TOKEN_LIMIT = 512  # the most T5 tokens diffusers' FLUX and SD3 pipelines take (`max_sequence_length`)


@dataclass(frozen=True)
class TextLength:
    """How many tokens a model's T5 encodes a prompt to (cut or padded): a request's `max_sequence_length`,
    as diffusers' FLUX and SD3 pipelines take it."""

    default: int  # the model's own: its manifest's `max_length` (what it was trained with)
    maximum: int = T5_TOKEN_LIMIT

    @classmethod
    def of(cls, manifest: Mapping[str, Any], encoder: str, default: int) -> TextLength:
        """A model's: the `max_length` its manifest gives `encoder` (set at conversion), else `default`."""
        return cls(int(manifest["components"].get(encoder, {}).get("max_length", default)))


@dataclass(frozen=True)
class Capabilities:
    """What a model can do, declared by its family's spec and checked before a job is queued. Built without
    a family (no model known), it constrains nothing beyond the generic rules."""

    family: str = ""
    samplers: tuple[str, ...] = SAMPLE_METHODS
    schedulers: tuple[str, ...] = SCHEDULERS
    guidance: bool = False  # has a distilled guidance embedding (the `guidance` field)
    img2img: bool = True
    inpainting: bool = True
    controlnet: bool = True  # a ControlNet is attached
    lora: bool = True
    size_multiple: int = 8  # image sides must be multiples of this (the VAE's downscale x the patch size)
    largest_side: int | None = None  # the network's own bound on a side (SD3's position embeddings), if any
    text_length: TextLength | None = None  # T5's tokens per prompt, which a request may set; None: no T5
    # Instruction edits: how many input images the model reads as references beside the prompt (0: it has no
    # instruction edits; its edits are img2img and inpainting)
    references: int = 0
    # It only inpaints (FLUX.1 Fill): every request brings an image and a mask
    mask_required: bool = False
    hires: bool = True  # the hires fix (hr_scale): on models with img2img, under the MLX engine


@dataclass(frozen=True)
class LatentFormat:
    """The autoencoder's latent space as the denoiser sees it. The VAE's downscale factor is not here: it
    is read from the VAE's config (`vae.downscale_factor`), never assumed."""

    channels: int
    scaling_factor: float
    shift_factor: float = 0.0  # latents = (posterior mean - shift) * scale
    patch_size: int = 1  # the denoiser takes patch x patch latent pixels as one token


@dataclass(frozen=True)
class Variant:
    """One release of a family (dev, schnell, turbo...), told apart by `FamilySpec.variant_of`."""

    name: str
    defaults: ModelDefaults
    text_lengths: Mapping[str, int] = field(default_factory=dict)  # T5 tokens by encoder name, where fixed


@dataclass(frozen=True)
class ComponentSpec:
    """One row of a family's component table."""

    name: str  # the manifest's (and the diffusers folder's) name: text_encoder, unet, transformer, vae, ...
    kinds: tuple[ComponentKind, ...]  # the networks it may be
    required: bool = True


@dataclass(frozen=True)
class Detection:
    """How to recognise a family's files. Each test is a pure function of what a file's header shows."""

    diffusers_classes: tuple[str, ...]  # the denoiser's `_class_name` in a diffusers folder
    # Whether a single file (.safetensors or .gguf) with these tensor names holds this family's denoiser
    # in its original layout (alone or all-in-one)
    single_file: Callable[[Iterable[str]], bool]
    # The manifest family a diffusers folder's component configs show, where the family serves several
    # (SD: sd1, sd2 or sdxl, by their text encoders); None: its only one
    diffusers_family: Callable[[Configs], str] | None = None
    # Its LoRAs' names beyond diffusers/PEFT's, and the rule that tells a LoRA made for it (a manifest family
    # name, or None when the LoRA is not this family's). Families are asked in FAMILIES' order.
    lora: LoRARules | None = None
    # diffusers pipeline classes (model_index.json's `_class_name`) that tell a variant its configs cannot
    # (FLUX.1 Kontext's networks are dev's): a folder of one keeps it in its manifest's `pipeline`
    pipelines: tuple[str, ...] = ()


# (the family's spec, per component the file's tensors and the component's prefix in it, the prediction type
# the file states or None, hints) -> the model those tensors hold
OriginalReader = Callable[
    ["FamilySpec", Mapping[str, tuple[Tensors, str]], str | None, ArchitectureHints], OriginalModel
]


@dataclass(frozen=True)
class OriginalLayout:
    """How a family's original-layout files (single files, split files, ComfyUI bundles) map to diffusers'.
    A file is recognised by `Detection.single_file`; `parts` then says which components a file with these
    tensor names holds and where (raising CheckpointError for one it cannot convert), and `read` gives their
    configs (from shapes) and weight mappings (`families/<family>/single_file.py`)."""

    parts: Callable[[Collection[str]], Mapping[str, FilePart]]
    read: OriginalReader
    expects: str  # what its files hold, for a file no family recognises
    options: tuple[str, ...] = ()  # the `convert` options its components' own files are given with


@dataclass(frozen=True)
class FamilySpec:
    """Everything true of a family (see the module docstring)."""

    name: str  # its folder's name
    manifest_names: tuple[str, ...]  # the manifest `family` values it serves (SD: sd1, sd2, sdxl)
    runtime: type[Family]  # prompts -> conditioning, schedule, network -> denoiser (families/runtime.py)
    denoiser: str  # the denoising network's component name: unet or transformer
    components: tuple[ComponentSpec, ...]
    parameterization: str | None  # "flow"; None: the model says (epsilon or v_prediction)
    scheduler: Mapping[str, Any]  # the scheduler settings a manifest keeps, with their defaults
    latent: Mapping[str, LatentFormat]  # by manifest family name
    # (manifest family, prediction type, component configs, model name) -> the variant those describe
    variant_of: Callable[[str, str, Configs, str], Variant]
    capabilities: Callable[[Mapping[str, Any], bool], Capabilities]  # (manifest, has ControlNet)
    detect: Detection
    # The OpenCLIP text encoders by manifest family: a tokenizer made for them (single files carry none) pads
    # with "!", OpenAI CLIP's with its end token.
    open_clip_encoders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    optional_text_encoders: tuple[str, ...] = ()  # text encoders a model may be converted without (SD3's T5)
    # diffusers' txt2img pipeline class by manifest family, for --engine torch (absent: MLX only)
    torch_pipelines: Mapping[str, str] = field(default_factory=dict)
    # What else those pipelines' constructors take, from a manifest (FLUX.2 klein's is_distilled), for --engine torch
    torch_settings: Callable[[Mapping[str, Any]], Mapping[str, Any]] = no_pipeline_settings
    # The cfg_scale those pipelines' guidance_scale counts from: theirs is cfg_scale - this (Z-Image's guide
    # pos + g (pos - neg), which is our neg + cfg_scale (pos - neg) at g = cfg_scale - 1)
    torch_cfg_offset: float = 0.0
    # Why --engine torch cannot run this model of the family (None: it can), told at load (FLUX.1 Fill)
    torch_refusal: Callable[[Mapping[str, Any]], str | None] = torch_runs_all
    title: str = ""  # for messages: "FLUX.1"
    original: OriginalLayout | None = None  # its single files, if it has a layout of its own
    # How its inpainting models (runtime `inpainting_model`) take the mask and the masked image's latents as
    # input channels (runtime.py: SD's 9-channel UNets' way, pooled_mask_channels, unless it says another)
    inpainting_channels: InpaintingChannels = pooled_mask_channels
    # How inpainting with its regular models brings the mask to the latent grid it blends on (runtime.py:
    # max-pooled, downsample_mask, unless it says another: FLUX.2 klein's is bilinear)
    latent_mask: LatentMask = downsample_mask
    # Whether --low-memory also frees the denoiser's weights while prompts are encoded (read back from disk each
    # job): for families whose text encoder and denoiser together do not fit a 16 GB Mac (Qwen-Image)
    low_memory_unreads_denoiser: bool = False
    # Whether an edit's source image is also the first reference image its network reads (FLUX.2 klein's
    # inpainting feeds the source to the transformer besides noising it; runtime.py)
    source_as_reference: bool = False

    def component(self, name: str) -> ComponentSpec | None:
        return next((c for c in self.components if c.name == name), None)

    def kinds(self) -> Iterable[ComponentKind]:
        return (kind for c in self.components for kind in c.kinds)

    def clip_pad_token(self, family: str, encoder: str) -> str:
        return "!" if encoder in self.open_clip_encoders.get(family, ()) else "<|endoftext|>"

    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if any(k.tokenizer_class for k in c.kinds))
