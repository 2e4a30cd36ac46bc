"""Qwen-Image-Edit: instruction edits, as diffusers' QwenImageEditPipeline (the first edit model, one image) and
QwenImageEditPlusPipeline (2509, 2511: up to three images) run them.

- Each input image is read twice. Qwen2.5-VL sees it (its vision tower, through the image processor's own
  resizing) inside the prompt, at <|image_pad|> tokens: the first model's template holds one such slot, the Plus
  models' prompts start with "Picture i: <slot>" per image; the first model gives the processor the image at the
  VAE's size, the Plus models at about CONDITION_AREA pixels. The autoencoder encodes it at about VAE_AREA pixels
  (`area_size`), and its packed latents follow the noisy tokens in the transformer's sequence, each image one
  more frame of `img_shapes`; the prediction is read off the noisy tokens alone.
- The conditioning is the last hidden state of the prompt's tokens less the template's first DROPPED (64), as
  for txt2img; the language model reads the images' 3D RoPE positions (`rope_index`: what transformers intends,
  which diffusers' pipelines miss; docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_sd_server.engine.families.spec import PIPELINE_CLASS
from mlx_sd_server.engine.text.qwen25vl_vision import (
    Qwen2VLImageProcessorConfig,
    image_token_counts,
    preprocess,
    rope_index,
)

EDIT_PIPELINE = "QwenImageEditPipeline"
EDIT_PLUS_PIPELINE = "QwenImageEditPlusPipeline"
SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PICTURE = "Picture {}: " + SLOT  # a Plus model's prompt starts with one per image
DROPPED = 64  # the template's tokens before the prompt (prompt_template_encode_start_idx)
CONDITION_AREA = 384 * 384  # the Plus models' images as Qwen2.5-VL reads them
VAE_AREA = 1024 * 1024  # every edit model's images as the autoencoder encodes them
SIDE_MULTIPLE = 32  # calculate_dimensions rounds both sides to it
# Qwen-Image-Edit's processor/preprocessor_config.json: transformers' defaults but max_pixels, raised so that the
# first model's 1024 x 1024 images are read whole
PROCESSOR = Qwen2VLImageProcessorConfig(max_pixels=12845056)
REFERENCES = {"edit": 1, "edit-plus": 3}  # the images each reads (the Plus pipelines take more; 3 as released)


def edit_kind(pipeline: Mapping[str, Any], name: str) -> str | None:
    """ "edit" (the first edit model), "edit-plus" (2509, 2511) or None (txt2img Qwen-Image): as the diffusers
    folder's pipeline class says, else by name as the releases are named (Qwen-Image-Edit, -Edit-2509)."""
    if PIPELINE_CLASS in pipeline:
        return {EDIT_PIPELINE: "edit", EDIT_PLUS_PIPELINE: "edit-plus"}.get(pipeline[PIPELINE_CLASS])
    lowered = name.lower()
    if "edit" not in lowered:
        return None
    return "edit" if not any(release in lowered for release in ("2509", "2511", "plus")) else "edit-plus"


def area_size(area: int, width: int, height: int) -> tuple[int, int]:
    """calculate_dimensions: the (width, height) of about `area` pixels at the image's aspect ratio, each side
    rounded to SIDE_MULTIPLE."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    return round(w / SIDE_MULTIPLE) * SIDE_MULTIPLE, round(w / ratio / SIDE_MULTIPLE) * SIDE_MULTIPLE


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """VaeImageProcessor.resize: Lanczos to exactly `size`, RGB."""
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def condition_images(kind: str, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The images as the pipeline hands them to Qwen2.5-VL's processor."""
    area = VAE_AREA if kind == "edit" else CONDITION_AREA
    return [resized(image, area_size(area, *image.size)) for image in images]


def vae_pixels(images: Sequence[Image.Image]) -> list[np.ndarray]:
    """The images as the autoencoder encodes them: about VAE_AREA pixels, [0, 1] HWC float32."""
    return [np.asarray(resized(image, area_size(VAE_AREA, *image.size)), np.float32) / 255.0 for image in images]


def prompt_text(kind: str, images: int) -> tuple[str, str]:
    """The template's text before and after the user's prompt, its image slots included."""
    head, tail = TEMPLATE.split("{}")
    if kind == "edit":  # its one slot (the pipeline takes one image)
        return head + SLOT * min(images, 1), tail
    return head + "".join(PICTURE.format(i + 1) for i in range(images)), tail


def expanded(text: str, counts: Sequence[int]) -> str:
    """The text with its i-th <|image_pad|> repeated counts[i] times, as the processor expands it."""
    parts = text.split(IMAGE_PAD)
    if len(parts) != len(counts) + 1:
        raise ValueError(f"{len(parts) - 1} image slots for {len(counts)} images")
    return "".join(part + IMAGE_PAD * count for part, count in zip(parts, counts)) + parts[-1]


def edit_states(
    encoder: Any,
    token_ids: Sequence[list[int]],
    pixel_values: np.ndarray,
    grid_thw: np.ndarray,
    image_token_id: int,
    pad_id: int,
) -> tuple[mx.array, list[int]]:
    """Qwen2.5-VL's last hidden states (B, L, hidden) float32 of prompts that each hold every image once (in
    order), right-padded to the longest, and each prompt's length. The vision tower runs once for all."""
    features = encoder.visual(pixel_values, grid_thw)
    lengths = [len(ids) for ids in token_ids]
    longest = max(lengths)
    ids = np.array([ids + [pad_id] * (longest - len(ids)) for ids in token_ids])
    mask = np.array([[1] * n + [0] * (longest - n) for n in lengths])
    is_image = ids == image_token_id
    if (is_image.sum(axis=1) != features.shape[0]).any():
        counts = is_image.sum(axis=1).tolist()
        raise ValueError(f"the prompts hold {counts} image tokens for {features.shape[0]} image features")
    feature_of = np.maximum(np.cumsum(is_image, axis=1) - 1, 0)  # each position's feature, where it is an image's
    embeds = encoder.embed(mx.array(ids))
    embeds = mx.where(mx.array(is_image)[..., None], features.astype(embeds.dtype)[mx.array(feature_of)], embeds)
    grids = np.concatenate([grid_thw] * len(token_ids))
    positions = rope_index(ids, grids, mask, encoder.visual.config, image_token_id)
    states = encoder(
        inputs_embeds=embeds,
        attention_mask=mx.array(mask) if min(lengths) < longest else None,
        position_ids=positions,
    )
    return states.astype(mx.float32), lengths


def vision_inputs(kind: str, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The condition images as the vision tower reads them (pixel values, grids) and each one's token count."""
    pixel_values, grid_thw = preprocess(condition_images(kind, images), PROCESSOR)
    return pixel_values, grid_thw, image_token_counts(grid_thw, PROCESSOR.merge_size)
