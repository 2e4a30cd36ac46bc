"""Scaled dot-product attention, fast on every MLX backend.

On Metal and CUDA `mx.fast.scaled_dot_product_attention` is a fused kernel: we call it. On the CPU it is an
unfused fallback, and what dominates at SD's 4096-token self-attention is the softmax's exp over
batch*heads*L*L scores, which MLX computes on one thread per stream. So on the CPU we split the queries
into one chunk per core, compute each chunk's matmul-softmax-matmul on its own CPU stream, and MLX runs
the streams in parallel (bench/attention.py: ~1.8x on 2 cores, and ~1.7x faster than the fallback).
Reduced precision does not pay on the CPU (float16/bfloat16 matmul and exp are 5x slower there than
float32), so this path keeps the caller's dtype and the caller should use float32 on the CPU.
"""

from __future__ import annotations

import os
import threading

import mlx.core as mx

# Below this many query tokens a split costs more in dispatch than it saves (L=77 text attention).
MIN_QUERIES_PER_STREAM = 256
# Scores (batch x heads x queries x keys) per chunk: 32M keeps SD 1.5's 4096-token self-attention at
# ~0.4 GB of live scores (float32 softmax) instead of ~2 GB when every query is scored at once.
MAX_SCORES_PER_CHUNK = 32 * 2**20


_per_thread = threading.local()


def cpu_streams() -> tuple[mx.Stream, ...]:
    """One CPU stream per core this process may use: MLX runs each stream's ops on its own thread.

    MLX streams belong to the thread that made them, so each calling thread gets its own set.
    """
    if not hasattr(_per_thread, "streams"):
        _per_thread.streams = tuple(mx.new_stream(mx.cpu) for _ in range(len(os.sched_getaffinity(0))))
    return _per_thread.streams


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | str | None = None) -> mx.array:
    """softmax(q k^T / sqrt(head_dim) + mask) v for q (B, heads, Lq, D), k and v (B, heads, Lk, D).

    The semantics of `mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)`: `mask` is
    None, "causal", a boolean array (True = attend) or an additive array, broadcastable to (B, heads, Lq, Lk).
    """
    scale = q.shape[-1] ** -0.5
    if mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        mask = causal_mask(q.shape[-2], k.shape[-2])

    q = q * mx.array(scale, q.dtype)
    streams = cpu_streams()
    queries = q.shape[-2]
    chunk = max(-(-queries // len(streams)), MIN_QUERIES_PER_STREAM)
    # Cap each chunk's score matrix; more chunks than streams run in evaluated rounds, one per stream each.
    rows_in_budget = MAX_SCORES_PER_CHUNK // max(1, q.shape[0] * q.shape[1] * k.shape[-2])
    chunk = max(1, min(chunk, rows_in_budget))
    starts = list(range(0, queries, chunk))
    outputs = []
    for round_start in range(0, len(starts), len(streams)):
        round_outputs = []
        for stream, start in zip(streams, starts[round_start : round_start + len(streams)]):
            rows = slice(start, start + chunk)
            # A mask that broadcasts along the query axis (size 1 there) applies to every chunk whole.
            chunk_mask = mask if mask is None or mask.ndim < 2 or mask.shape[-2] == 1 else mask[..., rows, :]
            round_outputs.append(unfused_attention(q[..., rows, :], k, v, chunk_mask, stream))
        if len(starts) > len(streams):
            mx.eval(round_outputs)  # free this round's scores before the next round allocates its own
        outputs.extend(round_outputs)
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-2)


def unfused_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, stream: mx.Stream) -> mx.array:
    """softmax(q k^T + mask) v on one stream, for q already scaled."""
    scores = mx.matmul(q, k.swapaxes(-1, -2), stream=stream)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-float("inf"), scores.dtype), stream=stream)
        else:
            scores = mx.add(scores, mask.astype(scores.dtype), stream=stream)
    # precise: float16 inputs get a float32 softmax, as in the fused kernels.
    weights = mx.softmax(scores, axis=-1, precise=True, stream=stream)
    return mx.matmul(weights, v, stream=stream)


def causal_mask(query_length: int, key_length: int) -> mx.array:
    """Boolean (Lq, Lk) mask; query i sees keys up to i + Lk - Lq (queries aligned to the last keys)."""
    offset = key_length - query_length
    return mx.arange(query_length)[:, None] + offset >= mx.arange(key_length)[None, :]
