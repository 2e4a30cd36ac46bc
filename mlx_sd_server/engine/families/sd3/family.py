"""Stable Diffusion 3 and 3.5: CLIP-L, CLIP-G and T5 states into a rectified-flow MMDiT.

Conditioning is diffusers' StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states
(one 77-token window each: longer prompts are truncated), side by side along the features and zero-padded to
T5's width, then T5's states (256 tokens) after them along the sequence; the pooled vector is both CLIPs'
projected end-token states side by side. A model converted without T5 reads zeros in its place, as diffusers
does with text_encoder_3=None. A1111 emphasis weights every encoder's states (scaled, then the mean restored,
as on SD); BREAK is a word break. Latents are the 16-channel VAE's, cut into 2x2 patches by the transformer
(image sides are multiples of 16). The schedule is the fixed-shift flow schedule (shift 3) spaced as
FlowMatchEulerDiscreteScheduler spaces it by default; cfg_scale > 1 is classifier-free guidance with the
negative prompt ("" when none is given, as diffusers encodes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.sampling.denoiser import Denoiser, model_denoiser
from mlx_sd_server.engine.text.prompt import emphasised, sequence_pieces, weighted_ids
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.request import Request

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

T5_MAX_LENGTH = 256  # the SD3 pipelines' max_sequence_length default; also the length of the zeros without T5
VAE_SCALE = 8


class SD3Conditioning(NamedTuple):
    context: mx.array  # (B, 77 + T5 length, joint_attention_dim): CLIP-L|CLIP-G states (zero-padded), then T5's
    pooled: mx.array  # (B, pooled_projection_dim): CLIP-L and CLIP-G projected end-token states


class SD3Family:
    prediction_type = "flow"
    inpainting_model = False

    def __init__(self, model: LoadedModel):
        self.model = model
        self.transformer = model.components["transformer"]
        self.scheduler_config = model.manifest["scheduler"]
        t5_entry = model.manifest["components"].get("text_encoder_3", {})
        self.t5_max_length = t5_entry.get("max_length", T5_MAX_LENGTH)

    def sigmas(self, job: Request) -> np.ndarray:
        # Checked here, before the job runs (its step count is asked first): the transformer has position
        # embeddings for at most pos_embed_max_size patches a side.
        config = self.transformer.config
        patch_pixels = VAE_SCALE * config.patch_size
        largest = patch_pixels * config.pos_embed_max_size
        if max(job.width, job.height) > largest:
            raise JobError(f"this model makes images of at most {largest} pixels a side, got {job.width}x{job.height}",
                           "size", "invalid_size")
        image_tokens = (job.height // patch_pixels) * (job.width // patch_pixels)
        try:
            return flow_sigmas(job.scheduler, job.steps, self.scheduler_config, image_tokens, scheduler_spacing=True)
        except ValueError as exc:
            raise JobError(str(exc), "scheduler", "unsupported_scheduler") from None

    def guided(self, job: Request) -> bool:
        return job.cfg_scale > 1.0

    # --- text --------------------------------------------------------------------------------------

    def encode_prompts(self, job: Request, guided: bool) -> SD3Conditioning:
        """Context and pooled vector for [negative, prompt] (or the prompt alone)."""
        texts = [job.negative_prompt, job.prompt] if guided else [job.prompt]
        pieces = [sequence_pieces(text) for text in texts]
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(self.model.tokenizers[:2], self.model.text_encoders[:2]):
            # One window: the start token, then what `weighted_ids` frames in the remaining 76.
            framed = [weighted_ids(tokenizer, p, tokenizer.max_length - 1) for p in pieces]
            out = encoder(mx.array([[tokenizer.bos_id, *ids] for ids, _ in framed]))
            clip_states.append(emphasised(out.hidden_states[-2].astype(mx.float32), [[1.0, *w] for _, w in framed]))
            pooled.append(out.text_embeds.astype(mx.float32))
        width = self.transformer.config.joint_attention_dim
        clip = mx.concatenate(clip_states, axis=-1)
        clip = mx.pad(clip, [(0, 0), (0, 0), (0, width - clip.shape[-1])])
        if len(self.model.text_encoders) == 3:
            ids, weights = zip(*(weighted_ids(self.model.tokenizers[2], p, self.t5_max_length) for p in pieces))
            t5 = emphasised(self.model.text_encoders[2](mx.array(ids)).astype(mx.float32), weights)
        else:
            t5 = mx.zeros((len(texts), self.t5_max_length, width))
        return SD3Conditioning(mx.concatenate([clip, t5], axis=1), mx.concatenate(pooled, axis=-1))

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(self, job: Request, conditioning: SD3Conditioning, guided: bool, extra_channels: mx.array | None,
                 control: mx.array | None) -> Denoiser:
        dtype, n = self.model.dtype, job.n
        copies = 2 if guided else 1
        context = mx.repeat(conditioning.context, n, axis=0).astype(dtype)  # [negative]*n + [prompt]*n
        pooled = mx.repeat(conditioning.pooled, n, axis=0).astype(dtype)

        def predict(x: mx.array, sigma: float) -> mx.array:
            batch = mx.concatenate([x] * copies).astype(dtype)
            timestep = mx.full((batch.shape[0],), sigma, dtype=mx.float32)
            velocity = self.transformer(batch, context, pooled, timestep).astype(mx.float32)
            if not guided:
                return velocity
            negative, positive = velocity[:n], velocity[n:]
            return negative + job.cfg_scale * (positive - negative)

        return model_denoiser(predict, self.prediction_type)
