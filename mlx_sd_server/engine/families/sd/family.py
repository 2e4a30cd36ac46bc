"""Stable Diffusion 1.x, 2.x and XL (and their LCM/Turbo variants): CLIP text encoders and a UNet.

Conditioning is CLIP hidden states with A1111 emphasis and 77-token windows (SDXL: two encoders'
penultimate states, the second's pooled projection and size micro-conditioning); epsilon or v prediction
over the training beta table; classifier-free guidance as a second batch half, or (LCM) as an input.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.sampling.denoiser import Denoiser, model_denoiser
from mlx_sd_server.engine.text.prompt import Chunk, apply_emphasis, chunk_prompt, pad_chunks
from mlx_sd_server.engine.sampling.schedules import make_sigmas, training_sigmas
from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.request import Request

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel


class StableDiffusionFamily:

    def __init__(self, model: LoadedModel):
        self.model = model
        manifest = model.manifest
        self.table = training_sigmas(**manifest["scheduler"])
        self.prediction_type = manifest["prediction_type"]
        self.is_sdxl = model.family == "sdxl"
        unet_config = manifest["components"]["unet"]["config"]
        self.guidance_embedding_dim = unet_config.get("time_cond_proj_dim")
        self.inpainting_model = unet_config.get("in_channels", 4) == 9

    def sigmas(self, job: Request) -> np.ndarray:
        try:
            return make_sigmas(job.scheduler, job.steps, self.table, self.model.family)
        except ValueError as exc:  # e.g. the lcm schedule has at most 50 steps
            raise JobError(str(exc), "steps", "invalid_value") from None

    def guided(self, job: Request) -> bool:
        # LCM-distilled UNets take guidance as an input; otherwise guidance needs a second (uncond) pass.
        return job.cfg_scale > 1.0 and not self.guidance_embedding_dim

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
            embeddings.append(apply_emphasis(hidden, weights).reshape(1, -1, hidden.shape[-1]))
            if out.text_embeds is not None:
                pooled = out.text_embeds[:1].astype(mx.float32)
        return mx.concatenate(embeddings, axis=-1), pooled

    def encode_prompts(self, job: Request, guided: bool) -> tuple[mx.array, mx.array | None]:
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

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(self, job: Request, conditioning: tuple[mx.array, mx.array | None], guided: bool,
                 extra_channels: mx.array | None, control: mx.array | None) -> Denoiser:
        predict = self._predictor(job, guided, *conditioning, extra_channels, control)
        return model_denoiser(predict, self.prediction_type, self.table)

    def _predictor(self, job: Request, guided: bool,
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


def guidance_scale_embedding(w: float, dim: int) -> mx.array:
    """LCM's guidance embedding (sinusoidal in 1000·w), as diffusers computes it."""
    half = dim // 2
    freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000.0) / (half - 1)))
    args = w * 1000.0 * freqs
    emb = mx.concatenate([mx.sin(args), mx.cos(args)])
    if dim % 2:
        emb = mx.concatenate([emb, mx.zeros((1,))])
    return emb[None]
