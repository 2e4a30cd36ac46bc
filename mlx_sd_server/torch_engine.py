"""The fallback engine: the same jobs run by diffusers on torch (`serve --engine torch`).

torch and diffusers are an optional extra, imported only when this engine is asked for. It reads OUR
converted folder, so a model is converted once and both engines serve it: each diffusers/transformers
module is built from the config in the manifest, and its weights come from our safetensors through the
inverse of our conversion mapping (see `_torch_state_dict`). It speaks the MLX pipeline's protocol:
`total_steps(job)`, and `generate(job)` yielding a `Step` per loop iteration (diffusers'
`callback_on_step_end`; its latents, no denoised estimate) and returning PIL images, cancellable between steps.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Generator

import mlx.core as mx
import numpy as np
from PIL import Image

from convert.model import MAPPERS
from mlx_sd_server.engine.model_io import component_class, read_manifest
from mlx_sd_server.engine.pipeline import NoiseSource, Step, paste_outside_mask, fit_image
from mlx_sd_server.job import Job, JobError

log = logging.getLogger(__name__)

# Our sample methods -> the diffusers scheduler that takes the same steps, and its extra config.
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}),
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

    ours = mx.load(str(weights_file))
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
    module.load_state_dict(_torch_state_dict(module, folder / entry["weights"], MAPPERS[class_name]), strict=False)
    return module.eval()


def _check_unquantized(manifest: dict, folder: Path) -> None:
    if manifest.get("quantization"):
        raise ValueError(f"{folder} is quantized; the torch engine needs an unquantized conversion "
                         "(convert again without --quantize)")


def _scheduler_config(manifest: dict) -> dict[str, Any]:
    """The model's training schedule; steps_offset=1 as every SD release ships (only "leading" spacing uses it)."""
    return {**manifest["scheduler"], "prediction_type": manifest["prediction_type"], "steps_offset": 1}


class TorchPipeline:
    """A converted model run by diffusers. Build with `from_folder`."""

    def __init__(self, base, manifest: dict, controlnet=None):
        self.base = base  # the txt2img diffusers pipeline; the other modes' pipelines share its modules
        self.manifest = manifest
        self.controlnet = controlnet
        self.is_sdxl = manifest["family"] == "sdxl"
        self.inpainting_unet = base.unet.config.in_channels == 9
        self._pipelines: dict[str, Any] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, control_net: str | os.PathLike | None = None,
                    device: str | None = None, dtype: str | None = None) -> "TorchPipeline":
        """Load a converted folder (and optionally a converted ControlNet folder) into diffusers.

        `device` defaults to cuda, then mps, then cpu; `dtype` to float16 on a GPU, float32 on the CPU.
        """
        import diffusers
        import torch
        import transformers

        folder = Path(folder)
        manifest = read_manifest(folder)
        _check_unquantized(manifest, folder)
        components = manifest["components"]
        device = device or default_device()
        torch_dtype = getattr(torch, dtype or ("float32" if device == "cpu" else "float16"))
        modules = {name: _build_component(name, components[name], folder)
                   for name in ("text_encoder", "text_encoder_2", "unet", "vae") if name in components}
        for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if encoder in components:
                tokenizer_folder = folder / components[encoder]["tokenizer"]
                modules[tokenizer] = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder))
        modules["scheduler"] = diffusers.EulerDiscreteScheduler(**_scheduler_config(manifest))  # replaced per job
        if manifest["family"] == "sdxl":
            base = diffusers.StableDiffusionXLPipeline(**modules)
        else:
            base = diffusers.StableDiffusionPipeline(**modules, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
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
        log.info("torch engine: %s (%s) on %s, %s, diffusers %s", manifest.get("name", folder.name),
                 manifest["family"], device, torch_dtype, diffusers.__version__)
        return cls(base, manifest, controlnet)

    # --- what a job needs ----------------------------------------------------------------------------

    def _mode(self, job: Job) -> str:
        if job.mask is not None or self.inpainting_unet:
            return "inpaint"
        return "img2img" if job.init_image is not None else "txt2img"

    def _pipeline(self, job: Job):
        """The diffusers pipeline class for the job's mode, sharing the base pipeline's modules."""
        import diffusers

        controlled = job.control_image is not None
        if controlled and self.controlnet is None:
            raise JobError("this model has no ControlNet attached, so control_image cannot be honoured",
                           "control_image", "controlnet_unavailable")
        name = (f"StableDiffusion{'XL' if self.is_sdxl else ''}{'ControlNet' if controlled else ''}"
                f"{MODE_NAMES[self._mode(job)]}Pipeline")
        if name not in self._pipelines:
            cls = getattr(diffusers, name)
            accepted = inspect.signature(cls.__init__).parameters
            offered = {**self.base.components, "controlnet": self.controlnet, "requires_safety_checker": False}
            pipeline = cls(**{key: value for key, value in offered.items() if key in accepted})
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[name] = pipeline
        return self._pipelines[name]

    def scheduler(self, job: Job):
        """The diffusers scheduler for the job's sample_method and scheduler, or a JobError (a 400)."""
        import diffusers

        if job.sample_method not in DIFFUSERS_SCHEDULERS:
            raise JobError(f"sample_method {job.sample_method!r} has no diffusers equivalent; the torch engine "
                           f"supports {', '.join(DIFFUSERS_SCHEDULERS)}", "sample_method", "unsupported_sample_method")
        class_name, extra = DIFFUSERS_SCHEDULERS[job.sample_method]
        cls = getattr(diffusers, class_name)
        options = SCHEDULE_OPTIONS.get(job.scheduler)
        accepted = inspect.signature(cls.__init__).parameters
        lcm_mismatch = (job.scheduler == "lcm") != (job.sample_method == "lcm")
        if options is None or lcm_mismatch or not set(options) <= set(accepted):
            raise JobError(f"scheduler {job.scheduler!r} is not available with sample_method {job.sample_method!r} "
                           "on the torch engine", "scheduler", "unsupported_scheduler")
        return cls(**_scheduler_config(self.manifest), **extra, **options)

    def total_steps(self, job: Job) -> int:
        """diffusers' denoising loop length for the job (Heun and DPM2 take two iterations per step)."""
        scheduler = self.scheduler(job)
        try:
            scheduler.set_timesteps(job.steps)
        except ValueError as exc:  # e.g. LCM's 50-step limit
            raise JobError(str(exc), "steps", "invalid_value") from None
        if job.init_image is None:
            return len(scheduler.timesteps)
        kept = min(int(job.steps * job.strength), job.steps)  # diffusers' img2img rule
        return len(scheduler.timesteps) - (job.steps - kept) * scheduler.order

    def _arguments(self, job: Job, noise: NoiseSource | None) -> dict[str, Any]:
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
        if mode != "img2img" or job.control_image is not None:
            args.update(height=job.height, width=job.width)  # (img2img takes the size of its image)
        if mode != "txt2img":  # an inpainting UNet with nothing to edit repaints a blank grey image
            blank = Image.new("RGB", size, (128, 128, 128))
            args["image"] = _fit(job.init_image, size) if job.init_image is not None else blank
            args["strength"] = job.strength if job.init_image is not None else 1.0
        if mode == "inpaint":
            args["mask_image"] = _fit(job.mask, size, "L") if job.mask is not None else Image.new("L", size, 255)
        if job.control_image is not None:
            args["image" if mode == "txt2img" else "control_image"] = self._control_image(job)
            args["controlnet_conditioning_scale"] = job.control_strength
        if noise is not None and mode == "txt2img":  # tests inject the starting latents (step noise: the seeds)
            scale = 2 ** (len(self.base.vae.config.block_out_channels) - 1)
            initial = noise.initial((job.n, job.height // scale, job.width // scale, 4))
            args["latents"] = torch.from_numpy(np.array(initial).transpose(0, 3, 1, 2))
        return args

    def _control_image(self, job: Job) -> Image.Image:
        pixels = fit_image(job.control_image, job.width, job.height)
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
        pipeline = self._pipeline(job)
        pipeline.scheduler = self.scheduler(job)
        args = self._arguments(job, noise)
        log.info("torch engine: %s, %d steps of %s/%s",
                 type(pipeline).__name__, job.steps, job.sample_method, job.scheduler)
        progress: queue.Queue[Step | None] = queue.Queue()
        resume = threading.Semaphore(0)
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def on_step_end(_pipeline, step: int, timestep, tensors: dict) -> dict:
            latents = mx.array(tensors["latents"].float().numpy().transpose(0, 2, 3, 1))
            progress.put(Step(step, float(timestep), latents, None))
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
        if job.mask is not None:
            images = [paste_outside_mask(image, job.init_image, job.mask) for image in images]
        return images


def _fit(image: Image.Image, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Resized and centre-cropped exactly as the MLX pipeline does, so both engines see the same pixels."""
    pixels = fit_image(image, *size, mode=mode)
    return _to_pil(pixels[..., 0] if mode == "L" else pixels)


def _to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8))
