"""The Qwen-Image transformer (Qwen-Image, Qwen-Image-Edit, Edit-2509, Edit-2511) in MLX: diffusers'
QwenImageTransformer2DModel, a dual-stream MMDiT.

Parameter names are diffusers' state-dict names, so `map_qwenimage_transformer_weight` is the identity.

The flow (diffusers' `forward`):
- tokens are the packed 2x2 patches of the 16-channel latent (64 channels; the pipeline packs them); edit models
  append the reference images' tokens after the target's, each image an entry of `img_shapes`
  (frames, h, w) in patches. The model returns every image token; the edit pipelines keep the target's.
- the text (Qwen2.5-VL hidden states) goes through RMSNorm (`txt_norm`) and `txt_in`; the timestep (a sigma in
  [0, 1], scaled by 1000) through sinusoids and an MLP (`time_text_embed`). No pooled text, no guidance.
- every block has its own modulations of silu(temb), one per stream (`img_mod`, `txt_mod`: shift, scale and
  gate for the attention and for the MLP), joint attention over [text, image] with per-stream projections
  and RMS-normed queries and keys, and per-stream GELU feed-forwards.
- 3-axis RoPE (frame, row, col), theta 10000, positions centred (diffusers' scale_rope): an h-row image has rows
  -(h - h//2) .. h//2 - 1; image i of `img_shapes` has frame i; text token j sits at max(h//2, w//2) over the
  images + j on all three axes.
- `zero_cond_t` (Edit-2511): the reference images' tokens are modulated by the embedding of timestep 0, the
  target's (and the text's, and the output norm's) by the real one.
- text padding (`encoder_hidden_states_mask` False) is masked out of every attention's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.blocks.embeddings import TIME_CHANNELS, TimestepEmbedding, timestep_embedding
from mlx_sd_server.engine.blocks.transformer import FeedForward, Modulation, RopeAttention, clip_float16, modulate
from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.layers import Linear

EPS = 1e-6  # every norm's: the blocks' LayerNorms and QK RMSNorms, txt_norm, norm_out
ROPE_THETA = 10000
ROPE_POSITIONS = 4096  # diffusers' QwenEmbedRope tabulates positions -4096 .. 4095 and no others

ImageShapes = Sequence[Sequence[tuple[int, int, int]]]  # per batch item: (frames, h, w) per image, target first


@dataclass(frozen=True)
class QwenImageTransformerConfig:
    """diffusers' QwenImageTransformer2DModel arguments; defaults are diffusers' (Qwen-Image's config.json; the
    Edit models' differ only in zero_cond_t, true for Edit-2511)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    # diffusers builds no guidance embedder whatever this says (and its forward fails when given a guidance);
    # so do we: accepted, no parameters
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self) -> None:
        if self.use_additional_t_cond or self.use_layer3d_rope:
            raise ValueError(
                "Qwen-Image transformer: Qwen-Image-Layered (use_additional_t_cond, use_layer3d_rope) is not supported"
            )
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"Qwen-Image transformer: axes_dims_rope {list(self.axes_dims_rope)} must be 3 even sizes")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"Qwen-Image transformer: axes_dims_rope {list(self.axes_dims_rope)} must sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> QwenImageTransformerConfig:
        """From a diffusers transformer config.json dict (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and (v is not None or k == "out_channels")}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        return cls(**values)


# --- rotary positions (diffusers' QwenEmbedRope, scale_rope=True) ----------------------------------------


def rope_positions(shapes: Sequence[tuple[int, int, int]], text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer positions (frame, row, col) of the text tokens (text_length, 3) and of the image tokens
    (sum f*h*w, 3), row-major per image, the images in `shapes` order (target, then references)."""
    images = []
    for index, (frames, h, w) in enumerate(shapes):
        grid = np.meshgrid(index + np.arange(frames), np.arange(h) - (h - h // 2), np.arange(w) - (w - w // 2),
                           indexing="ij")  # fmt: skip
        images.append(np.stack([g.reshape(-1) for g in grid], axis=-1))
    start = max(max(h // 2, w // 2) for _, h, w in shapes)
    text = np.repeat((start + np.arange(text_length))[:, None], 3, axis=1)
    image = np.concatenate(images, axis=0)
    lowest, highest = min(int(image.min()), 0), max(int(image.max()), int(text.max(initial=0)))
    if lowest < -ROPE_POSITIONS or highest >= ROPE_POSITIONS:
        raise ValueError(
            f"Qwen-Image positions run from {lowest} to {highest}; the model has positions {-ROPE_POSITIONS} to "
            f"{ROPE_POSITIONS - 1}: the images ({list(shapes)} patches) or the text ({text_length} tokens) are too "
            "large"
        )
    return text, image


def rope_cos_sin(
    positions: np.ndarray, axes_dims: Sequence[int], theta: float = ROPE_THETA
) -> tuple[mx.array, mx.array]:
    """cos and sin (L, head_dim/2), float32, of the angles of integer positions (L, 3): per axis, the position
    times theta^(-2k/dim), both float32 and their product rounded once, as diffusers' tables hold them."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        freqs = np.float32(1.0) / (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
        angles.append(positions[:, axis : axis + 1].astype(np.float32) * freqs)
    joined = np.concatenate(angles, axis=-1).astype(np.float64)
    return mx.array(np.cos(joined).astype(np.float32)), mx.array(np.sin(joined).astype(np.float32))


class QwenEmbedRope(nn.Module):
    """diffusers' QwenEmbedRope with scale_rope=True (how QwenImageTransformer2DModel builds it); no parameters."""

    def __init__(self, axes_dim: Sequence[int], theta: float = ROPE_THETA):
        super().__init__()
        self.axes_dim, self.theta = tuple(axes_dim), theta

    def __call__(self, shapes: Sequence[tuple[int, int, int]], text_length: int) -> tuple[mx.array, mx.array]:
        """cos and sin (text_length + image tokens, head_dim/2) of the joint sequence [text, images]."""
        text, image = rope_positions(shapes, text_length)
        return rope_cos_sin(np.concatenate([text, image], axis=0), self.axes_dim, self.theta)


# --- blocks ----------------------------------------------------------------------------------------------


class QwenTimestepProjEmbeddings(nn.Module):
    """The timestep's embedding: sinusoids of sigma, their angles scaled by 1000 (cos first; diffusers'
    Timesteps(scale=1000), which rounds differently from FLUX's sinusoids of 1000 * sigma), then
    Linear-SiLU-Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)

    def __call__(self, timestep: mx.array, dtype: mx.Dtype) -> mx.array:
        sinusoids = timestep_embedding(timestep, TIME_CHANNELS, flip_sin_to_cos=True, freq_shift=0, scale=1000)
        return self.timestep_embedder(sinusoids.astype(dtype))


Mods = list[mx.array]  # shift, scale, gate of the attention, then of the MLP: (B, dim) each


def by_segment(x: mx.array, target: int, mods: list[Mods], fn: Callable[[mx.array, Mods], mx.array]) -> mx.array:
    """fn(tokens, mods) over image tokens (B, L, dim): with one set of modulations, all of them; with two
    (zero_cond_t), the first `target` tokens with the first, the reference images' with the second."""
    if len(mods) == 1:
        return fn(x, mods[0])
    return mx.concatenate([fn(x[:, :target], mods[0]), fn(x[:, target:], mods[1])], axis=1)


class QwenImageTransformerBlock(nn.Module):
    """A dual-stream block: each stream modulated by its own projection of silu(temb) (LayerNorms without
    affine, scaled, shifted, residuals gated), joint attention, per-stream feed-forwards."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        # diffusers' Sequential(SiLU, Linear); the identity keeps the names `img_mod.1`, `txt_mod.1`. The SiLU is
        # the model's, computed once for all blocks.
        self.img_mod = [nn.Identity(), Linear(dim, 6 * dim)]
        self.attn = RopeAttention(dim, heads, head_dim, joint=True, bias=True, eps=EPS)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = [nn.Identity(), Linear(dim, 6 * dim)]
        self.txt_mlp = FeedForward(dim)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        conds: list[mx.array],
        target: int,
        rope: tuple[mx.array, mx.array],
        mask: mx.array | None,
    ) -> tuple[mx.array, mx.array]:
        """`conds`: silu(temb) (B, dim), then, with zero_cond_t and reference images, silu(temb at t = 0) for
        the image tokens past the first `target`. Returns (context, x) as diffusers does."""
        img_mods = [self.img_mod[1](c).split(6, axis=-1) for c in conds]
        txt = self.txt_mod[1](conds[0]).split(6, axis=-1)
        attn, context_attn = self.attn.joint(
            by_segment(x, target, img_mods, lambda s, m: modulate(s, m[0], m[1], EPS)),
            modulate(context, txt[0], txt[1], EPS),
            rope,
            mask,
        )
        x = x + by_segment(attn, target, img_mods, lambda s, m: m[2][:, None] * s)
        context = context + txt[2][:, None] * context_attn
        mlp = self.img_mlp(by_segment(x, target, img_mods, lambda s, m: modulate(s, m[3], m[4], EPS)))
        x = x + by_segment(mlp, target, img_mods, lambda s, m: m[5][:, None] * s)
        context = context + txt[5][:, None] * self.txt_mlp(modulate(context, txt[3], txt[4], EPS))
        return clip_float16(context), clip_float16(x)


# --- the model -------------------------------------------------------------------------------------------


class QwenImageTransformer2DModel(nn.Module):
    """diffusers' QwenImageTransformer2DModel (see the module's docstring)."""

    def __init__(self, config: QwenImageTransformerConfig):
        super().__init__()
        c = self.config = config
        dim = c.inner_dim
        self.pos_embed = QwenEmbedRope(c.axes_dims_rope)
        self.time_text_embed = QwenTimestepProjEmbeddings(dim)
        self.txt_norm = nn.RMSNorm(c.joint_attention_dim, eps=EPS)
        self.img_in = Linear(c.in_channels, dim)
        self.txt_in = Linear(c.joint_attention_dim, dim)
        self.transformer_blocks = [
            QwenImageTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers)
        ]
        self.norm_out = Modulation(dim, 2)  # AdaLayerNormContinuous: scale, then shift
        self.proj_out = Linear(dim, c.patch_size**2 * (c.out_channels or c.in_channels))

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask: mx.array | None,
        timestep: mx.array | float,
        img_shapes: ImageShapes,
        guidance: mx.array | float | None = None,
    ) -> mx.array:
        """The model's output (B, L_img, patch_size^2 * out_channels) for packed latent tokens (B, L_img,
        in_channels) at sigmas `timestep` (B,) or a scalar (diffusers' pipelines pass timestep / 1000), given the
        text states (B, L_txt, joint_attention_dim) and their mask (B, L_txt), True or nonzero for real tokens
        (None: all real). `img_shapes[b]` lists item b's images (frames, h, w) in 2x2 patches, the target first:
        their tokens, in that order, are hidden_states' L_img = sum f*h*w; every item's list must be the same
        (diffusers' RoPE positions all by the first's). Every image token's output is returned (edit pipelines
        keep the target's). Computes in hidden_states' dtype.

        `guidance` must be None: no Qwen-Image model embeds a guidance scale (diffusers' forward fails given one).
        """
        c = self.config
        b, length, _ = hidden_states.shape
        if guidance is not None:
            raise ValueError(
                "Qwen-Image transformer: the model has no guidance embedding (diffusers' QwenImageTransformer2DModel "
                "builds none, even with guidance_embeds): pass guidance=None and use true CFG"
            )
        per_item = [[(int(f), int(h), int(w)) for f, h, w in item] for item in img_shapes]
        shapes = per_item[0] if per_item else []
        if len(per_item) != b or not shapes or any(item != shapes for item in per_item):
            raise ValueError(
                f"Qwen-Image img_shapes: {len(img_shapes)} lists for a batch of {b}; each must list the same images "
                f"(frames, h, w), at least one: {list(img_shapes)}"
            )
        sizes = [f * h * w for f, h, w in shapes]
        if sum(sizes) != length or min(sizes) < 1:
            raise ValueError(
                f"Qwen-Image img_shapes {shapes} make {sum(sizes)} image tokens; hidden_states has {length}"
            )
        text_length = encoder_hidden_states.shape[1]
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(f"Qwen-Image: {encoder_hidden_states.shape[0]} text states for a batch of {b}")
        mask = None
        if encoder_hidden_states_mask is not None:
            if tuple(encoder_hidden_states_mask.shape) != (b, text_length):
                raise ValueError(
                    f"Qwen-Image encoder_hidden_states_mask has shape {tuple(encoder_hidden_states_mask.shape)}; "
                    f"the text states need ({b}, {text_length})"
                )
            keys = mx.concatenate([encoder_hidden_states_mask != 0, mx.ones((b, length), mx.bool_)], axis=1)
            mask = keys[:, None, None]  # (B, 1, 1, L_txt + L_img): every query, every head

        dtype = hidden_states.dtype
        x = self.img_in(hidden_states)
        context = self.txt_in(self.txt_norm(encoder_hidden_states.astype(dtype)))
        t = mx.broadcast_to(mx.array(timestep, dtype=mx.float32).reshape(-1), (b,))
        temb = self.time_text_embed(t, dtype)
        conds = [silu(temb)]
        target = sizes[0]
        if c.zero_cond_t and target < length:  # reference tokens: modulated at t = 0
            conds.append(silu(self.time_text_embed(mx.zeros((b,)), dtype)))
        rope = self.pos_embed(shapes, text_length)

        for block in self.transformer_blocks:
            context, x = block(x, context, conds, target, rope, mask)

        scale, shift = self.norm_out(conds[0])
        return self.proj_out(modulate(x, shift, scale, EPS))


def map_qwenimage_transformer_weight(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One diffusers QwenImageTransformer2DModel (key, value) as ours: our names and layouts are diffusers' (linear
    layers and RMSNorm scales; no convolutions, no buffers), so this is the identity."""
    return [(key, value)]


QWENIMAGE_TRANSFORMER = ComponentKind(
    ("QwenImageTransformer2DModel",),
    QwenImageTransformerConfig,
    QwenImageTransformer2DModel,
    map_qwenimage_transformer_weight,
)
