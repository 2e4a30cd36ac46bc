"""The fallback engine: the same jobs run by diffusers on torch (`serve --engine torch`).

torch and diffusers are an optional extra, imported only when this engine is asked for. It reads OUR
converted folder, so a model is converted once and both engines serve it: each diffusers/transformers
module is built from the config in the manifest, and its weights come from our safetensors through the
inverse of our conversion mapping (see `_torch_state_dict`). It speaks the MLX pipeline's protocol:
`total_steps(job)`, and `generate(job)` yielding a `Step` per loop iteration (diffusers'
`callback_on_step_end`; its latents, no denoised estimate) and returning PIL images, cancellable between steps.

A family runs here when its spec names its diffusers pipeline (`FamilySpec.torch_pipelines`: Stable Diffusion
1.x, 2.x, XL with ControlNet on the StableDiffusion* pipelines, FLUX.1 on the Flux* ones, Z-Image on the ZImage*
ones, FLUX.2 klein on Flux2KleinPipeline and Flux2KleinInpaintPipeline, Qwen-Image on the QwenImage* ones but
not its edit models); the img2img, inpainting and ControlNet
pipelines are found by name from it, and a mode diffusers has no pipeline for is refused (a JobError: a 400).
What else a family's pipelines take is in its spec: constructor settings read off the manifest
(`torch_settings`: klein's is_distilled) and where their guidance_scale counts from (`torch_cfg_offset`:
Z-Image's is cfg_scale - 1). A flow model runs on FlowMatchEulerDiscreteScheduler, so it gets the samplers that
scheduler has: euler, and lcm (its stochastic sampling: jump to the clean estimate, re-noise to the next sigma,
as our lcm sampler), on the discrete, karras and exponential schedules (the same sigmas as
`schedules.flow_sigmas`). What differs between the pipelines is read off them: whether they take a size for
img2img, true CFG (`true_cfg_scale`, with distilled guidance as `guidance_scale`), a negative prompt only as
embeddings (klein's: encoded here by the pipeline's own `encode_prompt`), reference images (klein's `image`
list; its inpainting's one `image_reference`), how they lay out latents (NCHW; FLUX.1's packed 2x2 patches;
FLUX.2's tokens of its patchified latents). `capabilities` narrows a model's samplers and schedules to these,
so build_job refuses the others before a job is queued; what a pipeline cannot take beyond that (klein's
inpainting with more than one reference image) is refused when the job's steps are counted, before it runs.
Flow img2img and inpainting keep diffusers' flow pipelines' rule for strength, as the MLX engine does
(`schedules.img2img_sigmas`); strength 0 (no step at all), which those pipelines refuse, is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.families import spec_for
from mlx_sd_server.engine.families.spec import DEFAULT_GUIDANCE, Capabilities
from mlx_sd_server.engine.model_io import component_class, component_kind, read_manifest
from mlx_sd_server.engine.pipeline import NoiseSource, fit_image, paste_outside_mask
from mlx_sd_server.engine.sampling.samplers import Step
from mlx_sd_server.engine.sampling.schedules import img2img_sigmas
from mlx_sd_server.engine.vae import downscale_factor
from mlx_sd_server.job import Job

log = logging.getLogger(__name__)

# Our sample methods -> the diffusers scheduler that takes the same steps, and its extra config.
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
    ),
    "lcm": ("LCMScheduler", {}),
}
# Our schedules -> the scheduler config that gives diffusers the same sigmas ("lcm" is LCMScheduler's own).
SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "discrete": {"timestep_spacing": "linspace"},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "lcm": {},
}
# Flow models: FlowMatchEulerDiscreteScheduler's samplers and schedules ("discrete" is its default).
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "lcm": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
}
FLOW_SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "discrete": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
}
MODE_NAMES = {"txt2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}
MODE_FIELDS = {"img2img": "image", "inpaint": "mask"}  # the request field that asks for a mode
# Our text encoders' classes -> the transformers tokenizer their pipelines load from the folder we keep beside them
# (transformers 5 types no T5TokenizerFast or Qwen2TokenizerFast, but keeps the names as aliases)
TOKENIZERS = {
    "CLIPTextModel": "CLIPTokenizer",
    "CLIPTextModelWithProjection": "CLIPTokenizer",
    "T5EncoderModel": "T5TokenizerFast",
    "Qwen3Model": "Qwen2TokenizerFast",
    "Qwen3ForCausalLM": "Qwen2TokenizerFast",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2TokenizerFast",
}


class _Cancelled(Exception):
    """Raised inside diffusers' step callback to abandon a job whose consumer stopped listening."""


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _torch_state_dict(module, weights_file: Path, map_weight: Callable) -> dict:
    """`module`'s state dict filled from our converted weights, by running our mapping backwards.

    Our mappings only rename keys and move elements (transposes, squeezes), so mapping an array of
    element indices forward shows where each element of the diffusers tensor went; scattering our
    values back through those indices restores the diffusers layout exactly, whatever the mapping did.
    """
    import torch

    ours = cast(dict[str, mx.array], mx.load(str(weights_file)))  # (a .safetensors file loads as a dict)
    state = {}
    for key, tensor in module.state_dict().items():
        index = np.arange(math.prod(tensor.shape)).reshape(tuple(tensor.shape))
        mapped = map_weight(key, index)
        if not mapped:  # a constant buffer our format does not keep (CLIP's position_ids)
            continue
        [(our_key, moved)] = mapped
        if our_key not in ours:
            raise ValueError(f"{weights_file.name} has no {our_key} (for {key})")
        # zeros where our format keeps no element: Qwen-Image's causal 3D convs on one frame, whose other taps
        # only ever meet zero padding
        flat = np.zeros(index.size, dtype=np.float32)
        flat[moved.ravel()] = np.array(ours[our_key].astype(mx.float32)).ravel()
        state[key] = torch.from_numpy(flat.reshape(index.shape))
    return state


def _build_component(name: str, entry: dict, folder: Path):
    """One diffusers/transformers module from its manifest entry, with our weights loaded."""
    import diffusers
    import transformers

    config = entry["config"]
    class_name = component_class(name, config)
    if hasattr(transformers, class_name):
        cls = getattr(transformers, class_name)
        module = cls(cls.config_class.from_dict(config))
    else:
        module = getattr(diffusers, class_name).from_config(config)
    # Not strict: the state dict leaves out only what our format does not keep (constant buffers, T5's
    # second copy of its embedding, tied to the first).
    state = _torch_state_dict(module, folder / entry["weights"], component_kind(name, entry["config"]).mapper)
    if class_name == "T5EncoderModel":  # (tied in transformers' T5 anyway; copied in case a version unties it)
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    module.load_state_dict(state, strict=False)
    head = module.get_output_embeddings() if isinstance(module, transformers.PreTrainedModel) else None
    if head is not None:
        # A text encoder as a causal LM (FLUX.2 klein's Qwen3ForCausalLM): the pipeline reads hidden states only,
        # and our format keeps no LM head, so it shares the embedding (as Qwen3-4B's tied one does) rather than
        # hold random weights (Qwen3-8B's untied one: 622M parameters)
        head.weight = module.get_input_embeddings().weight
    return module.eval()


def _check_unquantized(manifest: dict, folder: Path) -> None:
    if manifest.get("quantization"):
        raise ValueError(
            f"{folder} is quantized; the torch engine needs an unquantized conversion "
            "(convert again without --quantize)"
        )


def _is_flow(manifest: dict) -> bool:
    return spec_for(manifest["family"]).parameterization == "flow"


def _scheduler_config(manifest: dict, cls) -> dict[str, Any]:
    """The model's training schedule for scheduler class `cls` (a flow model's: its shift); steps_offset=1 as
    every SD release ships (only "leading" spacing uses it). Settings of ours that the class does not take are
    the pipeline's to apply: FLUX.2's `mu_rule` "empirical" is Flux2Klein*Pipeline's compute_empirical_mu."""
    config = dict(manifest["scheduler"])
    if not _is_flow(manifest):
        config.update(prediction_type=manifest["prediction_type"], steps_offset=1)
    return {key: value for key, value in config.items() if _accepts(cls.__init__, key)}


def _samplers(manifest: dict) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """(our sample methods -> diffusers scheduler and options, our schedules -> options) for the model."""
    return (FLOW_SCHEDULERS, FLOW_SCHEDULE_OPTIONS) if _is_flow(manifest) else (DIFFUSERS_SCHEDULERS, SCHEDULE_OPTIONS)


def capabilities(manifest: dict, can_do: Capabilities) -> Capabilities:
    """What a model can do (`can_do`, its family's) narrowed to what this engine runs: the samplers and
    schedules diffusers has equivalents of, no LoRAs and no hires fix. (Which sampler goes with which schedule is
    checked when the job runs: `TorchPipeline.scheduler`.)"""
    samplers, schedules = _samplers(manifest)
    return dataclasses.replace(
        can_do,
        samplers=tuple(s for s in can_do.samplers if s in samplers),
        schedulers=tuple(s for s in can_do.schedulers if s in schedules),
        lora=False,
        hires=False,
    )


def _accepts(method: Callable, name: str) -> bool:
    return name in inspect.signature(method).parameters


class TorchPipeline:
    """A converted model run by diffusers. Build with `from_folder`."""

    def __init__(self, base, manifest: dict, controlnet=None):
        self.base = base  # the txt2img diffusers pipeline; the other modes' pipelines share its modules
        self.manifest = manifest
        self.controlnet = controlnet
        spec = spec_for(manifest["family"])
        self.flow = _is_flow(manifest)
        self.takes_controlnet = spec.component("controlnet") is not None
        self.settings = dict(spec.torch_settings(manifest))  # what the pipelines take beyond their modules
        self.cfg_offset = spec.torch_cfg_offset
        # An inpainting model takes the mask and the masked image's latents as input channels beside its own
        denoiser = getattr(base, spec.denoiser).config
        self.inpainting_model = denoiser.in_channels == 2 * _latent_channels(base.vae.config) + 1
        # FLUX.1's pipelines take `latents` as tokens of 2x2 patches, packed by `_pack_latents(latents, batch,
        # channels, h, w)`; FLUX.2's pack NCHW latents themselves (`_pack_latents(latents)`); the others keep NCHW
        pack = getattr(type(base), "_pack_latents", None)
        self.takes_packed = pack is not None and len(inspect.signature(pack).parameters) > 1
        self._pipelines: dict[str, Any] = {}

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        control_net: str | os.PathLike | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> TorchPipeline:
        """Load a converted folder (and optionally a converted ControlNet folder) into diffusers.

        `device` defaults to cuda, then mps, then cpu; `dtype` to float16 on a GPU, float32 on the CPU. A model
        with a component that overflows float16 (FLUX's T5, Qwen3) runs wholly in that component's dtype (bfloat16)
        instead: the MLX engine keeps only that component in it, diffusers' pipelines cannot.
        """
        import diffusers
        import torch
        import transformers

        folder = Path(folder)
        manifest = read_manifest(folder)
        _check_unquantized(manifest, folder)
        family = manifest["family"]
        spec = spec_for(family)
        pipeline_class = spec.torch_pipelines.get(family)
        if pipeline_class is None:
            raise ValueError(f"{folder.name}: the torch engine does not run {family} models (MLX does)")
        refusal = spec.torch_refusal(manifest)
        if refusal is not None:
            raise ValueError(f"{folder.name}: {refusal}")
        if control_net is not None and spec.component("controlnet") is None:
            raise ValueError(f"{folder.name} is a {family.upper()} model: {family.upper()} models take no ControlNet")
        components = manifest["components"]
        device = device or default_device()
        torch_dtype = getattr(torch, dtype or ("float32" if device == "cpu" else "float16"))
        instead = {
            name: kind.instead_of_float16
            for name, entry in components.items()
            if (kind := component_kind(name, entry["config"])).instead_of_float16 is not None
        }
        if instead and torch_dtype == torch.float16:  # (diffusers' pipelines cannot keep T5 alone in bfloat16)
            torch_dtype = getattr(torch, str(next(iter(instead.values()))).rpartition(".")[2])
            log.warning(
                "torch engine: %s runs in %s, not float16 (%s and its activations overflow float16)",
                folder.name,
                torch_dtype,
                ", ".join(instead),
            )
        modules = {
            name: _build_component(name, components[name], folder)
            for name in ("text_encoder", "text_encoder_2", "unet", "transformer", "vae")
            if name in components
        }
        for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if encoder in components:
                tokenizer_class = getattr(
                    transformers, TOKENIZERS[component_class(encoder, components[encoder]["config"])]
                )
                modules[tokenizer] = tokenizer_class.from_pretrained(str(folder / components[encoder]["tokenizer"]))
        scheduler_class = getattr(diffusers, _samplers(manifest)[0]["euler"][0])
        modules["scheduler"] = scheduler_class(**_scheduler_config(manifest, scheduler_class))  # replaced per job
        base_class = getattr(diffusers, pipeline_class)
        offered = {
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
            **spec.torch_settings(manifest),
        }
        base = base_class(
            **modules, **{key: value for key, value in offered.items() if _accepts(base_class.__init__, key)}
        )
        controlnet = None
        if control_net is not None:
            cn_folder = Path(control_net)
            cn_manifest = read_manifest(cn_folder)
            _check_unquantized(cn_manifest, cn_folder)
            if "controlnet" not in cn_manifest["components"]:
                raise ValueError(f"{cn_folder} has no controlnet component")
            controlnet = _build_component("controlnet", cn_manifest["components"]["controlnet"], cn_folder)
        elif "controlnet" in components:
            controlnet = _build_component("controlnet", components["controlnet"], folder)
        if (device, torch_dtype) != ("cpu", torch.float32):  # (diffusers warns on every dtype cast, even a no-op)
            base.to(device, torch_dtype)
            if controlnet is not None:
                controlnet.to(device, torch_dtype)
        base.set_progress_bar_config(disable=True)
        log.info(
            "torch engine: %s (%s) on %s, %s, diffusers %s",
            manifest.get("name", folder.name),
            manifest["family"],
            device,
            torch_dtype,
            diffusers.__version__,
        )
        return cls(base, manifest, controlnet)

    def memory_bytes(self) -> int:
        """The bytes of the modules' parameters and buffers (the ControlNet's included)."""
        modules = [m for m in [*self.base.components.values(), self.controlnet] if hasattr(m, "parameters")]
        return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])

    # --- what a job needs ----------------------------------------------------------------------------

    def _mode(self, job: Job) -> str:
        if job.mask is not None or self.inpainting_model:
            return "inpaint"
        return "img2img" if job.init_image is not None else "txt2img"

    def _pipeline(self, job: Job):
        """The diffusers pipeline for the job's mode, sharing the base pipeline's modules, or a JobError (a 400)
        when diffusers has none (FLUX.2 klein's img2img)."""
        import diffusers

        controlled = job.control_image is not None
        if controlled and self.controlnet is None:
            why = (
                "this model has no ControlNet attached"
                if self.takes_controlnet
                else f"{self.manifest['family'].upper()} models take no ControlNet"
            )
            raise JobError(f"{why}, so control_image cannot be honoured", "control_image", "controlnet_unavailable")
        mode = self._mode(job)
        kind = type(self.base).__name__.removesuffix("Pipeline")  # StableDiffusionXL: StableDiffusionXLImg2Img...
        name = f"{kind}{'ControlNet' if controlled else ''}{MODE_NAMES[mode]}Pipeline"
        if name not in self._pipelines:
            cls = getattr(diffusers, name, None)
            if cls is None:
                raise JobError(
                    f"diffusers has no {name}, so the torch engine cannot run {mode} on "
                    f"{self.manifest['family']} models (the MLX engine can)",
                    "control_image" if controlled else MODE_FIELDS[mode],
                    "unsupported_parameter",
                )
            offered = {
                **self.base.components,
                "controlnet": self.controlnet,
                "requires_safety_checker": False,
                **self.settings,
            }
            pipeline = cls(**{key: value for key, value in offered.items() if _accepts(cls.__init__, key)})
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[name] = pipeline
        return self._pipelines[name]

    def _references(self, pipeline, job: Job) -> dict[str, Any]:
        """The pipeline's arguments for the job's reference images (instruction edits; inpainting's extra
        references), or a JobError (a 400) for what it cannot take."""
        images = list(job.reference_images)
        if not images:
            return {}
        name = type(pipeline).__name__
        if self._mode(job) == "inpaint":
            takes = _accepts(pipeline.__call__, "image_reference")
            if takes and len(images) == 1:
                return {"image_reference": images[0]}
            # (Flux2KleinInpaintPipeline encodes a list of them as one batch, which its ids cannot place)
            why = "takes one reference image beside the image it inpaints" if takes else "takes no reference images"
        elif _accepts(pipeline.__call__, "image"):
            return {"image": images}
        else:
            why = "takes no reference images"
        raise JobError(
            f"{name} {why}, and this request brings {len(images)}: the torch engine cannot run this edit "
            "(the MLX engine can)",
            "image",
            "unsupported_parameter",
        )

    def scheduler(self, job: Job):
        """The diffusers scheduler for the job's sample_method and scheduler, or a JobError (a 400)."""
        import diffusers

        samplers, schedules = _samplers(self.manifest)
        if job.sample_method not in samplers:
            raise JobError(
                f"sample_method {job.sample_method!r} has no diffusers equivalent; the torch engine "
                f"supports {', '.join(samplers)} for {self.manifest['family']}",
                "sample_method",
                "unsupported_sample_method",
            )
        class_name, extra = samplers[job.sample_method]
        cls = getattr(diffusers, class_name)
        options = schedules.get(job.scheduler)
        lcm_mismatch = not self.flow and (job.scheduler == "lcm") != (job.sample_method == "lcm")
        if options is None or lcm_mismatch or not all(_accepts(cls.__init__, option) for option in options):
            raise JobError(
                f"scheduler {job.scheduler!r} is not available with sample_method {job.sample_method!r} "
                "on the torch engine",
                "scheduler",
                "unsupported_scheduler",
            )
        return cls(**_scheduler_config(self.manifest, cls), **extra, **options)

    def total_steps(self, job: Job) -> int:
        """diffusers' denoising loop length for the job (Heun and DPM2 take two iterations per step), or a
        JobError (a 400) for what the job's pipeline cannot do."""
        self._references(self._pipeline(job), job)
        scheduler = self.scheduler(job)
        try:  # (a flow schedule's length does not depend on its shift, mu)
            scheduler.set_timesteps(job.steps, **({"mu": 0.0} if self.flow else {}))
        except ValueError as exc:  # e.g. LCM's 50-step limit
            raise JobError(str(exc), "steps", "invalid_value") from None
        if job.init_image is None:
            return len(scheduler.timesteps)
        # diffusers' img2img rule, as ours: its flow pipelines' rounds a fractional steps * strength up
        kept = len(img2img_sigmas(np.arange(job.steps + 1), job.steps, job.strength, flow=self.flow)) - 1
        if self.flow and kept < 1:
            raise JobError(
                f"strength {job.strength} leaves no step of {job.steps} to run; diffusers' flow "
                "pipelines need at least one",
                "strength",
                "invalid_value",
            )
        return len(scheduler.timesteps) - (job.steps - kept) * scheduler.order

    def _arguments(self, pipeline, job: Job, noise: NoiseSource | None) -> dict[str, Any]:
        import torch

        size = (job.width, job.height)
        mode = self._mode(job)
        args: dict[str, Any] = dict(
            prompt=job.prompt,
            num_inference_steps=job.steps,
            guidance_scale=job.cfg_scale - self.cfg_offset,
            num_images_per_prompt=job.n,
            generator=[torch.Generator().manual_seed(seed) for seed in job.seeds()],
            output_type="pil",
        )
        if _accepts(pipeline.__call__, "negative_prompt"):
            args["negative_prompt"] = job.negative_prompt or None  # None lets SDXL use zeros for an empty one
        elif job.negative_prompt:  # klein's pipelines take "" unless given the embeddings of another
            args["negative_prompt_embeds"] = self._prompt_embeds(pipeline, job.negative_prompt)
        if _accepts(pipeline.__call__, "true_cfg_scale"):
            # cfg_scale is true CFG (FluxPipeline runs it only with a negative prompt, "" included), and
            # guidance_scale the distilled guidance. QwenImage*Pipeline warn of a negative prompt without CFG and of
            # a guidance_scale (theirs defaults to None) that a model without the embedding ignores: neither given.
            default = inspect.signature(pipeline.__call__).parameters["guidance_scale"].default
            args.update(
                negative_prompt=job.negative_prompt if job.cfg_scale > 1 else None,
                true_cfg_scale=job.cfg_scale,
                guidance_scale=job.guidance if job.guidance is not None or default is None else DEFAULT_GUIDANCE,
            )
        # T5's tokens per prompt: the job's, else the model's own (as converted)
        own = (entry["max_length"] for entry in self.manifest["components"].values() if "max_length" in entry)
        length = job.max_sequence_length if job.max_sequence_length is not None else next(own, None)
        if length is not None and _accepts(pipeline.__call__, "max_sequence_length"):
            args["max_sequence_length"] = length
        if _accepts(pipeline.__call__, "height"):  # (SD img2img takes the size of its image)
            args.update(height=job.height, width=job.width)
        if mode != "txt2img":  # an inpainting UNet with nothing to edit repaints a blank grey image
            blank = Image.new("RGB", size, (128, 128, 128))
            args["image"] = _fit(job.init_image, size) if job.init_image is not None else blank
            args["strength"] = job.strength if job.init_image is not None else 1.0
        if mode == "inpaint":
            args["mask_image"] = _fit(job.mask, size, "L") if job.mask is not None else Image.new("L", size, 255)
        if job.control_image is not None:
            args["image" if mode == "txt2img" else "control_image"] = self._control_image(job.control_image, job)
            args["controlnet_conditioning_scale"] = job.control_strength
        args.update(self._references(pipeline, job))
        if noise is not None and mode == "txt2img":  # tests inject the starting latents (step noise: the seeds)
            n, h, w, channels = self._latent_shape(job)
            latents = torch.from_numpy(np.array(noise.initial((n, h, w, channels)).transpose(0, 3, 1, 2)))
            args["latents"] = self.base._pack_latents(latents, n, channels, h, w) if self.takes_packed else latents
        return args

    def _prompt_embeds(self, pipeline, prompt: str):
        """`prompt` encoded by the pipeline's own `encode_prompt`, once (the pipeline repeats it per image)."""
        import torch

        with torch.no_grad():
            encoded = pipeline.encode_prompt(prompt=prompt, num_images_per_prompt=1)
        return encoded[0] if isinstance(encoded, tuple) else encoded

    def _latent_shape(self, job: Job) -> tuple[int, int, int, int]:
        """Our sampler's latents for the job, (n, h, w, C): the VAE's, in its patches where its config has them
        (AutoencoderKLFlux2's 2x2: 1/16 of the image, 4x the channels), as our VAE's `latent_shape` gives them."""
        vae = self.base.vae.config
        ph, pw = vae.get("patch_size") or (1, 1)
        d = downscale_factor(vae)
        return job.n, job.height // (d * ph), job.width // (d * pw), _latent_channels(vae) * ph * pw

    def _our_latents(self, latents, job: Job) -> mx.array:
        """diffusers' latents (NCHW, or tokens) as ours: (B, h, w, C)."""
        if latents.ndim == 3 and self.takes_packed:  # FLUX.1's tokens of 2x2 patches
            latents = self.base._unpack_latents(latents, job.height, job.width, self.base.vae_scale_factor)
        ours = np.asarray(latents.float().cpu().numpy())
        if ours.ndim == 5:  # Qwen-Image's (B, C, frames=1, H, W)
            ours = ours[:, :, 0]
        if ours.ndim == 3:  # FLUX.2's tokens: its patchified latents, row-major
            return mx.array(ours.reshape(self._latent_shape(job)))
        return mx.array(ours).transpose(0, 2, 3, 1)

    def _control_image(self, image: Image.Image, job: Job) -> Image.Image:
        pixels = fit_image(image, job.width, job.height)
        if job.control_preprocess == "canny":
            from mlx_sd_server.engine.canny import canny

            pixels = canny(pixels)
        return _to_pil(pixels)

    # --- the job -------------------------------------------------------------------------------------

    def generate(self, job: Job, noise: NoiseSource | None = None) -> Generator[Step, None, list[Image.Image]]:
        """Yield a `Step` per loop iteration; return the n images.

        diffusers runs its loop on a helper thread that waits after each step until the next one is asked
        for, so closing this generator (a cancelled job) stops it between steps.
        """
        if job.loras:
            raise JobError(
                "LoRAs are applied by the MLX engine only, and the diffusers/torch fallback serves this model",
                "loras",
                "unsupported_parameter",
            )
        pipeline = self._pipeline(job)
        pipeline.scheduler = self.scheduler(job)
        args = self._arguments(pipeline, job, noise)
        if self.flow:  # (diffusers' flow pipelines step without the generators: lcm would re-noise unseeded)
            pipeline.scheduler.step = functools.partial(pipeline.scheduler.step, generator=args["generator"])
        log.info(
            "torch engine: %s, %d steps of %s/%s", type(pipeline).__name__, job.steps, job.sample_method, job.scheduler
        )
        progress: queue.Queue[Step | None] = queue.Queue()
        resume = threading.Semaphore(0)
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def on_step_end(_pipeline, step: int, timestep, tensors: dict) -> dict:
            # (a flow scheduler's timestep is sigma * num_train_timesteps; SD's is the training timestep)
            sigma = float(timestep) / (pipeline.scheduler.config.num_train_timesteps if self.flow else 1)
            progress.put(Step(step, sigma, self._our_latents(tensors["latents"], job), None))
            resume.acquire()
            if stop.is_set():
                raise _Cancelled()
            return tensors

        def run() -> None:
            try:
                outcome["images"] = pipeline(**args, callback_on_step_end=on_step_end).images
            except _Cancelled:
                pass
            except BaseException as exc:  # re-raised on the caller's thread
                outcome["error"] = exc
            finally:
                progress.put(None)

        thread = threading.Thread(target=run, name="torch-engine", daemon=True)
        thread.start()
        try:
            while (done := progress.get()) is not None:
                yield done
                resume.release()
        finally:
            stop.set()
            resume.release()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        images = outcome["images"]
        if job.mask is not None and job.init_image is not None:  # (build_job gives a mask only with an image)
            images = [paste_outside_mask(image, job.init_image, job.mask) for image in images]
        return images


def _latent_channels(vae_config) -> int:
    """The autoencoder's latent channels (AutoencoderKLQwenImage's config calls them z_dim)."""
    return vae_config.get("latent_channels") or vae_config["z_dim"]


def _fit(image: Image.Image, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Resized and centre-cropped exactly as the MLX pipeline does, so both engines see the same pixels."""
    pixels = fit_image(image, *size, mode=mode)
    return _to_pil(pixels[..., 0] if mode == "L" else pixels)


def _to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8))
