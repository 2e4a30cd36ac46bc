"""Parameterizations: a network seen as D(x, sigma) -> estimate of the clean latent x0, and how noise is added.

Samplers only ever talk to a `Denoiser` and a `Noising`. After k-diffusion's `external.py`, there is one
wrapper per parameterization instead of branches in the pipeline:
- epsilon and v (Stable Diffusion): variance-exploding in sigma space, x = x0 + sigma * noise, with the
  Karras et al. (2022) input scaling c_in = 1/sqrt(sigma^2+1) and t(sigma) from the training table;
- flow (rectified flow: FLUX, SD3): x = (1 - sigma) * x0 + sigma * noise, sigma in [0, 1], the network
  predicts v = noise - x0 at t = sigma and D = x - sigma * v.
Both give the same probability-flow ODE dx/dsigma = (x - D)/sigma, so the deterministic samplers run
unchanged on either; only re-noising (ancestral samplers, LCM, img2img, inpainting) differs.
Classifier-free guidance is the caller's business, inside `predict` (`classifier_free_guidance` combines the
two halves of its batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_sd_server.engine.sampling.schedules import sigma_to_t

Denoiser = Callable[[mx.array, float], mx.array]
# predict(x_in, t): the network's raw output for input x_in at time t (training timestep, or sigma for flow).
Predictor = Callable[[mx.array, float], mx.array]

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


@dataclass(frozen=True)
class AncestralStep:
    """A step from sigma to sigma_next split into a deterministic move to `sigma_down`, then
    `x = x_scale * x + sigma_up * noise`."""

    sigma_down: float
    sigma_up: float
    x_scale: float = 1.0


class VarianceExploding:
    """x = x0 + sigma * noise (epsilon and v models in k-diffusion's sigma space)."""

    @staticmethod
    def add_noise(x0: mx.array, noise: mx.array, sigma: float) -> mx.array:
        return x0 + noise * sigma

    @staticmethod
    def ancestral_step(sigma: float, sigma_next: float) -> AncestralStep:
        if sigma_next == 0:
            return AncestralStep(0.0, 0.0)
        sigma_up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        return AncestralStep(math.sqrt(sigma_next**2 - sigma_up**2), sigma_up)


class RectifiedFlow:
    """x = (1 - sigma) * x0 + sigma * noise (flow models, sigma in [0, 1])."""

    @staticmethod
    def add_noise(x0: mx.array, noise: mx.array, sigma: float) -> mx.array:
        return x0 * (1.0 - sigma) + noise * sigma

    @staticmethod
    def ancestral_step(sigma: float, sigma_next: float) -> AncestralStep:
        """The rectified-flow ancestral step (eta = 1): down to sigma_next^2/sigma, then rescale the signal
        from alpha_down = 1 - sigma_down to alpha_next = 1 - sigma_next and add the missing noise."""
        if sigma_next == 0:
            return AncestralStep(0.0, 0.0)
        if sigma_next >= sigma:  # no step (x_scale would be 0/0 at sigma = 1)
            return AncestralStep(sigma_next, 0.0)
        sigma_down = sigma_next * sigma_next / sigma
        x_scale = (1.0 - sigma_next) / (1.0 - sigma_down)
        sigma_up = math.sqrt(max(sigma_next**2 - (sigma_down * x_scale) ** 2, 0.0))
        return AncestralStep(sigma_down, sigma_up, x_scale)


Noising = VarianceExploding | RectifiedFlow
NOISING: dict[str, Noising] = {
    "epsilon": VarianceExploding(),
    "v_prediction": VarianceExploding(),
    "flow": RectifiedFlow(),
}


def classifier_free_guidance(output: mx.array, scale: float) -> mx.array:
    """Classifier-free guidance over a batch of [negative]*n + [prompt]*n predictions: the prediction moved
    from the negative prompt's towards (and, for scale > 1, past) the prompt's."""
    negative, positive = mx.split(output, 2)
    return negative + scale * (positive - negative)


def model_denoiser(predict: Predictor, prediction_type: str, table: np.ndarray | None = None) -> Denoiser:
    """Wrap a network's raw prediction as a denoiser.

    epsilon:       D = x - sigma * eps(c_in x, t)
    v_prediction:  D = c_skip x + c_out v(c_in x, t), c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)
    flow:          D = x - sigma * v(x, sigma)
    with c_in = 1/sqrt(sigma^2+1) and t the (fractional) training timestep whose sigma is sigma (`table`).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")

    if prediction_type == "flow":
        return lambda x, sigma: x - sigma * predict(x, float(sigma))
    if table is None:
        raise ValueError(f"{prediction_type} prediction needs the training sigma table")

    def denoise(x: mx.array, sigma: float) -> mx.array:
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        output = predict(x * c_in, float(sigma_to_t(sigma, table)))
        if prediction_type == "epsilon":
            return x - sigma * output
        return x * (c_in * c_in) - output * (sigma * c_in)

    return denoise
