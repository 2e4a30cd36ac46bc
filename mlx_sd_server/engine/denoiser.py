"""The denoiser: a diffusion model seen as D(x, sigma) -> estimate of the clean latent x0.

Samplers only ever talk to a `Denoiser`; this module turns a network's raw prediction (epsilon or v)
into one, with the Karras et al. (2022) scalings for a variance-preserving model in sigma space.
Classifier-free guidance is the caller's business, inside `predict`.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import numpy as np

from .schedules import sigma_to_t

Denoiser = Callable[[mx.array, float], mx.array]
# predict(x_in, t): the network's raw output for the scaled input x_in = c_in * x at training timestep t.
Predictor = Callable[[mx.array, float], mx.array]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def model_denoiser(predict: Predictor, prediction_type: str, table: np.ndarray) -> Denoiser:
    """Wrap an epsilon- or v-predicting network as a denoiser over the training sigma `table`.

    epsilon:       D = x - sigma * eps(c_in x, t)
    v_prediction:  D = c_skip x + c_out v(c_in x, t), c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)
    with c_in = 1/sqrt(sigma^2+1) and t the (fractional) training timestep whose sigma is sigma.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")

    def denoise(x: mx.array, sigma: float) -> mx.array:
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        output = predict(x * c_in, float(sigma_to_t(sigma, table)))
        if prediction_type == "epsilon":
            return x - sigma * output
        return x * (c_in * c_in) - output * (sigma * c_in)

    return denoise
