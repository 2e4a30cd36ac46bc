"""attention() against a float64 numpy reference, on the CPU path (numpy blocks over several threads).

Tolerances: float32 results are sums of ~Lk products whose rounding errors (2^-24 each) grow with
sqrt(Lk) and the exp's conditioning; 5e-6 relative is ~80 ulps, above what we see (~1e-6) and far
below any real bug (a wrong scale or mask moves outputs by >1e-2). float16/bfloat16 inputs are rounded to
that dtype before the reference sees them, so what remains is the output's rounding plus the
low-precision matmul: a few ulps of 2^-11 (float16) and 2^-8 (bfloat16).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from parity import max_rel_err

from mlx_sd_server.engine.ops import cpu_kernels
from mlx_sd_server.engine.ops.attention import attention, attention_heads_last, causal_mask

TOLERANCE = {mx.float32: 5e-6, mx.float16: 4e-3, mx.bfloat16: 3e-2}


def reference_attention(q, k, v, mask=None) -> np.ndarray:
    q, k, v = (np.asarray(x.astype(mx.float32), dtype=np.float64) for x in (q, k, v))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def random_qkv(batch, heads, query_length, key_length, head_dim, dtype=mx.float32, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((batch, heads, query_length, head_dim), key=keys[0]) * 2
    k = mx.random.normal((batch, heads, key_length, head_dim), key=keys[1]) * 2
    v = mx.random.normal((batch, heads, key_length, head_dim), key=keys[2])
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@pytest.fixture(params=[10**9, 7 * 29], ids=["one-block", "7-row-blocks"])
def block_size(request, monkeypatch):
    """Runs a test with each head's scores in one block, and in blocks of a few query rows (uneven ends)."""
    monkeypatch.setattr(cpu_kernels, "SCORES_PER_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(2, 8, 37, 37, 40), (1, 5, 53, 77, 64), (2, 2, 1, 9, 8), (1, 3, 97, 13, 40)],
                         ids=["self-odd", "cross-77", "one-query", "uneven-chunks"])
def test_matches_float64_reference(shape, block_size):
    q, k, v = random_qkv(*shape)
    assert max_rel_err(attention(q, k, v), reference_attention(q, k, v)) <= TOLERANCE[mx.float32]


def test_boolean_mask_per_query(block_size):
    q, k, v = random_qkv(2, 4, 41, 29, 16)
    mask = mx.random.uniform(shape=(2, 1, 41, 29), key=mx.random.key(1)) > 0.4
    mask = mask | (mx.arange(29) == 0)  # every query keeps one key: no empty softmax rows
    assert max_rel_err(attention(q, k, v, mask), reference_attention(q, k, v, mask)) <= TOLERANCE[mx.float32]


def test_additive_mask_broadcast_over_queries(block_size):
    q, k, v = random_qkv(2, 4, 41, 29, 16)
    mask = mx.random.normal((1, 4, 1, 29), key=mx.random.key(2)) * 3
    assert max_rel_err(attention(q, k, v, mask), reference_attention(q, k, v, mask)) <= TOLERANCE[mx.float32]


def test_causal_mask_with_more_keys_than_queries(block_size):
    q, k, v = random_qkv(1, 2, 19, 23, 8)
    expected = reference_attention(q, k, v, np.tril(np.ones((19, 23), dtype=bool), k=23 - 19))
    assert max_rel_err(attention(q, k, v, "causal"), expected) <= TOLERANCE[mx.float32]
    assert np.array_equal(np.asarray(causal_mask(2, 3)), [[True, True, False], [True, True, True]])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_reduced_precision_keeps_dtype(dtype, block_size):
    q, k, v = random_qkv(1, 2, 33, 21, 40, dtype=dtype)
    out = attention(q, k, v)
    assert out.dtype == dtype
    assert max_rel_err(out.astype(mx.float32), reference_attention(q, k, v)) <= TOLERANCE[dtype]


def test_same_result_as_mx_fast():
    q, k, v = random_qkv(2, 8, 300, 77, 40)
    mask = mx.random.normal((2, 1, 300, 77), key=mx.random.key(3))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=40**-0.5, mask=mask)
    assert max_rel_err(attention(q, k, v, mask), expected) <= TOLERANCE[mx.float32]


def test_callable_from_a_worker_thread(block_size):
    """The server's worker runs the engine off the main thread."""
    q, k, v = random_qkv(1, 2, 40, 40, 8)
    mx.eval(q, k, v)  # lazy arrays of the main thread's stream cannot be evaluated in another thread
    results = []

    def work():
        try:
            results.append(np.asarray(attention(q, k, v)))
        except Exception as error:  # re-raised below, in the test's thread
            results.append(error)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    if isinstance(results[0], Exception):
        raise results[0]
    assert max_rel_err(results[0], reference_attention(q, k, v)) <= TOLERANCE[mx.float32]


def test_unknown_mask_string_is_refused():
    q, k, v = random_qkv(1, 1, 4, 4, 8)
    with pytest.raises(ValueError):
        attention(q, k, v, "sliding")


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-kernel", "mlx"])
def test_heads_last_layout(on_cpu, block_size, monkeypatch):
    """(B, L, heads, D) in and out, as the UNet's projections give them: the same values as the heads-first
    call, for views of a projection's output (strided heads) and with a mask."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", on_cpu)
    q, k, v = random_qkv(2, 3, 37, 29, 16)
    mask = mx.random.normal((2, 1, 37, 29), key=mx.random.key(4))
    last = [t.transpose(0, 2, 1, 3) for t in (q, k, v)]
    packed = [t.reshape(2, t.shape[1], -1).reshape(t.shape) for t in last]  # contiguous, like a Linear's output
    for inputs in (last, packed):
        out = attention_heads_last(*inputs, mask)
        assert out.shape == (2, 37, 3, 16)
        expected = reference_attention(q, k, v, mask).transpose(0, 2, 1, 3)
        assert max_rel_err(out, expected) <= TOLERANCE[mx.float32]
