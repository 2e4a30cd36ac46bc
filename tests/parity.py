"""Shared comparison helpers for parity tests against the torch references."""

from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """An MLX array, torch tensor or numpy array as float64 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error measure every parity threshold in this project uses."""
    a, b = to_numpy(ours), to_numpy(ref)
    assert a.shape == b.shape, f"shape mismatch: ours {a.shape}, reference {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def nchw_to_nhwc(x) -> np.ndarray:
    return to_numpy(x).transpose(0, 2, 3, 1)


def load_torch_weights(model, state_dict, map_weight) -> None:
    """Load a torch state dict into an MLX model through a convert/ `map_<component>_weight` function."""
    import mlx.core as mx

    model.load_weights(
        [(key, mx.array(value)) for name, tensor in state_dict.items()
         for key, value in map_weight(name, tensor.detach().float().numpy())]
    )
    mx.eval(model.parameters())
