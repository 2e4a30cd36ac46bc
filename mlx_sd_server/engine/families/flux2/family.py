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
- reference images (`Settings.reference_images`: edits' inputs) as Flux2KleinPipeline's `image=[...]` takes
  them: each scaled down to at most 1024 x 1024 pixels (Lanczos, its aspect kept), centre-cropped to
  multiples of 16 (`reference_pixels`), encoded into the latent space and read row-major as more tokens after
  the noisy ones, with ids (10 (i + 1), row, col, 0); the transformer predicts the noisy tokens alone. They
  are encoded once per job, when the denoiser is built. Inpainting (Flux2KleinInpaintPipeline) reads the
  source image first (the spec's `source_as_reference`), then the request's `image_reference`s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.families.flux2.transformer import image_ids, text_ids
from mlx_sd_server.engine.families.runtime import Settings, encode_pixels, image_tokens
from mlx_sd_server.engine.sampling.denoiser import Denoiser, classifier_free_guidance, model_denoiser
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.text.prompt import emphasised, templated_ids
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer, chat_prompt

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's: Qwen3 tokens per prompt, template included
HIDDEN_LAYERS = (9, 18, 27)  # the Qwen3 hidden states stacked (0: the embeddings)
ENABLE_THINKING = False  # as Flux2KleinPipeline applies the chat template
REFERENCE_AREA = 1024 * 1024  # the most pixels Flux2KleinPipeline encodes a reference image at
REFERENCE_TIME = 10  # reference image i's first id: REFERENCE_TIME * (i + 1) (_prepare_image_ids' scale)


def is_distilled(pipeline: Mapping[str, Any], name: str) -> bool:
    """A step-distilled klein (no CFG) or a base one: as the pipeline's `is_distilled` says (model_index.json);
    without one, by name, as the base models are released (FLUX.2-klein-base-4B, -9B)."""
    if "is_distilled" in pipeline:
        return bool(pipeline["is_distilled"])
    return "base" not in name.lower()


def reference_pixels(image: Image.Image, multiple: int) -> np.ndarray:
    """A reference image as Flux2KleinPipeline encodes it: scaled down (Lanczos, sides truncated) to
    REFERENCE_AREA pixels if it has more, centre-cropped to multiples of `multiple` (the VAE's downscale
    x the 2x2 patch), RGB; float32 in [0, 1], HWC."""
    width, height = image.size
    if width * height > REFERENCE_AREA:
        scale = math.sqrt(REFERENCE_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    cropped = width // multiple * multiple, height // multiple * multiple
    if not min(cropped):
        raise JobError(
            f"a reference image of {width}x{height} is too small: its sides must be at least {multiple}",
            "image",
            "invalid_image_dimensions",
        )
    left, top = (width - cropped[0]) // 2, (height - cropped[1]) // 2
    image = image.crop((left, top, left + cropped[0], top + cropped[1])).convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


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

    # --- reference images ----------------------------------------------------------------------------

    def reference_tokens(self, images: Sequence[Image.Image]) -> tuple[mx.array, mx.array] | None:
        """The reference images' tokens (1, L, 128), one image after another, and their ids (L, 4),
        evaluated; None without any."""
        if not images:
            return None
        tokens, ids = [], []
        for i, image in enumerate(images):
            latents = encode_pixels(self.model, reference_pixels(image, self.model.vae.latent_downscale))
            _, h, w, channels = latents.shape
            tokens.append(latents.reshape(1, h * w, channels))
            ids.append(image_ids(h, w, t=REFERENCE_TIME * (i + 1)))
        joined = mx.concatenate(tokens, axis=1), mx.concatenate(ids)
        mx.eval(joined)  # encoded once: every step reads them
        return joined

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
        reference = None
        references = self.reference_tokens(settings.reference_images)
        if references is not None:  # the same for every image of the batch and both halves of CFG
            reference = mx.repeat(references[0], copies * n, axis=0).astype(dtype)
            img_ids = mx.concatenate([img_ids, references[1]])

        def predict(x: mx.array, sigma: float) -> mx.array:
            batch, _, _, channels = x.shape
            tokens = mx.concatenate([x.reshape(batch, h * w, channels)] * copies).astype(dtype)
            if reference is not None:
                tokens = mx.concatenate([tokens, reference], axis=1)
            timestep = mx.full((tokens.shape[0],), sigma, dtype=mx.float32)
            out = self.transformer(tokens, context, timestep, img_ids, txt_ids, generated=h * w)
            velocity = out.astype(mx.float32).reshape(copies * batch, h, w, channels)
            return classifier_free_guidance(velocity, settings.cfg_scale) if guided else velocity

        return model_denoiser(predict, self.prediction_type)
