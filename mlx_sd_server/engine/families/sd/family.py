"""Stable Diffusion 1.x, 2.x and XL (and their LCM/Turbo variants): CLIP text encoders and a UNet.

Conditioning is CLIP hidden states with A1111 emphasis and 77-token windows (SDXL: two encoders'
penultimate states, the second's pooled projection and size micro-conditioning); epsilon or v prediction
over the training beta table; classifier-free guidance as a second batch half, or (LCM) as an input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.families.runtime import Settings
from mlx_sd_server.engine.sampling.denoiser import Denoiser, classifier_free_guidance, model_denoiser
from mlx_sd_server.engine.sampling.schedules import make_sigmas, training_sigmas
from mlx_sd_server.engine.text.prompt import Chunk, apply_emphasis, chunk_prompt, pad_chunks

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

# Align Your Steps (Sabour et al., 2024): NVIDIA's optimised 10-step sigmas for SD 1.5 and SDXL, by manifest
# family. SD 2.x uses SD 1.5's (AYS publishes none for it), as stable-diffusion.cpp does.
AYS_SD1 = (
    14.6146412293,
    6.4745760956,
    3.8636745985,
    2.6946151520,
    1.8841921177,
    1.3943805092,
    0.9642583904,
    0.6523686016,
    0.3977456272,
    0.1515232662,
    0.0291671582,
)
AYS_SDXL = (
    14.6146412293,
    6.3184485287,
    3.7681790315,
    2.1811480769,
    1.3405244945,
    0.8620721141,
    0.5550693289,
    0.3798540708,
    0.2332364134,
    0.1114188177,
    0.0291671582,
)
AYS_SIGMAS = {"sd1": AYS_SD1, "sd2": AYS_SD1, "sdxl": AYS_SDXL}


class StableDiffusionFamily:
    def __init__(self, model: LoadedModel):
        self.model = model
        manifest = model.manifest
        self.table = training_sigmas(**manifest["scheduler"])
        self.ays_levels = np.array(AYS_SIGMAS[model.family])
        self.prediction_type = manifest["prediction_type"]
        self.is_sdxl = model.family == "sdxl"
        unet_config = manifest["components"]["unet"]["config"]
        self.guidance_embedding_dim = unet_config.get("time_cond_proj_dim")
        self.inpainting_model = unet_config.get("in_channels", 4) == 9

    def sigmas(self, settings: Settings) -> np.ndarray:
        return make_sigmas(settings.scheduler, settings.steps, self.table, self.ays_levels)

    def guided(self, settings: Settings) -> bool:
        # LCM-distilled UNets take guidance as an input; otherwise guidance needs a second (uncond) pass.
        return settings.cfg_scale > 1.0 and not self.guidance_embedding_dim

    # --- text --------------------------------------------------------------------------------------

    def _encode_chunks(self, chunks_per_encoder: list[list[Chunk]]) -> tuple[mx.array, mx.array | None]:
        """Embeddings (1, 77*k, D) with emphasis applied, and SDXL's pooled embedding (1, P)."""
        embeddings, pooled = [], None
        for encoder, chunks in zip(self.model.text_encoders.values(), chunks_per_encoder):
            ids = mx.array([c.ids for c in chunks])
            out = encoder(ids)
            hidden = out.hidden_states[-2] if self.is_sdxl else out.last_hidden_state
            hidden = hidden.astype(mx.float32)
            weights = mx.array([c.weights for c in chunks], dtype=mx.float32)[..., None]
            embeddings.append(apply_emphasis(hidden, weights).reshape(1, -1, hidden.shape[-1]))
            if out.text_embeds is not None:
                pooled = out.text_embeds[:1].astype(mx.float32)
        return mx.concatenate(embeddings, axis=-1), pooled

    def encode_prompts(self, settings: Settings, guided: bool) -> tuple[mx.array, mx.array | None]:
        """Context (B, L, D) for [uncond, cond] (or [cond] alone), and pooled (B, P) for SDXL."""
        tokenizers = list(self.model.tokenizers.values())  # in the encoders' order
        cond = [chunk_prompt(tok, settings.prompt) for tok in tokenizers]
        if not guided:
            return self._encode_chunks(cond)
        uncond = [chunk_prompt(tok, settings.negative_prompt) for tok in tokenizers]
        count = max(len(c) for c in cond + uncond)
        empties = [chunk_prompt(t, "")[0] for t in tokenizers]
        cond = [pad_chunks(c, count, empty) for c, empty in zip(cond, empties)]
        uncond = [pad_chunks(c, count, empty) for c, empty in zip(uncond, empties)]
        cond_context, cond_pooled = self._encode_chunks(cond)
        if self.is_sdxl and not settings.negative_prompt:  # SDXL's "force_zeros_for_empty_prompt"
            uncond_context = mx.zeros_like(cond_context)
            uncond_pooled = None if cond_pooled is None else mx.zeros_like(cond_pooled)
        else:
            uncond_context, uncond_pooled = self._encode_chunks(uncond)
        # (both or neither: the same encoders made them)
        pooled = None if cond_pooled is None or uncond_pooled is None else mx.concatenate([uncond_pooled, cond_pooled])
        return mx.concatenate([uncond_context, cond_context]), pooled

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(
        self,
        settings: Settings,
        conditioning: tuple[mx.array, mx.array | None],
        guided: bool,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Denoiser:
        predict = self._predictor(settings, guided, *conditioning, extra_channels, control)
        return model_denoiser(predict, self.prediction_type, self.table)

    def _predictor(
        self,
        settings: Settings,
        guided: bool,
        context: mx.array,
        pooled: mx.array | None,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Callable[[mx.array, float], mx.array]:
        """predict(x_in, t) -> the UNet's output for the batch, with classifier-free guidance applied."""
        unet, controlnet, dtype = self.model.unet, self.model.controlnet, self.model.dtype
        n = settings.n
        copies = 2 if guided else 1
        context = mx.repeat(context, n, axis=0).astype(dtype)  # [uncond]*n + [cond]*n
        kwargs: dict = {}
        if self.is_sdxl:
            assert pooled is not None, "SDXL's second text encoder gives a pooled embedding"
            h, w = settings.height, settings.width
            time_ids = mx.array([[h, w, 0, 0, h, w]] * (copies * n), dtype=mx.float32)
            kwargs.update(text_embeds=mx.repeat(pooled, n, axis=0).astype(dtype), time_ids=time_ids.astype(dtype))
        if self.guidance_embedding_dim:
            w_embed = guidance_scale_embedding(settings.cfg_scale - 1.0, self.guidance_embedding_dim)
            kwargs["timestep_cond"] = mx.repeat(w_embed, copies * n, axis=0).astype(dtype)
        if control is not None:
            control = mx.repeat(control, copies * n, axis=0).astype(dtype)

        def predict(x_in: mx.array, t: float) -> mx.array:
            if extra_channels is not None:
                x_in = mx.concatenate([x_in, extra_channels], axis=-1)
            batch = mx.concatenate([x_in] * copies).astype(dtype)
            timesteps = mx.full((batch.shape[0],), t, dtype=mx.float32)
            residuals = {}
            if control is not None and settings.control_strength > 0:
                assert controlnet is not None, "build_job takes control_image only with a ControlNet attached"
                down, mid = controlnet(
                    batch,
                    timesteps,
                    context,
                    control,
                    conditioning_scale=settings.control_strength,
                    text_embeds=kwargs.get("text_embeds"),
                    time_ids=kwargs.get("time_ids"),
                )
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out = unet(batch, timesteps, context, **kwargs, **residuals).astype(mx.float32)
            return classifier_free_guidance(out, settings.cfg_scale) if guided else out

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
