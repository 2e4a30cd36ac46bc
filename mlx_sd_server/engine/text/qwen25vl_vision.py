"""Qwen2.5-VL's vision side: its image processor, its vision tower and the 3D (multimodal RoPE) positions of a
prompt holding images. Qwen-Image-Edit(-Plus) encode the input images with it into the language model's prompt.

- `preprocess`: transformers' `Qwen2VLImageProcessorPil` (the processor transformers loads for Qwen-Image-Edit's
  `processor/` folder without torchvision): RGB on white, PIL resize to a multiple of 28 with the pixel count in
  [min_pixels, max_pixels] (`smart_resize`), rescale, CLIP normalisation, and 14x14 patches flattened with the
  image repeated over 2 frames, grouped by 2x2 merge blocks.
- `Qwen25VLVisionModel`: transformers' `Qwen2_5_VisionTransformerPretrainedModel`: a patch embedding (its
  Conv3d, stride = kernel, as a matmul over the flattened patches), 2D rotary positions, pre-norm blocks
  attending within windows of 112x112 pixels (full attention, within each image, in `fullatt_block_indexes`),
  and a patch merger (2x2 tokens -> one of the language model's width). Parameter names are transformers';
  `map_qwen25vl_vision_weight` reads both checkpoint layouts.
- `rope_index`: transformers' `Qwen2_5_VLModel.get_rope_index` for prompts whose images are runs of
  <|image_pad|> tokens: (temporal, height, width) positions of each image's merged tokens, text positions after.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from mlx_sd_server.engine.ops.activations import gelu, silu
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.layers import Linear
from mlx_sd_server.engine.text.qwen3 import Qwen3RMSNorm, apply_rope, rope_frequencies

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN_ID = 151655  # <|image_pad|> in Qwen2.5-VL's vocabulary
VISION_NORM_EPS = 1e-6  # transformers hard-codes it for the tower's norms
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer images


# --- the image processor -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen2VLImageProcessorConfig:
    """A preprocessor_config.json's settings; defaults are transformers' (Qwen-Image-Edit's file raises
    max_pixels to 12845056). `resample` is a PIL filter (3: bicubic)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2VLImageProcessorConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(float(x) for x in values[key])
        # transformers 5 writes the bounds as `size`; an explicit min_pixels / max_pixels wins, as in its __init__.
        size = d.get("size") or {}
        for ours, theirs in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if d.get(ours) is None and size.get(theirs, size.get(ours)) is not None:
                values[ours] = size.get(theirs, size.get(ours))
        return cls(**values)

    @property
    def factor(self) -> int:
        """What both sides of a resized image are a multiple of: one merge block of patches."""
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' smart_resize: the size nearest (height, width) with both sides multiples of `factor` and
    the pixel count within [min_pixels, max_pixels], the aspect ratio about kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"Qwen2.5-VL: image {width}x{height}: the aspect ratio must be below {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image, config: Qwen2VLImageProcessorConfig
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image's flattened patches (h/14 * w/14, 3 * 2 * 14 * 14) float32 and its grid (1, h/14, w/14)."""
    if config.do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":  # transformers would hand the tower other than 3 channels
        raise ValueError(f"Qwen2.5-VL: a {image.mode} image needs do_convert_rgb")
    factor = config.factor
    if config.do_resize:
        height, width = smart_resize(image.height, image.width, factor, config.min_pixels, config.max_pixels)
        image = image.resize((width, height), resample=config.resample)
    elif image.height % factor or image.width % factor:
        raise ValueError(f"Qwen2.5-VL: without do_resize, image sides must be multiples of {factor}")
    pixels = np.asarray(image)
    # In transformers' order and precisions: rescale in float64 then float32, normalize in float32.
    pixels = pixels.astype(np.float64) * config.rescale_factor if config.do_rescale else pixels
    pixels = pixels.astype(np.float32)
    if config.do_normalize:
        mean, std = np.array(config.image_mean, np.float32), np.array(config.image_std, np.float32)
        pixels = (pixels - mean) / std
    height, width, channels = pixels.shape
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    # (h, w, C) -> (grid_h/m, grid_w/m, m, m, C, p, p): patches grouped by merge block, channels first within
    patches = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, channels).transpose(0, 3, 1, 4, 6, 2, 5)
    # A still image is `temporal_patch_size` identical frames (the Conv3d's depth).
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return patches.reshape(grid_h * grid_w, channels * t * p * p), (1, grid_h, grid_w)


def preprocess(images: Sequence[Image.Image], config: Qwen2VLImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """transformers' Qwen2VLImageProcessorPil on `images`: pixel_values (sum of patches, C * T * P * P) float32
    and image_grid_thw (len(images), 3) int64, each image's (frames, patch rows, patch columns)."""
    if not images:
        raise ValueError("Qwen2.5-VL: no images to preprocess")
    patches, grids = zip(*(preprocess_image(image, config) for image in images))
    return np.concatenate(patches, axis=0), np.array(grids, dtype=np.int64)


# --- the vision tower --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen25VLVisionConfig:
    """transformers' Qwen2_5_VLVisionConfig; defaults are Qwen2.5-VL-7B's (Qwen-Image's text encoder).
    `from_dict` takes the vision_config dict or the whole Qwen2_5_VLConfig dict."""

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen25VLVisionConfig:
        d = d.get("vision_config") or d
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        if "in_channels" not in values and d.get("in_chans") is not None:  # transformers 4's name
            values["in_channels"] = d["in_chans"]
        if "fullatt_block_indexes" in values:
            values["fullatt_block_indexes"] = tuple(values["fullatt_block_indexes"])
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"Qwen2.5-VL vision: rope type {rope['rope_type']!r} is not supported (axial only)")
        if rope.get("rope_theta") is not None:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """The length of one flattened patch: channels x frames x patch_size^2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


Grid = tuple[int, int, int]  # (frames, patch rows, patch columns) of one image


def as_grids(grid_thw: np.ndarray | mx.array | Sequence[Sequence[int]]) -> list[Grid]:
    rows = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def vision_position_ids(grids: list[Grid], merge: int) -> np.ndarray:
    """(patches, 2): each patch's (row, column) in its image, patches in the processor's merge-block order."""
    out = []
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows, cols = (a.reshape(block).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols))
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0)


def cu_seqlens(grids: list[Grid]) -> np.ndarray:
    """Token offsets of the full-attention segments: one per frame of each image."""
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def window_index(grids: list[Grid], config: Qwen25VLVisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """transformers' get_vision_window_index: the merge blocks reordered window by window (window_size pixels
    square, row-major within each image and frame) and the windows' token offsets (empty windows dropped)."""
    merge = config.spatial_merge_size
    side = config.window_size // merge // config.patch_size  # merge blocks along a window's side
    unit = merge * merge
    order, offsets, first = [], [0], 0
    for t, h, w in grids:
        rows, cols = h // merge, w // merge
        index = np.arange(t * rows * cols).reshape(t, rows, cols)
        pad_h, pad_w = side - rows % side, side - cols % side
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
        windows_h, windows_w = (rows + pad_h) // side, (cols + pad_w) // side
        padded = padded.reshape(t, windows_h, side, windows_w, side).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t * windows_h * windows_w, side * side)
        order.append(padded[padded >= 0] + first)
        offsets.extend((np.cumsum((padded >= 0).sum(axis=1)) * unit + offsets[-1]).tolist())
        first += t * rows * cols
    cu = np.array(offsets, dtype=np.int64)
    return np.concatenate(order), cu[np.concatenate([[True], np.diff(cu) > 0])]


def segment_attention(q: mx.array, k: mx.array, v: mx.array, cu: np.ndarray) -> mx.array:
    """Attention within each segment [cu[i], cu[i+1]) of the sequence: q, k, v and the result (N, heads, D).
    Segments are padded to the longest and run as one batch, their padding masked out of the keys."""
    lengths = np.diff(cu)
    count, longest = len(lengths), int(lengths.max())
    if (lengths == longest).all():  # equal segments: a reshape, no mask
        q, k, v = (x.reshape(count, longest, *x.shape[1:]).transpose(0, 2, 1, 3) for x in (q, k, v))
        out = attention(q, k, v)
        return out.transpose(0, 2, 1, 3).reshape(-1, *out.shape[1:2], out.shape[-1])
    steps = np.arange(longest)
    valid = steps[None, :] < lengths[:, None]  # (segments, longest)
    gather = mx.array(np.where(valid, cu[:-1, None] + steps[None, :], 0).reshape(-1))
    q, k, v = (x[gather].reshape(count, longest, *x.shape[1:]).transpose(0, 2, 1, 3) for x in (q, k, v))
    out = attention(q, k, v, mask=mx.array(valid)[:, None, None, :])
    out = out.transpose(0, 2, 1, 3).reshape(count * longest, *out.shape[1:2], out.shape[-1])
    return out[mx.array(np.flatnonzero(valid))]


class Qwen25VLPatchEmbed(nn.Module):
    """The Conv3d over (frames, 14, 14) patches with stride = kernel: one matmul over flattened patches
    (its weight (hidden, C, T, P, P) stored as (hidden, C * T * P * P))."""

    def __init__(self, config: Qwen25VLVisionConfig):
        super().__init__()
        self.proj = Linear(config.patch_dim, config.hidden_size, bias=False)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values.astype(self.proj.weight.dtype))


class Qwen25VLVisionAttention(nn.Module):
    def __init__(self, config: Qwen25VLVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, cu: np.ndarray) -> mx.array:
        length = x.shape[0]
        qkv = self.qkv(x).reshape(length, 3, self.num_heads, -1)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # Rotated in float32, as transformers' apply_rotary_pos_emb_vision.
        q, k = (apply_rope(t.astype(mx.float32), cos, sin).astype(x.dtype) for t in (q, k))
        return self.proj(segment_attention(q, k, v, cu).reshape(length, -1))


class Qwen25VLVisionMLP(nn.Module):
    def __init__(self, config: Qwen25VLVisionConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen25VLVisionBlock(nn.Module):
    def __init__(self, config: Qwen25VLVisionConfig):
        super().__init__()
        self.norm1 = Qwen3RMSNorm(config.hidden_size, VISION_NORM_EPS)
        self.norm2 = Qwen3RMSNorm(config.hidden_size, VISION_NORM_EPS)
        self.attn = Qwen25VLVisionAttention(config)
        self.mlp = Qwen25VLVisionMLP(config)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, cu: np.ndarray) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, cu)
        return x + self.mlp(self.norm2(x))


class GELU(nn.Module):
    """torch's nn.GELU() (exact): the parameterless middle of the merger's nn.Sequential."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x)


class Qwen25VLPatchMerger(nn.Module):
    """RMS norm, then each merge block's 4 tokens concatenated and projected to the language model's width."""

    def __init__(self, config: Qwen25VLVisionConfig):
        super().__init__()
        self.merged = merged = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = Qwen3RMSNorm(config.hidden_size, VISION_NORM_EPS)
        self.mlp = [Linear(merged, merged), GELU(), Linear(merged, config.out_hidden_size)]  # mlp.0, mlp.2

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.merged)
        for layer in self.mlp:
            x = layer(x)
        return x


class Qwen25VLVisionModel(nn.Module):
    """transformers' Qwen2_5_VisionTransformerPretrainedModel (Qwen2.5-VL's `visual`), its forward's
    `pooler_output`: the merged image embeddings that replace the prompt's <|image_pad|> tokens."""

    def __init__(self, config: Qwen25VLVisionConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Qwen2.5-VL vision: activation {config.hidden_act!r} is not supported (silu only)")
        if config.hidden_size % config.num_heads or config.head_dim % 4:
            raise ValueError(
                f"Qwen2.5-VL vision: {config.hidden_size} channels in {config.num_heads} heads: the head size must "
                "be a multiple of 4 (rows and columns each rotate half of it)"
            )
        if config.window_size // config.spatial_merge_size // config.patch_size < 1:
            raise ValueError(f"Qwen2.5-VL vision: window_size {config.window_size} is below one merge block")
        self.config = config
        self.patch_embed = Qwen25VLPatchEmbed(config)
        self.blocks = [Qwen25VLVisionBlock(config) for _ in range(config.depth)]
        self.merger = Qwen25VLPatchMerger(config)

    def rotary_tables(self, positions: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos and sin (N, 1, head_dim) float32 for (N, 2) (row, column) positions: a quarter of the head's
        frequencies for rows, a quarter for columns, the two halves repeated for rotate_half's pairs."""
        inv_freq = rope_frequencies(self.config.head_dim // 2, self.config.rope_theta)
        angles = mx.array(positions, dtype=mx.float32)[..., None] * inv_freq  # (N, 2, head_dim / 4)
        angles = angles.reshape(positions.shape[0], -1)
        angles = mx.concatenate([angles, angles], axis=-1)[:, None, :]
        return mx.cos(angles), mx.sin(angles)

    def __call__(
        self, pixel_values: mx.array | np.ndarray, grid_thw: np.ndarray | mx.array | Sequence[Sequence[int]]
    ) -> mx.array:
        """pixel_values (sum of patches, C * T * P * P) and grid_thw (images, 3), as `preprocess` makes them;
        returns the images' embeddings (sum of t * h * w / merge^2, out_hidden_size), image after image, each
        image's merge blocks in row-major order. Attention never crosses images (nor frames)."""
        config, merge = self.config, self.config.spatial_merge_size
        grids = as_grids(grid_thw)
        if any(h % merge or w % merge for _, h, w in grids):
            raise ValueError(f"Qwen2.5-VL vision: grids {grids}: rows and columns must be multiples of {merge}")
        patches = sum(t * h * w for t, h, w in grids)
        if tuple(pixel_values.shape) != (patches, config.patch_dim):
            raise ValueError(
                f"Qwen2.5-VL vision: pixel_values {tuple(pixel_values.shape)} for grids {grids}: expected "
                f"({patches}, {config.patch_dim})"
            )
        order, cu_windows = window_index(grids, config)
        unit = merge * merge
        tokens = (order[:, None] * unit + np.arange(unit)).reshape(-1)  # merge blocks in window order
        cu_full = cu_seqlens(grids)
        cos, sin = self.rotary_tables(vision_position_ids(grids, merge)[tokens])
        x = self.patch_embed(mx.array(pixel_values))[mx.array(tokens)]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_full if i in config.fullatt_block_indexes else cu_windows)
        return self.merger(x)[mx.array(np.argsort(order))]


def map_qwen25vl_vision_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One Qwen2.5-VL checkpoint (key, value) as the vision tower's: `visual.*` (released files, transformers 4)
    or `model.visual.*` (transformers 5) without the prefix, the patch Conv3d flattened; the language model's
    keys are not the tower's."""
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            name = key.removeprefix(prefix)
            if name == "patch_embed.proj.weight" and value.ndim == 5:
                value = value.reshape(value.shape[0], -1)
            return [(name, value)]
    return []


# --- 3D positions ------------------------------------------------------------------------------------


def rope_index(
    input_ids: np.ndarray | mx.array,
    image_grid_thw: np.ndarray | mx.array | Sequence[Sequence[int]],
    attention_mask: np.ndarray | mx.array | None,
    config: Qwen25VLVisionConfig,
    image_token_id: int = IMAGE_TOKEN_ID,
) -> mx.array:
    """transformers' get_rope_index for prompts holding images: position_ids (3, B, L) int32.

    input_ids (B, L); each image is a run of `image_token_id`, t * h * w / merge^2 long, the runs in the order
    of image_grid_thw's rows across the batch. Text tokens count on from the last position (all three
    rows equal); an image's tokens take (start + frame, start + row, start + column) over its merged grid, and
    the text after it starts at start + max(rows, columns). Padding (attention_mask 0) gets position 0 and is
    not counted.
    """
    ids = np.asarray(input_ids)
    batch, length = ids.shape
    keep = np.ones((batch, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    merge = config.spatial_merge_size
    grids = iter(as_grids(image_grid_thw))
    positions = np.zeros((3, batch, length), dtype=np.int64)
    for row in range(batch):
        is_image = ids[row][keep[row]] == image_token_id
        parts, start, offset = [], 0, 0
        for image, run in itertools.groupby(is_image):
            count = len(list(run))
            if not image:
                parts.append(np.broadcast_to(np.arange(count) + start, (3, count)))
                start, offset = start + count, offset + count
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError("Qwen2.5-VL: the prompts hold more image runs than image_grid_thw has images")
            t, h, w = grid[0], grid[1] // merge, grid[2] // merge
            if count != t * h * w:
                raise ValueError(
                    f"Qwen2.5-VL: an image run of {count} tokens (prompt {row}, token {offset}) for a "
                    f"{grid} grid, which has {t * h * w} merged tokens"
                )
            frames, rows, cols = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            parts.append(np.stack([frames, rows, cols]).reshape(3, -1) + start)
            start, offset = start + max(h, w), offset + count
        if parts:
            positions[:, row, keep[row]] = np.concatenate(parts, axis=1)
    if next(grids, None) is not None:
        raise ValueError("Qwen2.5-VL: image_grid_thw has more images than the prompts hold image runs")
    return mx.array(positions.astype(np.int32))


def image_token_counts(image_grid_thw: np.ndarray | mx.array | Sequence[Sequence[int]], merge_size: int) -> list[int]:
    """How many <|image_pad|> tokens stand for each image in the prompt (the processor's expansion)."""
    return [t * h * w // merge_size**2 for t, h, w in as_grids(image_grid_thw)]
