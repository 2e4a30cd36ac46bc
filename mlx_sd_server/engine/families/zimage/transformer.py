"""The Z-Image transformer (Turbo and base) in MLX: diffusers' ZImageTransformer2DModel, a single-stream DiT.

Parameter names are diffusers' state-dict names, so `mapping.py` is the identity.

The flow, per item of the batch (diffusers' `forward` in its basic, non-Omni mode):
- the latent is cut into p x p patches (channels ordered (patch row, patch col, c)), embedded, and padded to a
  multiple of SEQ_MULTI_OF tokens with the learned `x_pad_token`; the caption features (Qwen3 hidden states)
  go through RMSNorm + Linear and are padded the same way with `cap_pad_token`. Pad tokens are attended to.
- 3-axis RoPE over (frame, row, col) ids: caption token j is (1 + j, 0, 0); image token (r, c) is
  (P + 1, r, c) with P the caption's padded length; image pad tokens are (0, 0, 0).
- `noise_refiner` blocks (modulated by the timestep) refine the image tokens, `context_refiner` blocks (not
  modulated) the caption tokens; then `layers` run over the joint sequence [image, caption].
- the final layer (LayerNorm scaled by 1 + a projection of silu(t_emb)) gives the output patches.

Our batch is arrays where diffusers takes lists: every image of a call has one size (so the image tokens
line up), and captions of different lengths share one padded array, `cap_lengths` saying how many leading
tokens of each are real. Where items' padded caption lengths differ, diffusers pads the shorter sequences to
the longest and masks the batch padding out of attention; we build the same sequences and masks, so each
item's result is the one it gets alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd_server.engine.blocks.embeddings import apply_rope, timestep_embedding
from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.zimage.mapping import map_zimage_transformer_weight
from mlx_sd_server.engine.ops.activations import silu
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.layers import Linear

ADALN_EMBED_DIM = 256  # the width of the timestep embedding every modulation reads (less if dim is smaller)
SEQ_MULTI_OF = 32  # image and caption sequences are padded to multiples of this
FREQUENCY_EMBEDDING_SIZE = 256
TIME_MID_SIZE = 1024  # the timestep MLP's hidden width
QK_NORM_EPS = 1e-5  # diffusers' Attention(eps=1e-5), whatever norm_eps says


@dataclass(frozen=True)
class ZImageTransformerConfig:
    """diffusers' ZImageTransformer2DModel arguments; defaults are the released Z-Image-Turbo's config.json
    (which differs from diffusers' defaults in axes_lens)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # diffusers builds full multi-head attention whatever this says; so do we
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    def __post_init__(self) -> None:
        # Images are single frames: a frame patch size other than 1 cannot apply, and the released models have
        # one patch size. Several would be several embedders chosen per call; no released model has them.
        if len(self.all_patch_size) != 1 or tuple(self.all_f_patch_size) != (1,):
            raise ValueError(
                "Z-Image transformer: only one patch size with frame patch size 1 is supported (Z-Image-Turbo has "
                f"all_patch_size [2], all_f_patch_size [1]); this config has all_patch_size {list(self.all_patch_size)}"
                f", all_f_patch_size {list(self.all_f_patch_size)}"
            )
        if self.siglip_feat_dim is not None:
            raise ValueError("Z-Image transformer: the Omni variant (siglip_feat_dim) is not supported")
        if self.dim % self.n_heads or sum(self.axes_dims) != self.dim // self.n_heads:
            raise ValueError(
                f"Z-Image transformer: axes_dims {list(self.axes_dims)} must sum to the head width "
                f"dim / n_heads = {self.dim} / {self.n_heads}"
            )

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def embedder_key(self) -> str:
        """The key of the patch embedder and final layer in diffusers' ModuleDicts, e.g. "2-1"."""
        return f"{self.all_patch_size[0]}-{self.all_f_patch_size[0]}"

    @classmethod
    def from_dict(cls, d: dict) -> ZImageTransformerConfig:
        """From a diffusers transformer config.json dict (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and (v is not None or k == "siglip_feat_dim")}
        for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


# --- latents <-> tokens ------------------------------------------------------------------------------


def patchify(x: mx.array, p: int) -> mx.array:
    """(B, H, W, C) NHWC latents -> (B, H/p * W/p, p*p*C) tokens, row-major over patches; each token's channels
    ordered (patch row, patch col, c), as diffusers' `_patchify_image` orders them."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: mx.array, h: int, w: int, p: int) -> mx.array:
    """The inverse of `patchify`: (B, H/p * W/p, p*p*C) -> (B, H, W, C) for latent size H x W."""
    b, _, d = x.shape
    x = x.reshape(b, h // p, w // p, p, p, d // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, d // (p * p))


def padded_length(n: int) -> int:
    """n rounded up to a multiple of SEQ_MULTI_OF."""
    return n + (-n) % SEQ_MULTI_OF


# --- blocks ------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """diffusers' Z-Image TimestepEmbedder: sinusoids of t (cos first), then Linear-SiLU-Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, out_size: int):
        super().__init__()
        # diffusers' Sequential(Linear, SiLU, Linear); the identity keeps the names `mlp.0` and `mlp.2`.
        self.mlp = [Linear(FREQUENCY_EMBEDDING_SIZE, TIME_MID_SIZE), nn.Identity(), Linear(TIME_MID_SIZE, out_size)]

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> mx.array:
        emb = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, flip_sin_to_cos=True, freq_shift=0).astype(dtype)
        return self.mlp[2](silu(self.mlp[0](emb)))


class ZImageAttention(nn.Module):
    """Self-attention without biases, RMS-normed queries and keys per head, RoPE, an optional key mask."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = [Linear(dim, dim, bias=False)]  # a list, so the name is diffusers' `to_out.0`
        if qk_norm:
            self.norm_q = nn.RMSNorm(dim // heads, eps=QK_NORM_EPS)
            self.norm_k = nn.RMSNorm(dim // heads, eps=QK_NORM_EPS)

    def __call__(self, x: mx.array, mask: mx.array | None, rope: tuple[mx.array, mx.array]) -> mx.array:
        b, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, length, self.heads, -1)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        if "norm_q" in self:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = attention(apply_rope(q, *rope), apply_rope(k, *rope), v, mask)
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class FeedForward(nn.Module):
    """The SwiGLU feed-forward: w2(silu(w1 x) * w3 x), no biases, hidden width int(dim / 3 * 8)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(silu(self.w1(x)) * self.w3(x))


class ZImageTransformerBlock(nn.Module):
    """Pre- and post-RMSNormed attention and feed-forward; with `modulation`, the timestep embedding scales the
    normed inputs (1 + scale) and gates the residuals (tanh), a projection of it per block (no shift, no SiLU)."""

    def __init__(self, dim: int, heads: int, norm_eps: float, qk_norm: bool, modulation: bool):
        super().__init__()
        self.attention = ZImageAttention(dim, heads, qk_norm)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        if modulation:
            self.adaLN_modulation = [Linear(min(dim, ADALN_EMBED_DIM), 4 * dim)]  # diffusers' Sequential(Linear)

    def __call__(
        self, x: mx.array, mask: mx.array | None, rope: tuple[mx.array, mx.array], t_emb: mx.array | None = None
    ) -> mx.array:
        if "adaLN_modulation" in self:
            if t_emb is None:
                raise ValueError("a modulated Z-Image block needs the timestep embedding")
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation[0](t_emb)[:, None].split(4, axis=-1)
            attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), mask, rope)
            x = x + mx.tanh(gate_msa) * self.attention_norm2(attn)
            ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
            return x + mx.tanh(gate_mlp) * self.ffn_norm2(ff)
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, rope))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) scaled by 1 + Linear(silu(t_emb)), then the projection to patches."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = Linear(dim, out_channels)
        # diffusers' Sequential(SiLU, Linear); the identity keeps the name `adaLN_modulation.1`.
        self.adaLN_modulation = [nn.Identity(), Linear(min(dim, ADALN_EMBED_DIM), dim)]

    def __call__(self, x: mx.array, t_emb: mx.array) -> mx.array:
        scale = 1 + self.adaLN_modulation[1](silu(t_emb))
        return self.linear(mx.fast.layer_norm(x, None, None, 1e-6) * scale[:, None])


# --- the model ---------------------------------------------------------------------------------------


class ZImageTransformer2DModel(nn.Module):
    def __init__(self, config: ZImageTransformerConfig):
        super().__init__()
        c = self.config = config
        dim, p = c.dim, c.patch_size
        self.all_x_embedder = {c.embedder_key: Linear(p * p * c.in_channels, dim)}
        self.all_final_layer = {c.embedder_key: FinalLayer(dim, p * p * c.in_channels)}
        self.noise_refiner = [
            ZImageTransformerBlock(dim, c.n_heads, c.norm_eps, c.qk_norm, modulation=True)
            for _ in range(c.n_refiner_layers)
        ]
        self.context_refiner = [
            ZImageTransformerBlock(dim, c.n_heads, c.norm_eps, c.qk_norm, modulation=False)
            for _ in range(c.n_refiner_layers)
        ]
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM))
        self.cap_embedder = [nn.RMSNorm(c.cap_feat_dim, eps=c.norm_eps), Linear(c.cap_feat_dim, dim)]
        self.x_pad_token = mx.zeros((1, dim))
        self.cap_pad_token = mx.zeros((1, dim))
        self.layers = [
            ZImageTransformerBlock(dim, c.n_heads, c.norm_eps, c.qk_norm, modulation=True) for _ in range(c.n_layers)
        ]

    def rope(self, ids: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos and sin (..., head_dim/2), float32, of integer position ids (..., 3), as diffusers' RopeEmbedder
        computes them: frequencies theta^(-2k/dim) and angles in float64, rounded to float32 once."""
        c = self.config
        for axis, limit in enumerate(c.axes_lens):
            if ids[..., axis].max() >= limit:
                raise ValueError(
                    f"Z-Image position {int(ids[..., axis].max())} on axis {axis} is beyond the model's axes_lens "
                    f"{list(c.axes_lens)}: the caption or the latent is too long"
                )
        angles = []
        for axis, dim in enumerate(c.axes_dims):
            freqs = 1.0 / c.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
            angles.append((ids[..., axis : axis + 1].astype(np.float64) * freqs).astype(np.float32))
        joined = np.concatenate(angles, axis=-1).astype(np.float64)
        return mx.array(np.cos(joined).astype(np.float32)), mx.array(np.sin(joined).astype(np.float32))

    def __call__(
        self,
        hidden_states: mx.array,
        timestep: mx.array | float,
        cap_feats: mx.array,
        cap_lengths: Sequence[int] | None = None,
    ) -> mx.array:
        """The model's output for NHWC latents (B, H, W, in_channels) at `timestep` (B,) or a scalar, given caption
        features (B, L, cap_feat_dim) of which the first `cap_lengths[i]` tokens of item i are real (None: all L).

        The convention is diffusers' model's, not the sampler's: ZImagePipeline passes t = 1 - sigma (its
        `(1000 - timestep) / 1000`) and the Qwen3 states of each prompt's real tokens, and negates the result:
        the flow velocity (noise - x0) is -output. Returns (B, H, W, in_channels) in hidden_states' dtype.
        """
        c = self.config
        p = c.patch_size
        b, h, w, _ = hidden_states.shape
        if h % p or w % p:
            raise ValueError(f"Z-Image cuts {p}x{p} latent patches: latent size {h}x{w} must be a multiple of {p}")
        lengths = [cap_feats.shape[1]] * b if cap_lengths is None else [int(n) for n in cap_lengths]
        if len(lengths) != b or not all(1 <= n <= cap_feats.shape[1] for n in lengths) or cap_feats.shape[0] != b:
            raise ValueError(
                f"Z-Image captions: {cap_feats.shape[0]} caption arrays of {cap_feats.shape[1]} tokens and lengths "
                f"{lengths} for a batch of {b} (each length in 1..{cap_feats.shape[1]})"
            )
        dtype = hidden_states.dtype
        t = mx.broadcast_to(mx.array(timestep, dtype=mx.float32).reshape(-1), (b,))
        t_emb = self.t_embedder(t * c.t_scale, dtype)

        # Image tokens, padded with the learned pad token.
        tokens = (h // p) * (w // p)
        n_pad = padded_length(tokens)
        x = self.all_x_embedder[c.embedder_key](patchify(hidden_states, p))
        if n_pad > tokens:
            x = mx.concatenate([x, mx.broadcast_to(self.x_pad_token.astype(dtype), (b, n_pad - tokens, c.dim))], axis=1)

        # Caption tokens: item i's real tokens, its pad tokens up to padded[i], then batch padding to the longest.
        padded = [padded_length(n) for n in lengths]
        longest = max(padded)
        cap = self.cap_embedder[1](self.cap_embedder[0](cap_feats[:, :longest].astype(dtype)))
        if cap.shape[1] < longest:
            cap = mx.concatenate([cap, mx.zeros((b, longest - cap.shape[1], c.dim), dtype)], axis=1)
        real = mx.arange(longest)[None, :] < mx.array(lengths)[:, None]
        cap = mx.where(real[..., None], cap, self.cap_pad_token.astype(dtype))

        # Position ids: caption j at (1 + j, 0, 0); image (r, c) at (padded[i] + 1, r, c); image pads at 0.
        cap_ids = np.zeros((longest, 3), dtype=np.int64)
        cap_ids[:, 0] = 1 + np.arange(longest)
        img_ids = np.zeros((b, n_pad, 3), dtype=np.int64)
        img_ids[:, :tokens, 0] = np.array(padded)[:, None] + 1
        rows, cols = np.meshgrid(np.arange(h // p), np.arange(w // p), indexing="ij")
        img_ids[:, :tokens, 1], img_ids[:, :tokens, 2] = rows.reshape(-1), cols.reshape(-1)
        img_cos, img_sin = self.rope(img_ids)
        cap_cos, cap_sin = self.rope(cap_ids)
        img_rope = (img_cos[:, None], img_sin[:, None])  # (B, 1, L, head_dim/2): per item, all heads
        cap_rope = (cap_cos[None, None], cap_sin[None, None])

        # Keys past an item's padded caption are batch padding, masked out (no mask when none has any).
        uneven = any(n != longest for n in padded)
        cap_mask = (mx.arange(longest)[None, :] < mx.array(padded)[:, None])[:, None, None] if uneven else None

        for block in self.noise_refiner:
            x = block(x, None, img_rope, t_emb)
        for block in self.context_refiner:
            cap = block(cap, cap_mask, cap_rope)

        joint = mx.concatenate([x, cap], axis=1)
        joint_rope = (
            mx.concatenate([img_cos[:, None], mx.broadcast_to(cap_cos, (b, 1, longest, cap_cos.shape[-1]))], axis=2),
            mx.concatenate([img_sin[:, None], mx.broadcast_to(cap_sin, (b, 1, longest, cap_sin.shape[-1]))], axis=2),
        )
        joint_mask = None if cap_mask is None else mx.concatenate([mx.ones((b, 1, 1, n_pad), mx.bool_), cap_mask], -1)
        for block in self.layers:
            joint = block(joint, joint_mask, joint_rope, t_emb)

        out = self.all_final_layer[c.embedder_key](joint[:, :tokens], t_emb)  # per token: the image's only
        return unpatchify(out, h, w, p)


ZIMAGE_TRANSFORMER = ComponentKind(
    ("ZImageTransformer2DModel",), ZImageTransformerConfig, ZImageTransformer2DModel, map_zimage_transformer_weight
)
