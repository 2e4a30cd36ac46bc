"""Qwen-Image: Qwen2.5-VL states into a dual-stream MMDiT, a Wan-style autoencoder; true CFG.

As diffusers' QwenImagePipeline (and its Img2Img and Inpaint siblings) runs it:
- a prompt is put in Qwen-Image's own template (PROMPT_TEMPLATE: a system message, then the user turn; no chat
  template of the tokenizer's), cut at 1024 + DROPPED tokens; the conditioning is Qwen2.5-VL's last hidden
  state (after its final norm) of the prompt's real tokens less the template's first DROPPED, padded with
  zeros to the batch's longest and masked, the mask reaching the transformer's joint attention. A1111 emphasis
  weights those states (scaled, then the mean restored), as on T5; BREAK is a word break.
- latents are the autoencoder's (z - mean) / std per channel (its `to_latents`), 2x2-packed into tokens as
  FLUX.1's; the transformer's RoPE reads the image as one frame of (h/2, w/2) patches (`img_shapes`).
- the schedule is linspace(1, 1/steps, steps), shifted by mu = FLUX.1's linear rule on the packed token count
  with the scheduler config's base/max settings (the release's: 0.5 to 0.9 over 256 to 8192 tokens), then
  stretched to end at its `shift_terminal` (0.02); the transformer is called at t = sigma.
- true CFG: with cfg_scale > 1, neg + s (pos - neg), then rescaled per token to the conditional prediction's
  norm over the packed channels (diffusers' `true_cfg_scale`). diffusers runs it only when a negative prompt is
  given; ours is "" when none is (diffusers given negative_prompt="" does the same), so cfg_scale alone
  decides, as on every family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.families.flux.transformer import pack_latents, unpack_latents
from mlx_sd_server.engine.families.qwenimage import edit
from mlx_sd_server.engine.families.runtime import Settings, encode_pixels, image_tokens
from mlx_sd_server.engine.sampling.denoiser import Denoiser, model_denoiser
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.text.prompt import apply_emphasis, templated_ids

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROPPED = 34  # the template's tokens before the prompt (prompt_template_encode_start_idx)
MAX_SEQUENCE_LENGTH = 512  # the prompt's tokens kept after the template's (the pipelines' max_sequence_length)
UNBOUNDED = 1 << 30  # the edit pipelines cut nothing (the prompt's length is bounded by the job's limits)
PATCH = 2  # the transformer's patches of the latent grid


class QwenConditioning(NamedTuple):
    states: mx.array  # (B, L, hidden) float32: each prompt's states, zero-padded to the longest
    mask: mx.array  # (B, L) int32: 1 for a prompt's tokens


def true_cfg(conditional: mx.array, unconditional: mx.array, scale: float) -> mx.array:
    """neg + s (pos - neg), rescaled per token (the last axis: a token's channels) to pos's norm."""
    combined = unconditional + scale * (conditional - unconditional)
    norm = lambda x: mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))  # noqa: E731
    return combined * (norm(conditional) / norm(combined))


def conditioning(
    states: mx.array, lengths: list[int], weights: list[list[float]], dropped: int, limit: int
) -> QwenConditioning:
    """Each prompt's states less the template's first `dropped`, at most `limit`, A1111 emphasis applied over
    them, zero-padded to the longest and masked."""
    kept = [min(n - dropped, limit) for n in lengths]
    width = max(kept)
    rows = []
    for i, (k, row_weights) in enumerate(zip(kept, weights)):
        row, row_weights = states[i, dropped : dropped + k], row_weights[dropped : dropped + k]
        if any(weight != 1.0 for weight in row_weights):  # over the prompt's own tokens
            row = apply_emphasis(row, mx.array(row_weights)[:, None])
        rows.append(mx.concatenate([row, mx.zeros((width - k, row.shape[1]))]))
    return QwenConditioning(mx.stack(rows), mx.array([[1] * k + [0] * (width - k) for k in kept], dtype=mx.int32))


class QwenImageFamily:
    prediction_type = "flow"
    inpainting_model = False

    def __init__(self, model: LoadedModel):
        self.model = model
        self.transformer = model.components["transformer"]
        self.scheduler_config = model.manifest["scheduler"]
        self.edit = edit.edit_kind(model.manifest.get("pipeline", {}), model.manifest.get("name", ""))

    def sigmas(self, settings: Settings) -> np.ndarray:
        tokens = image_tokens(self.model.vae, settings, PATCH)
        return flow_sigmas(settings.scheduler, settings.steps, self.scheduler_config, tokens)

    def guided(self, settings: Settings) -> bool:
        return settings.cfg_scale > 1.0

    # --- text --------------------------------------------------------------------------------------

    def encode_prompts(self, settings: Settings, guided: bool) -> QwenConditioning:
        """Qwen2.5-VL states for [negative, prompt] (or the prompt alone), as the module docstring says; on an
        edit model the template holds the input images (edit.py)."""
        texts = [settings.negative_prompt, settings.prompt] if guided else [settings.prompt]
        tokenizer, encoder = self.model.tokenizers["text_encoder"], self.model.text_encoders["text_encoder"]
        images = settings.reference_images if self.edit is not None else ()
        head, tail = PROMPT_TEMPLATE.split("{}")
        dropped, limit = DROPPED, MAX_SEQUENCE_LENGTH
        if self.edit is not None:  # (the edit pipelines cut nothing: their max_sequence_length is unused)
            head, tail = edit.prompt_text(self.edit, len(images))
            dropped, limit = edit.DROPPED, UNBOUNDED
        if images:
            pixel_values, grid, counts = edit.vision_inputs(self.edit or "", images)
            head = edit.expanded(head, counts)

        def template(prompt: str) -> str:
            return head + prompt + tail

        framed = [templated_ids(tokenizer, text, template, dropped + limit) for text in texts]
        token_ids, weights = [ids for ids, _ in framed], [w for _, w in framed]
        if images:
            image_token = encoder.config.image_token_id
            states, lengths = edit.edit_states(encoder, token_ids, pixel_values, grid, image_token, tokenizer.pad_id)
        else:
            lengths = [len(ids) for ids in token_ids]
            longest = max(lengths)
            ids = mx.array([ids + [tokenizer.pad_id] * (longest - len(ids)) for ids in token_ids])
            mask = mx.array([[1] * n + [0] * (longest - n) for n in lengths])
            states = encoder(ids, attention_mask=mask if min(lengths) < longest else None).astype(mx.float32)
        return conditioning(states, lengths, weights, dropped, limit)

    # --- reference images (edit models) ------------------------------------------------------------

    def reference_tokens(self, images: tuple[Image.Image, ...]) -> tuple[mx.array, list[tuple[int, int, int]]]:
        """The input images' packed latents (1, L, 64), one image after another, evaluated, and their
        `img_shapes` entries."""
        tokens, shapes = [], []
        for pixels in edit.vae_pixels(images):
            latents = encode_pixels(self.model, pixels)
            _, h, w, _ = latents.shape
            tokens.append(pack_latents(latents))
            shapes.append((1, h // PATCH, w // PATCH))
        joined = mx.concatenate(tokens, axis=1)
        mx.eval(joined)  # encoded once: every step reads them
        return joined, shapes

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(
        self,
        settings: Settings,
        conditioning: QwenConditioning,
        guided: bool,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Denoiser:
        dtype, n = self.model.dtype, settings.n
        copies = 2 if guided else 1
        states = mx.repeat(conditioning.states, n, axis=0).astype(dtype)  # [negative]*n + [prompt]*n
        mask = mx.repeat(conditioning.mask, n, axis=0)
        _, h, w, _ = self.model.vae.latent_shape(n, settings.height, settings.width)
        shapes = [(1, h // PATCH, w // PATCH)]
        reference = None
        if self.edit is not None and settings.reference_images:  # the same for every image and both CFG halves
            tokens, reference_shapes = self.reference_tokens(settings.reference_images)
            reference, shapes = mx.repeat(tokens, copies * n, axis=0).astype(dtype), shapes + reference_shapes
        generated = shapes[0][1] * shapes[0][2]

        def predict(x: mx.array, sigma: float) -> mx.array:
            tokens = mx.concatenate([pack_latents(x)] * copies).astype(dtype)
            if reference is not None:
                tokens = mx.concatenate([tokens, reference], axis=1)
            batch = tokens.shape[0]
            timestep = mx.full((batch,), sigma, dtype=mx.float32)
            out = self.transformer(tokens, states, mask, timestep, [shapes] * batch)
            velocity = out[:, :generated].astype(mx.float32)
            if guided:
                unconditional, conditional = mx.split(velocity, 2)
                velocity = true_cfg(conditional, unconditional, settings.cfg_scale)
            return unpack_latents(velocity, h, w)

        return model_denoiser(predict, self.prediction_type)
