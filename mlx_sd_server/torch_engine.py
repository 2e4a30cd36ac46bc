"""The fallback engine: the same jobs run by diffusers on torch (`serve --engine torch`).

torch and diffusers are an optional extra, imported only when this engine is asked for. It reads OUR
converted folder, so a model is converted once and both engines serve it: each diffusers/transformers
module is built from the config in the manifest, and its weights come from our safetensors through the
inverse of our conversion mapping (see `_torch_state_dict`). It speaks the MLX pipeline's protocol:
`total_steps(job)`, and `generate(job)` yielding a `Step` per loop iteration (diffusers'
`callback_on_step_end`; its latents, no denoised estimate) and returning PIL images, cancellable between steps.

A family runs here when its spec names its diffusers pipeline (`FamilySpec.torch_pipelines`: Stable Diffusion
1.x, 2.x, XL with ControlNet on the StableDiffusion* pipelines, FLUX.1 on the Flux* ones); the img2img,
inpainting and ControlNet pipelines are found by name from it. A flow model runs on
FlowMatchEulerDiscreteScheduler, so it gets the samplers that scheduler has: euler, and lcm (its stochastic
sampling: jump to the clean estimate, re-noise to the next sigma, as our lcm sampler), on the discrete, karras
and exponential schedules (the same sigmas as `schedules.flow_sigmas`). What differs between the pipelines
is read off them: whether they take a size for img2img, true CFG (`true_cfg_scale`, with distilled
guidance as `guidance_scale`), packed latents. `capabilities` narrows a model's samplers and schedules to
these, so build_job refuses the others before a job is queued. One difference from the MLX engine: flow
img2img and inpainting keep diffusers' flow pipelines' rule for strength, steps - int(steps - steps *
strength) steps, which rounds a fractional steps * strength up where ours (and diffusers' SD pipelines)
round down; with steps * strength whole both run the same steps, and strength 0 (no step at all) is refused.
"""

from __future__ import annotations

import dataclasses
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
        flat = np.empty(index.size, dtype=np.float32)
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
    return module.eval()


def _check_unquantized(manifest: dict, folder: Path) -> None:
    if manifest.get("quantization"):
        raise ValueError(
            f"{folder} is quantized; the torch engine needs an unquantized conversion "
            "(convert again without --quantize)"
        )


def _is_flow(manifest: dict) -> bool:
    return spec_for(manifest["family"]).parameterization == "flow"


def _scheduler_config(manifest: dict) -> dict[str, Any]:
    """The model's training schedule (a flow model's: its shift); steps_offset=1 as every SD release ships
    (only "leading" spacing uses it)."""
    if _is_flow(manifest):
        return dict(manifest["scheduler"])
    return {**manifest["scheduler"], "prediction_type": manifest["prediction_type"], "steps_offset": 1}


def _samplers(manifest: dict) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """(our sample methods -> diffusers scheduler and options, our schedules -> options) for the model."""
    return (FLOW_SCHEDULERS, FLOW_SCHEDULE_OPTIONS) if _is_flow(manifest) else (DIFFUSERS_SCHEDULERS, SCHEDULE_OPTIONS)


def capabilities(manifest: dict, can_do: Capabilities) -> Capabilities:
    """What a model can do (`can_do`, its family's) narrowed to what this engine runs: the samplers and
    schedules diffusers has equivalents of, and no LoRAs. (Which sampler goes with which schedule is
    checked when the job runs: `TorchPipeline.scheduler`.)"""
    samplers, schedules = _samplers(manifest)
    return dataclasses.replace(
        can_do,
        samplers=tuple(s for s in can_do.samplers if s in samplers),
        schedulers=tuple(s for s in can_do.schedulers if s in schedules),
        lora=False,
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
        # An inpainting model takes the mask and the masked image's latents as input channels beside its own
        denoiser = getattr(base, spec.denoiser).config
        self.inpainting_model = denoiser.in_channels == 2 * base.vae.config.latent_channels + 1
        self.packed = hasattr(type(base), "_pack_latents")  # the pipeline takes latents as tokens of patches
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
        with a component that overflows float16 (FLUX's T5) runs wholly in that component's dtype (bfloat16)
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
                tokenizer_folder = folder / components[encoder]["tokenizer"]
                t5 = component_class(encoder, components[encoder]["config"]) == "T5EncoderModel"
                # (transformers 5 types no T5TokenizerFast, but keeps the name as T5Tokenizer's alias)
                tokenizer_class = transformers.T5TokenizerFast if t5 else transformers.CLIPTokenizer  # type: ignore[attr-defined]
                modules[tokenizer] = tokenizer_class.from_pretrained(str(tokenizer_folder))
        scheduler_class, _ = _samplers(manifest)[0]["euler"]
        modules["scheduler"] = getattr(diffusers, scheduler_class)(**_scheduler_config(manifest))  # replaced per job
        base_class = getattr(diffusers, pipeline_class)
        offered = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
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

    # --- what a job needs ----------------------------------------------------------------------------

    def _mode(self, job: Job) -> str:
        if job.mask is not None or self.inpainting_model:
            return "inpaint"
        return "img2img" if job.init_image is not None else "txt2img"

    def _pipeline(self, job: Job):
        """The diffusers pipeline class for the job's mode, sharing the base pipeline's modules."""
        import diffusers

        controlled = job.control_image is not None
        if controlled and self.controlnet is None:
            why = (
                "this model has no ControlNet attached"
                if self.takes_controlnet
                else f"{self.manifest['family'].upper()} models take no ControlNet"
            )
            raise JobError(f"{why}, so control_image cannot be honoured", "control_image", "controlnet_unavailable")
        kind = type(self.base).__name__.removesuffix("Pipeline")  # StableDiffusionXL: StableDiffusionXLImg2Img...
        name = f"{kind}{'ControlNet' if controlled else ''}{MODE_NAMES[self._mode(job)]}Pipeline"
        if name not in self._pipelines:
            cls = getattr(diffusers, name)
            offered = {**self.base.components, "controlnet": self.controlnet, "requires_safety_checker": False}
            pipeline = cls(**{key: value for key, value in offered.items() if _accepts(cls.__init__, key)})
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[name] = pipeline
        return self._pipelines[name]

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
        return cls(**_scheduler_config(self.manifest), **extra, **options)

    def total_steps(self, job: Job) -> int:
        """diffusers' denoising loop length for the job (Heun and DPM2 take two iterations per step)."""
        scheduler = self.scheduler(job)
        try:  # (a flow schedule's length does not depend on its shift, mu)
            scheduler.set_timesteps(job.steps, **({"mu": 0.0} if self.flow else {}))
        except ValueError as exc:  # e.g. LCM's 50-step limit
            raise JobError(str(exc), "steps", "invalid_value") from None
        if job.init_image is None:
            return len(scheduler.timesteps)
        if self.flow:  # diffusers' flow pipelines' img2img/inpaint rule (see the module docstring)
            kept = job.steps - int(max(job.steps - min(job.steps * job.strength, job.steps), 0))
            if kept < 1:
                raise JobError(
                    f"strength {job.strength} leaves no step of {job.steps} to run; diffusers' flow "
                    "pipelines need at least one",
                    "strength",
                    "invalid_value",
                )
        else:
            kept = min(int(job.steps * job.strength), job.steps)  # diffusers' img2img rule
        return len(scheduler.timesteps) - (job.steps - kept) * scheduler.order

    def _arguments(self, pipeline, job: Job, noise: NoiseSource | None) -> dict[str, Any]:
        import torch

        size = (job.width, job.height)
        mode = self._mode(job)
        args: dict[str, Any] = dict(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt or None,  # None lets SDXL use zeros for an empty one
            num_inference_steps=job.steps,
            guidance_scale=job.cfg_scale,
            num_images_per_prompt=job.n,
            generator=[torch.Generator().manual_seed(seed) for seed in job.seeds()],
            output_type="pil",
        )
        if _accepts(pipeline.__call__, "true_cfg_scale"):
            # cfg_scale is true CFG (FluxPipeline runs it only with a negative prompt, "" included), and
            # guidance_scale the distilled guidance
            args.update(
                negative_prompt=job.negative_prompt,
                true_cfg_scale=job.cfg_scale,
                guidance_scale=job.guidance if job.guidance is not None else DEFAULT_GUIDANCE,
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
        if noise is not None and mode == "txt2img":  # tests inject the starting latents (step noise: the seeds)
            h, w = self._latent_size(job)
            channels = self.base.vae.config.latent_channels
            latents = torch.from_numpy(np.array(noise.initial((job.n, h, w, channels)).transpose(0, 3, 1, 2)))
            args["latents"] = self.base._pack_latents(latents, job.n, channels, h, w) if self.packed else latents
        return args

    def _latent_size(self, job: Job) -> tuple[int, int]:
        return job.height // self.base.vae_scale_factor, job.width // self.base.vae_scale_factor

    def _our_latents(self, latents, job: Job) -> mx.array:
        """diffusers' latents (NCHW, or packed tokens) as ours: (B, h, w, C)."""
        if self.packed:
            latents = self.base._unpack_latents(latents, job.height, job.width, self.base.vae_scale_factor)
        return mx.array(latents.float().cpu().numpy()).transpose(0, 2, 3, 1)

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


def _fit(image: Image.Image, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Resized and centre-cropped exactly as the MLX pipeline does, so both engines see the same pixels."""
    pixels = fit_image(image, *size, mode=mode)
    return _to_pil(pixels[..., 0] if mode == "L" else pixels)


def _to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8))
