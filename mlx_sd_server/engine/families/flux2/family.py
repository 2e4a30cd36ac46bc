"""FLUX.2 klein (4B, 9B; distilled and base): Qwen3 states into the FLUX.2 transformer.

As diffusers' Flux2KleinPipeline runs it:
- a prompt is Qwen3's chat template around one user message, thinking disabled (`chat_prompt`), cut or padded
  on the right to 512 tokens; the conditioning is Qwen3's hidden states 9, 18 and 27 side by side along the
  features (3 x hidden: 7680 for Qwen3-4B, 12288 for Qwen3-8B), all 512 tokens kept (the padding too: no mask
  reaches the transformer). Text ids (0, 0, 0, index). A1111 emphasis weights those states (scaled, then the
  mean restored, as on T5); BREAK is a word break.
- latents live in the autoencoder's latent space (`Flux2Autoencoder.to_latents`: the posterior mean in 2x2
  patches, normalised by its batch-norm statistics: 128 channels at 1/16 of the image), read row-major as
  tokens with ids (0, row, col, 0); noise is drawn in that space.
- the schedule is linspace(1, 1/steps, steps), shifted with the empirical mu of FLUX.2 (the spec's
  `mu_rule`, a function of the token count and the step count).
- classifier-free guidance (neg + cfg_scale (pos - neg)) only on base models, with cfg_scale > 1: a distilled
  model (`is_distilled`) ignores cfg_scale, as diffusers does. The negative prompt is "" unless given.
- klein has no guidance embedding (a guidance-distilled FLUX.2 dev transformer is refused at conversion).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.families.flux2.transformer import image_ids, text_ids
from mlx_sd_server.engine.families.runtime import Settings, image_tokens
from mlx_sd_server.engine.sampling.denoiser import Denoiser, classifier_free_guidance, model_denoiser
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.text.prompt import emphasised, templated_ids
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer, chat_prompt

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's: Qwen3 tokens per prompt, template included
HIDDEN_LAYERS = (9, 18, 27)  # the Qwen3 hidden states stacked (0: the embeddings)
ENABLE_THINKING = False  # as Flux2KleinPipeline applies the chat template


def is_distilled(pipeline: Mapping[str, Any], name: str) -> bool:
    """A step-distilled klein (no CFG) or a base one: as the pipeline's `is_distilled` says (model_index.json);
    without one, by name, as the base models are released (FLUX.2-klein-base-4B, -9B)."""
    if "is_distilled" in pipeline:
        return bool(pipeline["is_distilled"])
    return "base" not in name.lower()


def prompt_ids(tokenizer: Qwen3Tokenizer, text: str, length: int) -> tuple[list[int], list[int], list[float]]:
    """The chat-templated prompt as `length` ids, their attention mask and an emphasis weight each: cut, then
    padded on the right."""
    ids, weights = templated_ids(tokenizer, text, lambda prompt: chat_prompt(prompt, ENABLE_THINKING), length)
    padding = length - len(ids)
    return ids + [tokenizer.pad_id] * padding, [1] * len(ids) + [0] * padding, weights + [1.0] * padding


class Flux2Family:
    prediction_type = "flow"
    inpainting_model = False

    def __init__(self, model: LoadedModel):
        self.model = model
        self.transformer = model.components["transformer"]
        self.scheduler_config = model.manifest["scheduler"]
        self.distilled = is_distilled(model.manifest.get("pipeline", {}), model.manifest.get("name", ""))

    def sigmas(self, settings: Settings) -> np.ndarray:
        return flow_sigmas(
            settings.scheduler, settings.steps, self.scheduler_config, image_tokens(self.model.vae, settings)
        )

    def guided(self, settings: Settings) -> bool:
        return settings.cfg_scale > 1.0 and not self.distilled

    # --- text --------------------------------------------------------------------------------------

    def encode_prompts(self, settings: Settings, guided: bool) -> mx.array:
        """(B, 512, 3 x hidden) float32: Qwen3's states 9, 18, 27 for [negative, prompt] (or the prompt alone)."""
        texts = [settings.negative_prompt, settings.prompt] if guided else [settings.prompt]
        tokenizer, encoder = self.model.tokenizers["text_encoder"], self.model.text_encoders["text_encoder"]
        ids, masks, weights = zip(*(prompt_ids(tokenizer, text, MAX_SEQUENCE_LENGTH) for text in texts))
        states = encoder(mx.array(ids), mx.array(masks), depth=max(HIDDEN_LAYERS))  # later layers never run
        stacked = mx.concatenate([states[i] for i in HIDDEN_LAYERS], axis=-1).astype(mx.float32)
        return emphasised(stacked, weights)

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(
        self,
        settings: Settings,
        conditioning: mx.array,
        guided: bool,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Denoiser:
        dtype, n = self.model.dtype, settings.n
        copies = 2 if guided else 1
        context = mx.repeat(conditioning, n, axis=0).astype(dtype)  # [negative]*n + [prompt]*n
        _, h, w, _ = self.model.vae.latent_shape(n, settings.height, settings.width)
        img_ids, txt_ids = image_ids(h, w), text_ids(context.shape[1])

        def predict(x: mx.array, sigma: float) -> mx.array:
            batch, _, _, channels = x.shape
            tokens = mx.concatenate([x.reshape(batch, h * w, channels)] * copies).astype(dtype)
            timestep = mx.full((tokens.shape[0],), sigma, dtype=mx.float32)
            out = self.transformer(tokens, context, timestep, img_ids, txt_ids)
            velocity = out.astype(mx.float32).reshape(copies * batch, h, w, channels)
            return classifier_free_guidance(velocity, settings.cfg_scale) if guided else velocity

        return model_denoiser(predict, self.prediction_type)
