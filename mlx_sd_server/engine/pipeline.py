"""The generation pipeline: a Job in, images out, one denoising step per yield.

txt2img, img2img (`strength`), inpainting (a regular model blends the known latents back after every step;
a 9-channel inpainting UNet gets mask and masked image as input) and ControlNet, for SD 1.x/2.x/XL and
LCM models, on the components loaded by `model_io`.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Generator, Protocol

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

from mlx_sd_server.engine.denoiser import model_denoiser
from mlx_sd_server.engine.model_io import LoadedModel
from mlx_sd_server.engine.prompt import Chunk, chunk_prompt, pad_chunks
from mlx_sd_server.engine.samplers import SAMPLERS
from mlx_sd_server.engine.schedules import img2img_sigmas, make_sigmas, training_sigmas
from mlx_sd_server.engine.vae import should_tile
from mlx_sd_server.job import Job, JobError

log = logging.getLogger(__name__)

LATENT_CHANNELS = 4
MASK_FEATHER_PX = 4  # paste-back blends within 3x this many pixels of the mask, so no seam shows


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
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.LANCZOS)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        image = resized.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _to_image(pixels: mx.array) -> Image.Image:
    array = np.array(mx.clip(pixels.astype(mx.float32) / 2 + 0.5, 0, 1))
    return Image.fromarray((array * 255).round().astype(np.uint8))


class DiffusionPipeline:
    """A loaded model turned into a job runner. `generate(job)` yields steps done, returns the images."""

    def __init__(self, model: LoadedModel, paste_back: bool = True):
        self.model = model
        self.paste_back = paste_back
        manifest = model.manifest
        self.table = training_sigmas(**manifest["scheduler"])
        self.denoiser_kind = manifest["prediction_type"]
        self.is_sdxl = model.family == "sdxl"
        self.unet_config = manifest["components"]["unet"]["config"]
        self.guidance_embedding_dim = self.unet_config.get("time_cond_proj_dim")
        self.inpainting_unet = self.unet_config.get("in_channels", 4) == 9

    # --- schedule ----------------------------------------------------------------------------------

    def sigmas(self, job: Job) -> np.ndarray:
        try:
            sigmas = make_sigmas(job.scheduler, job.steps, self.table, self.model.family)
        except ValueError as exc:  # e.g. the lcm schedule has at most 50 steps
            raise JobError(str(exc), "steps", "invalid_value") from None
        if job.init_image is not None:
            sigmas = img2img_sigmas(sigmas, job.steps, job.strength)
        return sigmas

    def total_steps(self, job: Job) -> int:
        return len(self.sigmas(job)) - 1

    # --- text --------------------------------------------------------------------------------------

    def _encode_chunks(self, chunks_per_encoder: list[list[Chunk]]) -> tuple[mx.array, mx.array | None]:
        """Embeddings (1, 77*k, D) with emphasis applied, and SDXL's pooled embedding (1, P)."""
        embeddings, pooled = [], None
        for encoder, chunks in zip(self.model.text_encoders, chunks_per_encoder):
            ids = mx.array([c.ids for c in chunks])
            out = encoder(ids)
            hidden = out.hidden_states[-2] if self.is_sdxl else out.last_hidden_state
            hidden = hidden.astype(mx.float32)
            weights = mx.array([c.weights for c in chunks], dtype=mx.float32)[..., None]
            if not mx.all(weights == 1.0).item():  # A1111: weight, then restore the original mean
                original_mean = hidden.mean()
                hidden = hidden * weights
                hidden = hidden * (original_mean / hidden.mean())
            embeddings.append(hidden.reshape(1, -1, hidden.shape[-1]))
            if out.text_embeds is not None:
                pooled = out.text_embeds[:1].astype(mx.float32)
        return mx.concatenate(embeddings, axis=-1), pooled

    def encode_prompts(self, job: Job, guided: bool) -> tuple[mx.array, mx.array | None]:
        """Context (B, L, D) for [uncond, cond] (or [cond] alone), and pooled (B, P) for SDXL."""
        tokenizers = self.model.tokenizers
        cond = [chunk_prompt(tok, job.prompt) for tok in tokenizers]
        if not guided:
            return self._encode_chunks(cond)
        uncond = [chunk_prompt(tok, job.negative_prompt) for tok in tokenizers]
        count = max(len(c) for c in cond + uncond)
        empties = [chunk_prompt(t, "")[0] for t in tokenizers]
        cond = [pad_chunks(c, count, empty) for c, empty in zip(cond, empties)]
        uncond = [pad_chunks(c, count, empty) for c, empty in zip(uncond, empties)]
        cond_context, cond_pooled = self._encode_chunks(cond)
        if self.is_sdxl and not job.negative_prompt:  # SDXL's "force_zeros_for_empty_prompt"
            uncond_context, uncond_pooled = mx.zeros_like(cond_context), mx.zeros_like(cond_pooled)
        else:
            uncond_context, uncond_pooled = self._encode_chunks(uncond)
        pooled = None if cond_pooled is None else mx.concatenate([uncond_pooled, cond_pooled])
        return mx.concatenate([uncond_context, cond_context]), pooled

    # --- images ------------------------------------------------------------------------------------

    def encode_image(self, pixels: np.ndarray) -> mx.array:
        """[0,1] HWC pixels -> scaled latents (1, h, w, 4), using the posterior mean."""
        vae = self.model.vae
        x = mx.array(pixels[None] * 2 - 1).astype(self.model.vae_dtype)
        mean, _ = vae.encode(x)
        return mean.astype(mx.float32) * vae.scaling_factor

    def decode_latents(self, latents: mx.array) -> list[Image.Image]:
        vae = self.model.vae
        z = (latents / vae.scaling_factor).astype(self.model.vae_dtype)
        images = []
        for i in range(z.shape[0]):  # one at a time: decoding is the memory peak
            zi = z[i : i + 1]
            pixels = vae.decode_tiled(zi) if should_tile(*zi.shape[1:3], self.model.low_memory) else vae.decode(zi)
            mx.eval(pixels)
            images.append(_to_image(pixels[0]))
        return images

    # --- the denoiser ------------------------------------------------------------------------------

    def _predictor(self, job: Job, guided: bool,
                   context: mx.array, pooled: mx.array | None, extra_channels: mx.array | None,
                   control: mx.array | None) -> Callable[[mx.array, float], mx.array]:
        """predict(x_in, t) -> the UNet's output for the batch, with classifier-free guidance applied."""
        unet, controlnet, dtype = self.model.unet, self.model.controlnet, self.model.dtype
        n = job.n
        copies = 2 if guided else 1
        context = mx.repeat(context, n, axis=0).astype(dtype)  # [uncond]*n + [cond]*n
        kwargs: dict = {}
        if self.is_sdxl:
            h, w = job.height, job.width
            time_ids = mx.array([[h, w, 0, 0, h, w]] * (copies * n), dtype=mx.float32)
            kwargs.update(text_embeds=mx.repeat(pooled, n, axis=0).astype(dtype), time_ids=time_ids.astype(dtype))
        if self.guidance_embedding_dim:
            w_embed = guidance_scale_embedding(job.cfg_scale - 1.0, self.guidance_embedding_dim)
            kwargs["timestep_cond"] = mx.repeat(w_embed, copies * n, axis=0).astype(dtype)
        if control is not None:
            control = mx.repeat(control, copies * n, axis=0).astype(dtype)

        def predict(x_in: mx.array, t: float) -> mx.array:
            if extra_channels is not None:
                x_in = mx.concatenate([x_in, extra_channels], axis=-1)
            batch = mx.concatenate([x_in] * copies).astype(dtype)
            timesteps = mx.full((batch.shape[0],), t, dtype=mx.float32)
            residuals = {}
            if control is not None and job.control_strength > 0:
                down, mid = controlnet(batch, timesteps, context, control,
                                       conditioning_scale=job.control_strength,
                                       text_embeds=kwargs.get("text_embeds"), time_ids=kwargs.get("time_ids"))
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out = unet(batch, timesteps, context, **kwargs, **residuals).astype(mx.float32)
            if not guided:
                return out
            uncond, cond = out[:n], out[n:]
            return uncond + job.cfg_scale * (cond - uncond)

        return predict

    # --- the job -----------------------------------------------------------------------------------

    def generate(self, job: Job, noise: NoiseSource | None = None) -> Generator[int, None, list[Image.Image]]:
        """Yield the number of steps done after each denoising step; return the n images."""
        noise = noise or SeededNoise(job.seeds())
        scale = self.model.vae.latent_scale
        h, w = job.height // scale, job.width // scale
        shape = (job.n, h, w, LATENT_CHANNELS)
        # LCM-distilled UNets take guidance as an input; otherwise guidance needs a second (uncond) pass.
        guided = job.cfg_scale > 1.0 and not self.guidance_embedding_dim
        context, pooled = self.encode_prompts(job, guided)
        mx.eval(context, pooled)
        self.model.text_encoding_done()
        sigmas = self.sigmas(job)

        init_latents = mask_latents = extra = control = None
        if job.init_image is not None:
            init_pixels = fit_image(job.init_image, job.width, job.height)
            init_latents = self.encode_image(init_pixels)
        if job.mask is not None:
            mask_pixels = fit_image(job.mask, job.width, job.height, mode="L")[..., 0] >= 0.5
            mask_latents = mx.array(_downsample_mask(mask_pixels, scale))[None, :, :, None]
            if self.inpainting_unet:
                # diffusers' convention: the repaint area is mid-grey (0 in [-1, 1]) in the masked image
                masked = self.encode_image(np.where(mask_pixels[..., None], 0.5, init_pixels).astype(np.float32))
                extra = mx.repeat(mx.concatenate([mask_latents, masked], axis=-1), job.n, axis=0)
        elif self.inpainting_unet:  # an inpainting UNet with no mask repaints everything
            blank = self.encode_image(np.full((job.height, job.width, 3), 0.5, np.float32))
            extra = mx.repeat(mx.concatenate([mx.ones((1, h, w, 1)), blank], axis=-1), job.n, axis=0)
        if job.control_image is not None:
            if self.model.controlnet is None:
                raise JobError("this model has no ControlNet attached, so control_image cannot be honoured",
                               "control_image", "controlnet_unavailable")
            from mlx_sd_server.engine.canny import canny

            control_pixels = fit_image(job.control_image, job.width, job.height)
            if job.control_preprocess == "canny":
                control_pixels = canny(control_pixels)
            control = mx.array(control_pixels[None])

        initial_noise = noise.initial(shape)
        if init_latents is None or (job.mask is not None and job.strength >= 1.0):  # start from pure noise
            x = initial_noise * float(sigmas[0])
        else:
            x = mx.repeat(init_latents, job.n, axis=0) + initial_noise * float(sigmas[0])

        predict = self._predictor(job, guided, context, pooled, extra, control)
        denoise = model_denoiser(predict, self.denoiser_kind, self.table)
        blend = mask_latents is not None and not self.inpainting_unet
        steps = SAMPLERS[job.sample_method](denoise, x, [float(s) for s in sigmas], lambda: noise.step(shape))
        for i in range(len(sigmas) - 1):
            x = steps.send(x if i else None)
            if blend:  # keep what is outside the mask: the original, noised to where the sampler is now
                known = init_latents + initial_noise * float(sigmas[i + 1])
                x = x * mask_latents + known * (1 - mask_latents)
            mx.eval(x)
            yield i + 1
        images = self.decode_latents(x)
        if job.mask is not None and self.paste_back:
            images = [paste_outside_mask(img, job.init_image, job.mask) for img in images]
        return images


def guidance_scale_embedding(w: float, dim: int) -> mx.array:
    """LCM's guidance embedding (sinusoidal in 1000·w), as diffusers computes it."""
    half = dim // 2
    freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000.0) / (half - 1)))
    args = w * 1000.0 * freqs
    emb = mx.concatenate([mx.sin(args), mx.cos(args)])
    if dim % 2:
        emb = mx.concatenate([emb, mx.zeros((1,))])
    return emb[None]


def _downsample_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """Max-pool to latent size: a latent pixel is repainted if any of its image pixels is."""
    h, w = mask.shape[0] // scale, mask.shape[1] // scale
    return mask[: h * scale, : w * scale].reshape(h, scale, w, scale).max(axis=(1, 3)).astype(np.float32)


def paste_outside_mask(image: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Untouched areas get the original pixels back exactly; the mask edge is feathered slightly."""
    size = image.size
    original_pixels = Image.fromarray((fit_image(original, *size) * 255).round().astype(np.uint8))
    hard = Image.fromarray(((fit_image(mask, *size, mode="L")[..., 0] >= 0.5) * 255).astype(np.uint8))
    soft = hard.filter(ImageFilter.MaxFilter(2 * MASK_FEATHER_PX + 1)).filter(ImageFilter.GaussianBlur(MASK_FEATHER_PX / 2))
    return Image.composite(image, original_pixels, soft)
