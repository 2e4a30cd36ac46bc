"""The ten samplers on the rectified-flow parameterization (FLUX, SD3), against Gaussian data.

Data x0 ~ N(0, s^2) per element, x = (1 - sigma) x0 + sigma n, so Var(x) = V(sigma) = (1-sigma)^2 s^2 + sigma^2,
the exact denoiser is D(x, sigma) = (1-sigma) s^2 x / V(sigma) and the probability-flow ODE dx/dsigma = (x-D)/sigma
maps x(sigma0) to x(sigma0) sqrt(V(sigma)/V(sigma0)); from sigma0 = 1 (V = 1) it ends at x(0) = s x(1).
Deterministic samplers must converge to that at their order on the FLUX schedules; the ancestral ones and lcm,
re-noising by the flow rule, must keep x on the marginal N(0, V(sigma)) after every step. Printed lines (-s)
are the fitted orders this file measures.
"""

from __future__ import annotations

import inspect
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd_server.engine.sampling.denoiser import RectifiedFlow, VarianceExploding
from mlx_sd_server.engine.sampling.samplers import SAMPLERS
from mlx_sd_server.engine.sampling.schedules import flow_sigmas, karras, training_sigmas

DATA_STD = 0.8
FLOW = RectifiedFlow()
SCHNELL = {"shift": 1.0}  # FLUX.1-schnell's scheduler config
DEV = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
       "base_shift": 0.5, "max_shift": 1.15}  # FLUX.1-dev's
TOKENS = 4096  # a 1024x1024 image: 64x64 packed latent tokens (dev's mu = 1.15)
SCHEDULES = {
    "schnell": lambda n: flow_sigmas("discrete", n, SCHNELL, TOKENS),
    "dev": lambda n: flow_sigmas("discrete", n, DEV, TOKENS),
    "karras": lambda n: flow_sigmas("karras", n, DEV, TOKENS),
    "exponential": lambda n: flow_sigmas("exponential", n, DEV, TOKENS),
}


def marginal_var(sigma: float) -> float:
    return (1 - sigma) ** 2 * DATA_STD**2 + sigma**2


def posterior_mean(x: mx.array, sigma: float) -> mx.array:
    return x * ((1 - sigma) * DATA_STD**2 / marginal_var(sigma))


def fitted_order(steps, errors) -> float:
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# --- 1. deterministic samplers: error at sigma 0 against the exact ODE solution --------------------------

ORDER_STEPS = [32, 64, 128, 256]
# Lower bounds on the order fitted over ORDER_STEPS (measured values are in the report and printed).
# - Euler on karras/exponential: sigma_min = shift(1/n) falls with n, so the log-sigma range grows like ln n
#   and the error like ln(n)/n (slope ~0.8).
# - dpm2, dpm++2m on the discrete grids (uniform in sigma before the shift): the last steps (2/n -> 1/n -> 0)
#   stay O(1) long in log sigma however large n is; there the geometric midpoint / log-sigma extrapolation
#   lose an order, adding ~ln(n)/n^2 (slopes 1.6-1.9). On dev that term has the opposite sign to the n^-2 one,
#   so dpm2's error crosses zero near n = 300 and its window slope reads high.
# - ipndm, ipndm_v: the Adams-Bashforth start (Euler, then AB2, AB3) leaves an O(h^2) error, and the flow
#   trajectory is curved at sigma 1 ((sqrt V)'' = s^2): second order, not 4. (On test_samplers.py's VE grid,
#   the start at sigma 10 is nearly straight, which hides the start-up term.)
# - dpm++2mv2 (sd.cpp's heuristic): equal to dpm++2m on exponential, ~0.6 on karras, and on the discrete grids
#   it does not converge at all (xfail below).
MIN_ORDER = {  # schnell, dev, karras, exponential
    "euler": (0.9, 0.9, 0.7, 0.7),
    "heun": (1.8, 1.8, 1.8, 1.8),
    "dpm2": (1.4, 1.8, 1.8, 1.8),
    "dpm++2m": (1.7, 1.4, 1.8, 1.8),
    "dpm++2mv2": (1.0, 1.0, 0.4, 1.8),
    "ipndm": (1.8, 1.8, 1.7, 1.7),
    "ipndm_v": (1.8, 1.8, 1.7, 1.7),
}
MV2_NOT_CONVERGENT = pytest.mark.xfail(strict=True, reason=(
    "dpm++2mv2 is inconsistent where consecutive log-sigma steps differ by O(1): its b = e^-h_d - 1 uses the "
    "mean h_d of the last two steps, not h, so a step maps x ~ D to (e^-h + 1 - e^-h_d) x. The uniform-sigma "
    "tail (3/n -> 2/n -> 1/n) has such steps for every n: the error at sigma 0 stays ~23% (s = 0.8)."))
DETERMINISTIC = [
    pytest.param(name, schedule, bound,
                 marks=MV2_NOT_CONVERGENT if name == "dpm++2mv2" and schedule in ("schnell", "dev") else ())
    for name, bounds in MIN_ORDER.items() for schedule, bound in zip(SCHEDULES, bounds)
]


def ode_error(name: str, sigmas: np.ndarray) -> float:
    """Relative error at sigma 0 of a run from sigma 1 (float64), against x(0) = x(1) sqrt(V(0)/V(1)) = s x(1)."""
    x1 = mx.array(np.linspace(-3, 3, 16), dtype=mx.float64)
    *_, last = SAMPLERS[name](posterior_mean, x1, sigmas, noising=FLOW)
    x = last.x
    exact = np.array(x1) * math.sqrt(marginal_var(sigmas[-1]) / marginal_var(sigmas[0]))
    return float(np.abs(np.array(x) - exact).max() / np.abs(exact).max())


@pytest.mark.parametrize("name,schedule,min_order", DETERMINISTIC)
def test_deterministic_sampler_converges_on_flow_schedule(name, schedule, min_order):
    errors = [ode_error(name, SCHEDULES[schedule](n)) for n in ORDER_STEPS]
    order, local = fitted_order(ORDER_STEPS, errors), -np.diff(np.log2(errors))
    print(f"\n[order] {name:9s} {schedule:11s} fitted {order:5.2f}  local {np.round(local, 2)}  "
          f"err@{ORDER_STEPS[-1]} {errors[-1]:.1e}", end="")
    assert errors[-1] < 1e-2 and order > min_order, (errors, order)


# --- 2. ancestral samplers and lcm: the flow marginal after every step -----------------------------------

def exact_variances(name, sigmas, denoise=posterior_mean, noising=FLOW) -> np.ndarray:
    """Var(x) after every step, exactly. Gaussian data make every sampler linear in x and in the noise, so x is
    carried as its coefficients on independent standard normals: x(sigma0) on e_0, the k-th noise() on e_k,
    and Var(x) = sum of squared coefficients."""
    basis = np.eye(len(sigmas))
    draws = iter(basis[1:])
    x = mx.array(basis[0] * math.sqrt(marginal_var(sigmas[0])), dtype=mx.float64)
    noise = lambda: mx.array(next(draws), dtype=mx.float64)  # noqa: E731
    steps = SAMPLERS[name](denoise, x, sigmas, noise, noising=noising)
    return np.array([float(mx.sum(step.x * step.x)) for step in steps])


def marginal_error(variances, sigmas) -> float:
    """max over steps of |Var(x_{i+1}) / V(sigma_{i+1}) - 1| (the last, at sigma 0, against s^2)."""
    return float(np.abs(variances / [marginal_var(s) for s in sigmas[1:]] - 1).max())


@pytest.mark.parametrize("schedule", ["schnell", "dev", "karras"])
def test_euler_a_with_exact_deterministic_move_stays_on_the_marginal(schedule):
    """With a denoiser that makes euler_a's Euler move to sigma_down exact, what is left is the flow re-noising,
    which must land exactly on N(0, V(sigma_next)) at every step, for any step count."""
    sigmas = SCHEDULES[schedule](5)
    down = {s: FLOW.ancestral_step(s, s_next).sigma_down for s, s_next in zip(sigmas[:-1], sigmas[1:])}

    def oracle(x, sigma):  # Euler to sigma_down: (sd/s) x + (1 - sd/s) D = x sqrt(V(sd)/V(s))
        ratio, gain = down[sigma] / sigma, math.sqrt(marginal_var(down[sigma]) / marginal_var(sigma))
        return x * ((gain - ratio) / (1 - ratio))

    assert marginal_error(exact_variances("euler_a", sigmas, oracle), sigmas) < 1e-12


# (sampler, coarse steps, fine steps, tolerance at fine, lower bound on the fitted order of the marginal error)
ANCESTRAL = [("euler_a", 32, 256, 0.05, 0.6), ("dpm++2s_a", 16, 64, 0.02, 1.3)]


@pytest.mark.parametrize("schedule", ["schnell", "dev", "karras"])
@pytest.mark.parametrize("name,coarse,fine,tolerance,min_order", ANCESTRAL)
def test_ancestral_sampler_keeps_the_flow_marginal(name, coarse, fine, tolerance, min_order, schedule):
    steps, errors = [coarse * 2**k for k in range(int(math.log2(fine // coarse)) + 1)], []
    for n in steps:
        sigmas = SCHEDULES[schedule](n)
        errors.append(marginal_error(variances := exact_variances(name, sigmas), sigmas))
    order = fitted_order(steps, errors)
    print(f"\n[variance] {name:9s} {schedule:8s} max|Var/V-1| {np.round(errors, 4)} at {steps}, fitted order "
          f"{order:.2f}, final Var/s^2 at {fine}: {variances[-1] / DATA_STD**2:.4f}", end="")
    assert errors[-1] < tolerance and order > min_order
    # The same sampler re-noising by the variance-exploding rule on these sigmas is far off the flow marginal.
    assert abs(exact_variances(name, sigmas, noising=VarianceExploding())[-1] / DATA_STD**2 - 1) > 0.5


@pytest.mark.parametrize("name,schedule,steps", [("euler_a", "schnell", 256), ("dpm++2s_a", "dev", 64)])
def test_ancestral_sampler_variance_with_random_noise(name, schedule, steps, samples=20000):
    """20000 independent elements with seeded noise: sample variance within a few percent of s^2
    (its relative standard deviation is ~0.01) and of the exact variance."""
    mx.random.seed(7)
    sigmas = SCHEDULES[schedule](steps)
    x = mx.random.normal((samples,), dtype=mx.float64)  # V(1) = 1
    noise = lambda: mx.random.normal((samples,), dtype=mx.float64)  # noqa: E731
    *_, last = SAMPLERS[name](posterior_mean, x, sigmas, noise, noising=FLOW)
    x = last.x
    ratio = float(mx.var(x)) / DATA_STD**2
    print(f"\n[sampled] {name} {schedule} {steps} steps: Var/s^2 = {ratio:.4f}", end="")
    assert abs(ratio - 1) < 0.05
    assert abs(ratio / (exact_variances(name, sigmas)[-1] / DATA_STD**2) - 1) < 0.04


@pytest.mark.parametrize("schedule", ["schnell", "dev", "karras"])
def test_lcm_with_a_consistency_function_is_exact_on_the_flow_marginal(schedule):
    """A consistency function maps x at sigma to its ODE endpoint, x s/sqrt(V(sigma)); LCM then re-noises by
    the flow rule, (1-sigma') x0 + sigma' n, so every step lands exactly on N(0, V(sigma')) and the sample on
    N(0, s^2), at any step count. (With the posterior mean as D, LCM loses variance at every step, since
    Var(D) < (1-sigma)^2 s^2: its final variance is 0.31 s^2 at 4 steps, 0.48 s^2 at 128 on schnell.)"""

    def consistency_function(x, sigma):
        return x * (DATA_STD / math.sqrt(marginal_var(sigma)))

    for steps in (1, 2, 4, 8):
        sigmas = SCHEDULES[schedule](steps)
        assert marginal_error(exact_variances("lcm", sigmas, consistency_function), sigmas) < 1e-12
    # The same check, sampled: 20000 elements through 4 steps.
    mx.random.seed(3)
    noise = lambda: mx.random.normal((20000,), dtype=mx.float64)  # noqa: E731
    *_, last = SAMPLERS["lcm"](consistency_function, noise(), SCHEDULES[schedule](4), noise, noising=FLOW)
    x = last.x
    assert abs(float(mx.var(x)) / DATA_STD**2 - 1) < 0.04


# --- 3. RectifiedFlow.ancestral_step --------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 0.9, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("fraction", [0.999, 0.8, 0.5, 0.1, 1e-3])
def test_flow_ancestral_step_renoises_onto_the_marginal(sigma, fraction):
    """x on the marginal at sigma_down (signal 1-sigma_down, noise sigma_down), then x_scale x + sigma_up N:
    signal coefficient 1-sigma_next and noise std sigma_next, exactly."""
    sigma_next = sigma * fraction
    step = FLOW.ancestral_step(sigma, sigma_next)
    assert step.sigma_down == pytest.approx(sigma_next**2 / sigma, rel=1e-14)  # eta = 1
    assert 0 <= step.sigma_down <= sigma_next and step.sigma_up >= 0
    assert (1 - step.sigma_down) * step.x_scale == pytest.approx(1 - sigma_next, rel=1e-14, abs=1e-15)
    assert math.hypot(step.sigma_down * step.x_scale, step.sigma_up) == pytest.approx(sigma_next, rel=1e-13)


def test_flow_ancestral_step_to_zero_and_add_noise():
    assert tuple(vars(FLOW.ancestral_step(0.3, 0.0)).values()) == (0.0, 0.0, 1.0)
    x0, n = mx.array([2.0, -1.0]), mx.array([0.5, 3.0])
    np.testing.assert_allclose(np.array(FLOW.add_noise(x0, n, 0.25)), [1.625, 0.0], rtol=1e-6, atol=1e-7)


# --- 4. variance-exploding noising stays the default, unchanged -----------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_variance_exploding_is_the_default_noising(name):
    assert isinstance(inspect.signature(SAMPLERS[name]).parameters["noising"].default, VarianceExploding)


@pytest.mark.parametrize("name", ["euler_a", "dpm++2s_a", "lcm"])
def test_default_noising_matches_explicit_variance_exploding(name):
    sigmas = karras(8, training_sigmas())
    x = mx.array(np.linspace(-2, 2, 8) * sigmas[0], dtype=mx.float64)
    noises = [mx.array(np.cos(np.arange(8) * (k + 1)), dtype=mx.float64) for k in range(8)]

    def ve_denoiser(x, sigma):
        return x * (DATA_STD**2 / (DATA_STD**2 + sigma**2))

    default, explicit = (list(SAMPLERS[name](ve_denoiser, x, sigmas, iter(noises).__next__, **kwargs))[-1].x
                         for kwargs in ({}, {"noising": VarianceExploding()}))
    assert np.array_equal(np.array(default), np.array(explicit))
    if name == "euler_a":  # and the pre-flow euler_a, written out from ../shared/samplers.md
        ref = np.array(x)
        for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            up = min(s_next, math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)) if s_next > 0 else 0.0
            down = math.sqrt(s_next**2 - up**2)
            ref = ref + (ref - ref * DATA_STD**2 / (DATA_STD**2 + s**2)) / s * (down - s)
            ref = ref + np.array(noises[i]) * up if s_next > 0 else ref
        np.testing.assert_allclose(np.array(default), ref, rtol=1e-12, atol=1e-12)
