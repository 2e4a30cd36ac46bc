"""FLUX.1 (dev, schnell and Kontext): CLIP-L pooled text + T5 states into a rectified-flow transformer.

Conditioning is T5's hidden states (the request's `max_sequence_length` tokens, else the manifest's
`max_length`: 256 for schnell, 512 for dev) and CLIP-L's pooled output; latents are the 16-channel
autoencoder's, packed into 2x2 patches for the transformer (so image sides are multiples of twice the VAE's
downscale: 16 for FLUX.1's autoencoder). The schedule is the shifted flow schedule (dev: shifted by the
image's token count). `guidance` feeds dev's distilled guidance embedding; `cfg_scale` > 1 is true
classifier-free guidance with the negative prompt, as on every family. Kontext (kontext.py) appends its
input image's tokens to the latents' and reads the prediction for the latents' alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.families.flux.fill import is_fill
from mlx_sd_server.engine.families.flux.kontext import is_kontext_model, reference_ids, reference_pixels
from mlx_sd_server.engine.families.flux.transformer import latent_image_ids, pack_latents, unpack_latents
from mlx_sd_server.engine.families.runtime import Settings, encode_pixels, image_tokens
from mlx_sd_server.engine.families.spec import DEFAULT_GUIDANCE, TextLength
from mlx_sd_server.engine.sampling.denoiser import Denoiser, classifier_free_guidance, model_denoiser
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.text.prompt import emphasised, sequence_pieces, weighted_ids

if TYPE_CHECKING:
    from mlx_sd_server.engine.model_io import LoadedModel

PATCH = 2  # the transformer sees 2x2 patches of latent pixels
T5_MAX_LENGTH = 512  # dev's; schnell's manifest says 256


class FluxConditioning(NamedTuple):
    context: mx.array  # (B, L, joint_attention_dim): T5 states
    pooled: mx.array  # (B, pooled_projection_dim): CLIP-L pooled output


class ReferenceTokens(NamedTuple):
    tokens: mx.array  # (1, L, 4C): the reference images' packed latents, one after another
    ids: mx.array  # (L, 3): their position ids, first column 1


class FluxFamily:
    prediction_type = "flow"

    def __init__(self, model: LoadedModel):
        self.model = model
        # Fill (fill.py): the masked image and the mask as input channels, packed like the latents
        self.inpainting_model = is_fill(model.manifest["components"]["transformer"]["config"])
        self.transformer = model.components["transformer"]
        self.latent_scale = model.vae.latent_scale  # image pixels per latent pixel (the VAE's downscale)
        self.scheduler_config = model.manifest["scheduler"]
        self.t5_max_length = TextLength.of(model.manifest, "text_encoder_2", T5_MAX_LENGTH).default
        self.kontext = is_kontext_model(model.manifest)

    def sigmas(self, settings: Settings) -> np.ndarray:
        tokens = image_tokens(self.model.vae, settings, PATCH)
        return flow_sigmas(settings.scheduler, settings.steps, self.scheduler_config, tokens)

    def guided(self, settings: Settings) -> bool:
        return settings.cfg_scale > 1.0

    # --- text --------------------------------------------------------------------------------------

    def encode_prompts(self, settings: Settings, guided: bool) -> FluxConditioning:
        """T5 states and CLIP pooled output for [negative, prompt] (or the prompt alone). A1111 emphasis
        weights T5's states, as stable-diffusion.cpp does; CLIP's pooled vector sees the plain text."""
        texts = [settings.negative_prompt, settings.prompt] if guided else [settings.prompt]
        clip_tokenizer, t5_tokenizer = self.model.tokenizers["text_encoder"], self.model.tokenizers["text_encoder_2"]
        clip, t5 = self.model.text_encoders["text_encoder"], self.model.text_encoders["text_encoder_2"]
        pieces = [sequence_pieces(text) for text in texts]
        plain = ["".join(fragment for fragment, _ in p) for p in pieces]
        pooled = clip(mx.array([clip_tokenizer.encode(text) for text in plain])).pooled_output
        length = self.t5_max_length if settings.max_sequence_length is None else settings.max_sequence_length
        ids, weights = zip(*(weighted_ids(t5_tokenizer, p, length) for p in pieces))
        states = emphasised(t5(mx.array(ids)).astype(mx.float32), weights)
        return FluxConditioning(states, pooled.astype(mx.float32))

    # --- Kontext's input image ---------------------------------------------------------------------

    def reference_tokens(self, images: Sequence[Image.Image]) -> ReferenceTokens | None:
        """Kontext's input images as FluxKontextPipeline feeds them: each resized to its preferred resolution,
        encoded (the posterior mean, in the sampler's latent space), packed, with ids (1, row, col). None when
        there are none (a Kontext model without an image makes an image from the prompt alone)."""
        if not images:
            return None
        assert self.kontext, "build_job takes reference images only on a model with references"
        tokens, ids = [], []
        for image in images:
            latents = encode_pixels(self.model, reference_pixels(image, self.latent_scale * PATCH))
            tokens.append(pack_latents(latents.astype(mx.float32)))
            ids.append(reference_ids(latents.shape[1], latents.shape[2]))
        joined = ReferenceTokens(mx.concatenate(tokens, axis=1), mx.concatenate(ids))
        mx.eval(joined)  # encoded once: every step reads them
        return joined

    # --- the denoiser ------------------------------------------------------------------------------

    def denoiser(
        self,
        settings: Settings,
        conditioning: FluxConditioning,
        guided: bool,
        extra_channels: mx.array | None,
        control: mx.array | None,
    ) -> Denoiser:
        dtype, n = self.model.dtype, settings.n
        copies = 2 if guided else 1
        context = mx.repeat(conditioning.context, n, axis=0).astype(dtype)  # [negative]*n + [prompt]*n
        pooled = mx.repeat(conditioning.pooled, n, axis=0).astype(dtype)
        h, w = settings.height // self.latent_scale, settings.width // self.latent_scale
        image_ids = latent_image_ids(h, w)
        generated = image_ids.shape[0]  # the tokens being denoised, before any reference's
        reference = None
        references = self.reference_tokens(settings.reference_images)
        if references is not None:  # the same for every image of the batch, and both halves of CFG
            reference = mx.repeat(references.tokens, copies * n, axis=0).astype(dtype)
            image_ids = mx.concatenate([image_ids, references.ids])
        text_ids = mx.zeros((context.shape[1], 3))
        guidance = None
        if self.transformer.config.guidance_embeds:
            value = settings.guidance if settings.guidance is not None else DEFAULT_GUIDANCE
            guidance = mx.full((copies * n,), value, dtype=mx.float32)

        fill = None  # Fill's extra channels, packed: the same for both halves of CFG
        if extra_channels is not None:
            fill = mx.concatenate([pack_latents(extra_channels)] * copies).astype(dtype)

        def predict(x: mx.array, sigma: float) -> mx.array:
            packed = mx.concatenate([pack_latents(x)] * copies).astype(dtype)
            if fill is not None:
                packed = mx.concatenate([packed, fill], axis=-1)
            if reference is not None:
                packed = mx.concatenate([packed, reference], axis=1)
            timestep = mx.full((packed.shape[0],), sigma, dtype=mx.float32)
            out = self.transformer(packed, context, pooled, timestep, image_ids, text_ids, guidance)
            velocity = unpack_latents(out[:, :generated].astype(mx.float32), h, w)
            return classifier_free_guidance(velocity, settings.cfg_scale) if guided else velocity

        return model_denoiser(predict, self.prediction_type)
