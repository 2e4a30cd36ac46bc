"""Scaled dot-product attention, fast on every MLX backend.

On Metal and CUDA `mx.fast.scaled_dot_product_attention` is a fused kernel: we call it. On the CPU it is an
unfused fallback whose softmax runs MLX's scalar exp on one thread (~3.7 s for one of SD 1.5's 4096-token
self-attentions with CFG, torch: ~1.3 s), so there the numpy kernel in cpu_kernels.py does the work
(~0.5 s; bench/attention.py).
"""

from __future__ import annotations

import mlx.core as mx

from . import cpu_kernels


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | str | None = None) -> mx.array:
    """softmax(q k^T / sqrt(head_dim) + mask) v for q (B, heads, Lq, D), k and v (B, heads, Lk, D).

    The semantics of `mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)`: `mask` is
    None, "causal", a boolean array (True = attend) or an additive array, broadcastable to (B, heads, Lq, Lk).
    The result has q's dtype.
    """
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unknown mask {mask!r}")
    if not cpu_kernels.on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
    if isinstance(mask, str):  # "causal", the only name let through above
        mask = causal_mask(q.shape[-2], k.shape[-2])
    return cpu_kernels.attention(q, k, v, mask)


def causal_mask(query_length: int, key_length: int) -> mx.array:
    """Boolean (Lq, Lk) mask; query i sees keys up to i + Lk - Lq (queries aligned to the last keys)."""
    offset = key_length - query_length
    return mx.arange(query_length)[:, None] + offset >= mx.arange(key_length)[None, :]


def attention_heads_last(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | str | None = None) -> mx.array:
    """`attention` for (B, L, heads, D) queries, keys and values (a projection's output split into heads, no
    transpose), with a (B, Lq, heads, D) result: the CPU kernel reads and writes that layout as it is."""
    if not cpu_kernels.on_cpu() or isinstance(mask, str):
        heads_first = [t.transpose(0, 2, 1, 3) for t in (q, k, v)]
        return attention(heads_first[0], heads_first[1], heads_first[2], mask).transpose(0, 2, 1, 3)
    return cpu_kernels.attention(q, k, v, mask, heads_last=True)
