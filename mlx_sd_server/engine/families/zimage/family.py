"""Z-Image (Turbo and base): Qwen3 states into a single-stream rectified-flow DiT, FLUX.1's autoencoder.

As diffusers' ZImagePipeline (and its Img2Img and Inpaint siblings) runs it:
- a prompt is Qwen3's chat template around one user message, thinking enabled (`chat_prompt`), cut at 512
  tokens; the conditioning is the second-to-last hidden state of the prompt's real tokens only (the padding
  is dropped, and Qwen3's attention is causal, so the states do not depend on how far a batch is padded: we
  pad only to the batch's longest prompt, not to 512). A1111 emphasis weights those states (scaled, then
  their mean restored, over the real tokens), as on T5; BREAK is a word break.
- the transformer is called at t = 1 - sigma and its output negated: the flow velocity (noise - x0) that our
  flow denoiser expects is -output.
- classifier-free guidance: diffusers combines pos + g * (pos - neg) when its guidance_scale g > 0; that is
  our neg + s * (pos - neg) with s = g + 1, so `cfg_scale` keeps the meaning it has on every family (<= 1 is
  off) and diffusers' guidance_scale is cfg_scale - 1. The negative prompt is "" when none is given.
  (diffusers' cfg_normalization and cfg_truncation are off by default and not offered.)
- the schedule is linspace(1, 1/steps, steps) shifted as the model's scheduler config says (Turbo: a fixed
  shift 3), `flow_sigmas`' default spacing; latents are the 16-channel autoencoder's, cut into 2x2 patches by
  the transformer (image sides are multiples of the VAE's downscale times the patch: 16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.families.runtime import Settings, image_tokens
from mlx_sd_server.engine.sampling.denoiser import Denoiser, classifier_free_guidance, model_denoiser
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.text.prompt import apply_emphasis, templated_ids
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer, chat_prompt

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

MAX_SEQUENCE_LENGTH = 512  # the Z-Image pipelines' max_sequence_length: Qwen3 tokens per prompt, template included
ENABLE_THINKING = True  # as ZImagePipeline applies the chat template


class ZImageConditioning(NamedTuple):
    states: mx.array  # (B, L, hidden): Qwen3's second-to-last hidden states, each prompt's real tokens first
    lengths: list[int]  # how many leading tokens of each row are real


def prompt_ids(tokenizer: Qwen3Tokenizer, text: str, max_length: int) -> tuple[list[int], list[float]]:
    """The chat-templated prompt's ids (at most `max_length`) and an emphasis weight per id."""
    return templated_ids(tokenizer, text, lambda prompt: chat_prompt(prompt, ENABLE_THINKING), max_length)


class ZImageFamily:
    prediction_type = "flow"
    inpainting_model = False

    def __init__(self, model: LoadedModel):
        self.model = model
        self.transformer = model.components["transformer"]
        self.scheduler_config = model.manifest["scheduler"]

    def sigmas(self, settings: Settings) -> np.ndarray:
        tokens = image_tokens(self.model.vae, settings, self.transformer.config.patch_size)
        return flow_sigmas(settings.scheduler, settings.steps, self.scheduler_config, tokens)

    def guided(self, settings: Settings) -> bool:
        return settings.cfg_scale > 1.0

    # --- text --------------------------------------------------------------------------------------

    def encode_prompts(self, settings: Settings, guided: bool) -> ZImageConditioning:
        """Qwen3 states for [negative, prompt] (or the prompt alone), padded to the longest of them."""
        texts = [settings.negative_prompt, settings.prompt] if guided else [settings.prompt]
        tokenizer, encoder = self.model.tokenizers["text_encoder"], self.model.text_encoders["text_encoder"]
        framed = [prompt_ids(tokenizer, text, MAX_SEQUENCE_LENGTH) for text in texts]
        lengths = [len(ids) for ids, _ in framed]
        longest = max(lengths)
        ids = mx.array([ids + [tokenizer.pad_id] * (longest - len(ids)) for ids, _ in framed])
        mask = mx.array([[1] * n + [0] * (longest - n) for n in lengths]) if min(lengths) < longest else None
        # hidden_states[-2]: the output of all layers but the last (which is then never run)
        states = encoder(ids, mask, depth=encoder.config.num_hidden_layers - 1)[-1].astype(mx.float32)
        if any(weight != 1.0 for _, weights in framed for weight in weights):  # over each prompt's real tokens
            states = mx.stack(
                [
                    mx.concatenate([apply_emphasis(s[:n], mx.array(w)[:, None]), s[n:]])
                    for s, n, (_, w) in zip(states, lengths, framed)
                ]
            )
        return ZImageConditioning(states, lengths)

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(
        self,
        settings: Settings,
        conditioning: ZImageConditioning,
        guided: bool,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Denoiser:
        dtype, n = self.model.dtype, settings.n
        copies = 2 if guided else 1
        states = mx.repeat(conditioning.states, n, axis=0).astype(dtype)  # [negative]*n + [prompt]*n
        lengths = [length for length in conditioning.lengths for _ in range(n)]

        def predict(x: mx.array, sigma: float) -> mx.array:
            batch = mx.concatenate([x] * copies).astype(dtype)
            t = mx.full((batch.shape[0],), 1.0 - sigma, dtype=mx.float32)
            velocity = -self.transformer(batch, t, states, lengths).astype(mx.float32)
            return classifier_free_guidance(velocity, settings.cfg_scale) if guided else velocity

        return model_denoiser(predict, self.prediction_type)
