"""Transformer pieces more than one family uses: adaLN modulation (FLUX.1, SD3, FLUX.2), diffusers' FeedForward
(GELU in the DiTs, GEGLU in the UNet's transformer blocks), and the rotary attention with RMS-normed queries
and keys of FLUX.1 and FLUX.2.

Parameter names are diffusers' (`linear`, `net.0.proj`, `net.2`, `to_q`, `norm_q`, `to_out.0`, ...), so the
families' weights load as they are.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.blocks.embeddings import apply_rope
from mlx_sd_server.engine.ops.activations import geglu, gelu_approx
from mlx_sd_server.engine.ops.attention import attention
from mlx_sd_server.engine.ops.layers import Linear

FLOAT16_MAX = 65504.0


def clip_float16(x: mx.array) -> mx.array:
    """diffusers clips the residual streams of float16 FLUX models to float16's range (inf -> finite)."""
    return mx.clip(x, -FLOAT16_MAX, FLOAT16_MAX) if x.dtype == mx.float16 else x


def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float = 1e-6) -> mx.array:
    """The adaLN of every DiT block: a LayerNorm without affine, scaled and shifted per sample."""
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale[:, None]) + shift[:, None]


class Modulation(nn.Module):
    """The `linear` of diffusers' AdaLayerNormZero(-Single), AdaLayerNormContinuous and Flux2Modulation: n
    vectors per sample from silu(temb), which the model computes once for all blocks."""

    def __init__(self, dim: int, n: int, bias: bool = True):
        super().__init__()
        self.linear = Linear(dim, n * dim, bias=bias)
        self.n = n

    def __call__(self, cond: mx.array) -> list[mx.array]:
        return self.linear(cond).split(self.n, axis=-1)


class GELU(nn.Module):
    """diffusers' GELU(approximate="tanh"): a projection, then the tanh GELU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.proj = Linear(dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_approx(self.proj(x))


class GEGLU(nn.Module):
    """diffusers' GEGLU: one projection to twice the width, its halves as value and (exact GELU) gate."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.proj = Linear(dim, 2 * hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return geglu(self.proj(x))


ACTIVATIONS = {"gelu-approximate": GELU, "geglu": GEGLU}  # by diffusers' activation_fn names


class FeedForward(nn.Module):
    """diffusers' FeedForward with 4x width: `activation` is its activation_fn."""

    def __init__(self, dim: int, activation: str = "gelu-approximate"):
        super().__init__()
        # diffusers' layout is [activation, Dropout, Linear]; the identity keeps the names `net.0` and `net.2`.
        self.net = [ACTIVATIONS[activation](dim, 4 * dim), nn.Identity(), Linear(4 * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x


# --- rotary attention (FLUX.1, FLUX.2, Qwen-Image) ---------------------------------------------------


def rope_attention(
    q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None = None
) -> mx.array:
    """Attention over (B, L, heads, head_dim) queries, keys and values, the queries and keys rotated by `rope`
    (`rope_angles` of the L tokens' ids): (B, L, heads * head_dim). `mask`: `attention`'s (Qwen-Image's text
    padding)."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    out = attention(apply_rope(q, *rope), apply_rope(k, *rope), v, mask)
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


class RopeAttention(nn.Module):
    """diffusers' FluxAttention / Flux2Attention: per-head RMS-normed queries and keys, rotary positions;
    `joint` adds the text stream's projections (double-stream blocks). FLUX.2's layers have no biases."""

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (Linear(dim, inner, bias=bias) for _ in range(3))
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        if joint:
            self.to_out = [Linear(inner, dim, bias=bias)]  # a list, so the name is diffusers' `to_out.0`
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, inner, bias=bias) for _ in range(3))
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
            self.to_add_out = Linear(inner, dim, bias=bias)

    def _qkv(
        self, x: mx.array, q: Linear, k: Linear, v: Linear, norm_q: nn.RMSNorm, norm_k: nn.RMSNorm
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(B, L, heads, head_dim) queries, keys and values; the norms act per head."""

        def heads(t: mx.array) -> mx.array:
            return t.reshape(*x.shape[:2], self.heads, -1)

        return norm_q(heads(q(x))), norm_k(heads(k(x))), heads(v(x))

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        """Single stream: attention over x, without an output projection (FLUX.1's single blocks fuse it with
        their MLP's)."""
        return rope_attention(*self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k), rope)

    def joint(
        self, x: mx.array, context: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """Joint: attention over [context, x] (text first, as the ids, and as `mask`'s keys); the image and the
        text outputs, each through its own projection."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        cq, ck, cv = self._qkv(
            context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
        )
        q, k, v = (mx.concatenate([a, b], axis=1) for a, b in ((cq, q), (ck, k), (cv, v)))
        out = rope_attention(q, k, v, rope, mask)
        text = context.shape[1]
        return self.to_out[0](out[:, text:]), self.to_add_out(out[:, :text])
