"""The generation pipeline: a job in, images out, one `Step` per denoising step.

The loop every model family shares: encode the prompt, make noise (img2img and inpainting noise the encoded
image to the first sigma), run a sampler over the family's denoiser, blend the known latents back after
every step (inpainting with a regular model; an inpainting model gets mask and masked image as input),
decode, paste the untouched pixels back. What differs per family lives in `families/`: reference images
(instruction edits) reach the family in its `Settings`, and it feeds them to its network itself; the spec says
how a mask meets the latent grid and whether the source image is also a reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Protocol, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image, ImageFilter

from mlx_sd_server.engine.adapters import Adapters, applied
from mlx_sd_server.engine.families import spec_for
from mlx_sd_server.engine.families.runtime import Family, Settings, encode_pixels
from mlx_sd_server.engine.hires import LATENT_UPSCALE_MODES, upscale_latents
from mlx_sd_server.engine.model_io import LoadedModel, module_bytes
from mlx_sd_server.engine.request import Request
from mlx_sd_server.engine.sampling.denoiser import NOISING
from mlx_sd_server.engine.sampling.samplers import SAMPLERS, Step
from mlx_sd_server.engine.sampling.schedules import img2img_sigmas
from mlx_sd_server.engine.vae import should_tile

log = logging.getLogger(__name__)

MASK_FEATHER_PX = 4  # paste-back blends within 3x this many pixels of the mask, so no seam shows


T = TypeVar("T")
Upscale = Callable[[str, Image.Image, float], Image.Image]  # (upscaler, image, scale) -> the image enlarged


def drive(steps: Generator[Step, None, T], on_step: Callable[[Step], None] | None = None) -> T:
    """Run a pipeline's step generator to the end, calling `on_step` after each step; returns its result.
    `on_step` may raise to stop early (the generator is closed)."""
    try:
        while True:
            step = next(steps)
            if on_step is not None:
                on_step(step)
    except StopIteration as finished:
        return finished.value
    finally:
        steps.close()


class NoiseSource(Protocol):
    """Where the pipeline's randomness comes from: the job's seeds, or (in tests) injected arrays."""

    def initial(self, shape: tuple[int, ...]) -> mx.array: ...
    def step(self, shape: tuple[int, ...]) -> mx.array: ...


class SeededNoise:
    """One independent stream per image seed, so image i of a batch equals that seed's image with n=1."""

    def __init__(self, seeds: list[int]):
        self.keys = [mx.random.key(seed) for seed in seeds]

    def _draw(self, shape: tuple[int, ...]) -> mx.array:
        draws = []
        for i, key in enumerate(self.keys):
            self.keys[i], sub = mx.random.split(key)
            draws.append(mx.random.normal((1, *shape[1:]), key=sub))
        return mx.concatenate(draws)

    initial = step = _draw


def fit_image(image: Image.Image, width: int, height: int, mode: str = "RGB") -> np.ndarray:
    """Resize (cover, then centre-crop) to exactly width x height; float32 in [0, 1], HWC."""
    image = image.convert(mode)
    scale = max(width / image.width, height / image.height)
    if image.size != (width, height):
        resized = image.resize(
            (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.Resampling.LANCZOS
        )
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        image = resized.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _to_image(pixels: mx.array) -> Image.Image:
    array = np.array(mx.clip(pixels.astype(mx.float32) / 2 + 0.5, 0, 1))
    return Image.fromarray((array * 255).round().astype(np.uint8))


class DiffusionPipeline:
    """A loaded model turned into a job runner. `generate(job)` yields a `Step` per step (its latents
    evaluated), returns the images."""

    def __init__(
        self,
        model: LoadedModel,
        paste_back: bool = True,
        loras: Callable[[str, LoadedModel], Adapters] | None = None,
        lora_fuse_budget: int = 0,
        upscale: Upscale | None = None,
    ):
        """`loras(name, model)`: LoRA `name` bound to the model (lora.library.LoRALibrary.bound); LoRAs are
        fused into copies of the layers they adapt up to `lora_fuse_budget` bytes of weights (engine/adapters.py).
        `upscale` enlarges a hires job's first images by the upscaler it names (upscale.library.UpscalerLibrary)."""
        self.model = model
        self.paste_back = paste_back
        self.loras = loras
        self.upscale = upscale
        self.lora_fuse_budget = lora_fuse_budget
        spec = spec_for(model.family)
        self.family: Family = spec.runtime(model)
        self.inpainting_channels = spec.inpainting_channels
        self.latent_mask = spec.latent_mask
        self.source_as_reference = spec.source_as_reference
        self.unreads_denoiser = spec.low_memory_unreads_denoiser
        self.noising = NOISING[self.family.prediction_type]
        self.bundled_controlnet = model.controlnet  # the model folder's own ControlNet, if it has one

    # --- memory ------------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """The bytes of the model's weights at their compute dtype (its ControlNets are counted apart)."""
        modules = [m for name, m in self.model.components.items() if name != "controlnet"]
        return sum(module_bytes(m) for m in [*modules, *self.model.text_encoders.values()]) + (
            module_bytes(self.bundled_controlnet) if self.bundled_controlnet is not None else 0
        )

    def materialize(self) -> None:
        """Read every weight into memory now (they are read lazily, on first use, otherwise)."""
        for module in [*self.model.components.values(), *self.model.text_encoders.values()]:
            mx.eval(module.parameters())

    def use_controlnet(self, controlnet: nn.Module | None) -> None:
        """The ControlNet the next jobs use: `controlnet`, else the model's bundled one (or none)."""
        chosen = controlnet if controlnet is not None else self.bundled_controlnet
        if chosen is None:
            self.model.components.pop("controlnet", None)
        else:
            self.model.components["controlnet"] = chosen

    # --- schedule ----------------------------------------------------------------------------------

    def sigmas(self, job: Request, img2img: bool = False) -> np.ndarray:
        """The job's schedule; `img2img` (or an init image): the part of it `strength` re-runs."""
        sigmas = self.family.sigmas(Settings.of(job))
        if img2img or job.init_image is not None:
            sigmas = img2img_sigmas(sigmas, job.steps, job.strength, flow=self.family.prediction_type == "flow")
        return sigmas

    def total_steps(self, job: Request) -> int:
        if job.hr_scale is None:
            return len(self.sigmas(job)) - 1
        second = len(self.sigmas(job.second_pass(0, None), img2img=True)) - 1
        return self.total_steps(job.first_pass()) + job.n * second

    def encode_prompts(self, job: Request, guided: bool):
        """The family's conditioning for [negative, prompt] (or the prompt alone)."""
        return self.family.encode_prompts(Settings.of(job), guided)

    # --- images ------------------------------------------------------------------------------------

    def encode_image(self, pixels: np.ndarray) -> mx.array:
        """[0,1] HWC pixels -> the sampler's latents (1, h, w, C) (the VAE's latent space), from the posterior mean."""
        return encode_pixels(self.model, pixels)

    def decode_latents(self, latents: mx.array) -> list[Image.Image]:
        vae = self.model.vae
        z = vae.from_latents(latents).astype(self.model.vae_dtype)
        images = []
        for i in range(z.shape[0]):  # one at a time: decoding is the memory peak
            zi = z[i : i + 1]
            tile = should_tile(zi.shape[1], zi.shape[2], self.model.low_memory)
            pixels = vae.decode_tiled(zi) if tile else vae.decode(zi)
            mx.eval(pixels)
            images.append(_to_image(pixels[0]))
        return images

    # --- the job -----------------------------------------------------------------------------------

    def generate(self, job: Request, noise: NoiseSource | None = None) -> Generator[Step, None, list[Image.Image]]:
        """Yield a `Step` after each denoising step; return the n images. The job's LoRAs are on the model
        for exactly this long."""
        if self.unreads_denoiser:  # (before the LoRAs go on: they wrap or copy its layers)
            self.model.unread_denoisers()
        loras: list[tuple[Adapters, float]] = []
        if job.loras:
            assert self.loras is not None, "build_job takes LoRAs only where a LoRA folder is"
            loras = [(self.loras(name, self.model), weight) for name, weight in job.loras]
        with applied(self.model, loras, self.lora_fuse_budget):
            if job.hr_scale is not None:
                return (yield from self._hires(job, noise))
            return (yield from self._generate(job, noise or SeededNoise(job.seeds())))

    def _hires(self, job: Request, noise: NoiseSource | None) -> Generator[Step, None, list[Image.Image]]:
        """Hires fix: the job at its size (`noise`, else its seeds' noise), then per image an img2img at the hires
        size of the image enlarged by `hr_upscaler` (or of its latents, interpolated), with the image's seed.
        Steps are numbered on across the passes."""
        first = job.first_pass()
        latents = yield from self._renumbered(self.sample(first, noise or SeededNoise(first.seeds())), 0)
        done = self.total_steps(first)
        images = []
        for index, seed in enumerate(job.seeds()):
            latent = latents[index : index + 1]
            second = job.second_pass(index, None)
            init = None
            if job.hr_upscaler in LATENT_UPSCALE_MODES:  # in the VAE's space (the sampler's may be patchified)
                vae = self.model.vae
                z = vae.from_latents(latent)
                patch = z.shape[1] // latent.shape[1]
                _, height, width, _ = vae.latent_shape(1, second.height, second.width)
                init = vae.to_latents(upscale_latents(z, height * patch, width * patch, job.hr_upscaler))
            else:
                assert self.upscale is not None, "build_job takes an upscaler only where the server has them"
                (image,) = self.decode_latents(latent)
                enlarged = self.upscale(job.hr_upscaler, image, second.width / image.width)
                second = job.second_pass(index, enlarged)
            x = yield from self._renumbered(self.sample(second, SeededNoise([seed]), init), done)
            done += len(self.sigmas(second, img2img=True)) - 1
            images.extend(self.decode_latents(x))
        return images

    @staticmethod
    def _renumbered(steps: Generator[Step, None, T], offset: int) -> Generator[Step, None, T]:
        """A pass's steps numbered from `offset` on, as one job's."""
        try:
            step = next(steps)
            while True:
                sent = yield replace(step, index=step.index + offset)
                step = steps.send(sent)
        except StopIteration as finished:
            return finished.value

    def _generate(self, job: Request, noise: NoiseSource) -> Generator[Step, None, list[Image.Image]]:
        x = yield from self.sample(job, noise)
        images = self.decode_latents(x)
        if job.mask is not None and job.init_image is not None and self.paste_back:
            images = [paste_outside_mask(img, job.init_image, job.mask) for img in images]
        return images

    def sample(
        self, job: Request, noise: NoiseSource, init_latents: mx.array | None = None
    ) -> Generator[Step, None, mx.array]:
        """The job's latents; `init_latents` (the sampler's space, one image): an img2img starting from them."""
        vae = self.model.vae
        shape = vae.latent_shape(job.n, job.height, job.width)  # the space the sampler works in
        settings = Settings.of(job)
        if self.source_as_reference and job.init_image is not None:  # the source, as it is noised, read first
            source = Image.fromarray((fit_image(job.init_image, job.width, job.height) * 255).round().astype(np.uint8))
            settings = replace(settings, reference_images=(source, *settings.reference_images))
        guided = self.family.guided(settings)
        conditioning = self.family.encode_prompts(settings, guided)
        mx.eval(conditioning)
        self.model.text_encoding_done()
        sigmas = [float(s) for s in self.sigmas(job, img2img=init_latents is not None)]

        mask_latents = extra = control = None
        if job.init_image is not None:
            init_pixels = fit_image(job.init_image, job.width, job.height)
            init_latents = self.encode_image(init_pixels)
        if job.mask is not None:
            mask_pixels = fit_image(job.mask, job.width, job.height, mode="L")[..., 0] >= 0.5
            mask_latents = mx.array(self.latent_mask(mask_pixels, vae.latent_downscale))[None, :, :, None]
        if self.family.inpainting_model:
            # diffusers' convention: the repaint area is mid-grey (0 in [-1, 1]) in the masked image; with no
            # mask, an inpainting model repaints everything
            if job.mask is not None:
                masked_pixels = np.where(mask_pixels[..., None], 0.5, init_pixels).astype(np.float32)
            else:
                mask_pixels = np.ones((job.height, job.width), bool)
                masked_pixels = np.full((job.height, job.width, 3), 0.5, np.float32)
            masked = self.encode_image(masked_pixels)
            extra = mx.repeat(self.inpainting_channels(mask_pixels, masked, vae.latent_downscale), job.n, axis=0)
        if job.control_image is not None:
            assert self.model.controlnet is not None, "build_job takes control_image only with a ControlNet attached"
            from mlx_sd_server.engine.canny import canny

            control_pixels = fit_image(job.control_image, job.width, job.height)
            if job.control_preprocess == "canny":
                control_pixels = canny(control_pixels)
            control = mx.array(control_pixels[None])

        initial_noise = noise.initial(shape)
        if init_latents is None or (job.mask is not None and job.strength >= 1.0):  # from scratch
            start = mx.zeros(shape)
        else:
            start = mx.repeat(init_latents, job.n, axis=0)
        x = self.noising.add_noise(start, initial_noise, sigmas[0])

        denoise = self.family.denoiser(settings, conditioning, guided, extra, control)
        blend = mask_latents is not None and not self.family.inpainting_model
        steps = SAMPLERS[job.sample_method](denoise, x, sigmas, lambda: noise.step(shape), noising=self.noising)
        for i in range(len(sigmas) - 1):
            step = steps.send(x if i else None)  # the sampler goes on from the x sent back
            x = step.x
            if blend:  # keep what is outside the mask: the original, noised to where the sampler is now
                assert init_latents is not None and mask_latents is not None  # (build_job: a mask needs an image)
                known = self.noising.add_noise(init_latents, initial_noise, sigmas[i + 1])
                x = x * mask_latents + known * (1 - mask_latents)
            mx.eval(x, step.denoised)
            yield replace(step, x=x)
        return x


def paste_outside_mask(image: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Untouched areas get the original pixels back exactly; the mask edge is feathered slightly."""
    size = image.size
    original_pixels = Image.fromarray((fit_image(original, *size) * 255).round().astype(np.uint8))
    hard = Image.fromarray(((fit_image(mask, *size, mode="L")[..., 0] >= 0.5) * 255).astype(np.uint8))
    soft = hard.filter(ImageFilter.MaxFilter(2 * MASK_FEATHER_PX + 1)).filter(
        ImageFilter.GaussianBlur(MASK_FEATHER_PX / 2)
    )
    return Image.composite(image, original_pixels, soft)
