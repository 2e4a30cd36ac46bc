"""Stable Diffusion 3 and 3.5: CLIP-L, CLIP-G and T5 states into a rectified-flow MMDiT.

Conditioning is diffusers' StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states
(one 77-token window each: longer prompts are truncated), side by side along the features and zero-padded to
T5's width, then T5's states (the request's `max_sequence_length` tokens, else the manifest's `max_length`:
256) after them along the sequence; the pooled vector is both CLIPs' projected end-token states side by side.
A model converted without T5 reads as many zeros in its place, as diffusers does with text_encoder_3=None.
A1111 emphasis weights every encoder's states (scaled, then the mean restored, as on SD); BREAK is a word
break. Latents are the 16-channel VAE's, cut into 2x2 patches by the transformer (image sides are multiples
of the VAE's downscale times the patch: 16). The schedule is the fixed-shift flow schedule (shift 3) spaced
as FlowMatchEulerDiscreteScheduler spaces it by default; cfg_scale > 1 is classifier-free guidance with the
negative prompt ("" when none is given, as diffusers encodes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.families.runtime import Settings, image_tokens
from mlx_sd_server.engine.families.spec import TextLength
from mlx_sd_server.engine.sampling.denoiser import Denoiser, classifier_free_guidance, model_denoiser
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.text.prompt import emphasised, sequence_pieces, weighted_ids

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

T5_MAX_LENGTH = 256  # the SD3 pipelines' max_sequence_length default; also the length of the zeros without T5


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
        self.t5_max_length = TextLength.of(model.manifest, "text_encoder_3", T5_MAX_LENGTH).default

    def sigmas(self, settings: Settings) -> np.ndarray:
        tokens = image_tokens(self.model.vae, settings, self.transformer.config.patch_size)
        return flow_sigmas(settings.scheduler, settings.steps, self.scheduler_config, tokens, scheduler_spacing=True)

    def guided(self, settings: Settings) -> bool:
        return settings.cfg_scale > 1.0

    # --- text --------------------------------------------------------------------------------------

    def encode_prompts(self, settings: Settings, guided: bool) -> SD3Conditioning:
        """Context and pooled vector for [negative, prompt] (or the prompt alone)."""
        texts = [settings.negative_prompt, settings.prompt] if guided else [settings.prompt]
        pieces = [sequence_pieces(text) for text in texts]
        clip_states, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):  # CLIP-L, CLIP-G
            tokenizer, encoder = self.model.tokenizers[name], self.model.text_encoders[name]
            # One window: the start token, then what `weighted_ids` frames in the remaining 76.
            framed = [weighted_ids(tokenizer, p, tokenizer.max_length - 1) for p in pieces]
            out = encoder(mx.array([[tokenizer.bos_id, *ids] for ids, _ in framed]))
            clip_states.append(emphasised(out.hidden_states[-2].astype(mx.float32), [[1.0, *w] for _, w in framed]))
            pooled.append(out.text_embeds.astype(mx.float32))
        width = self.transformer.config.joint_attention_dim
        clip = mx.concatenate(clip_states, axis=-1)
        clip = mx.pad(clip, [(0, 0), (0, 0), (0, width - clip.shape[-1])])
        length = self.t5_max_length if settings.max_sequence_length is None else settings.max_sequence_length
        if "text_encoder_3" in self.model.text_encoders:  # T5 (optional)
            t5_tokenizer, t5_encoder = (
                self.model.tokenizers["text_encoder_3"],
                self.model.text_encoders["text_encoder_3"],
            )
            ids, weights = zip(*(weighted_ids(t5_tokenizer, p, length) for p in pieces))
            t5 = emphasised(t5_encoder(mx.array(ids)).astype(mx.float32), weights)
        else:
            t5 = mx.zeros((len(texts), length, width))
        return SD3Conditioning(mx.concatenate([clip, t5], axis=1), mx.concatenate(pooled, axis=-1))

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(
        self,
        settings: Settings,
        conditioning: SD3Conditioning,
        guided: bool,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Denoiser:
        dtype, n = self.model.dtype, settings.n
        copies = 2 if guided else 1
        context = mx.repeat(conditioning.context, n, axis=0).astype(dtype)  # [negative]*n + [prompt]*n
        pooled = mx.repeat(conditioning.pooled, n, axis=0).astype(dtype)

        def predict(x: mx.array, sigma: float) -> mx.array:
            batch = mx.concatenate([x] * copies).astype(dtype)
            timestep = mx.full((batch.shape[0],), sigma, dtype=mx.float32)
            velocity = self.transformer(batch, context, pooled, timestep).astype(mx.float32)
            return classifier_free_guidance(velocity, settings.cfg_scale) if guided else velocity

        return model_denoiser(predict, self.prediction_type)
