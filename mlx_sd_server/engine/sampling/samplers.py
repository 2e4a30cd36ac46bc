"""The ten samplers of stable-diffusion.cpp, as plain generator functions in k-diffusion's style.

Each sampler walks a descending sigma list (ending in 0) with a denoiser D(x, sigma) -> x0 estimate and
yields a `Step` after every step (x after it, and D at the sigma it started from, as k-diffusion's callback
gets them), so the caller can evaluate MLX's lazy graph once per step, report progress, stream previews and
cancel; the last step's x is the sample. A caller may `send()` back a modified x to continue from
(inpainting re-imposes the known region after every step). Ancestral samplers (euler_a,
dpm++2s_a, lcm) draw standard normal noise shaped like x from `noise()`, which the pipeline backs with
the job's seeded RNG, and re-noise by the model's `noising` rule (`denoiser.py`: variance-exploding for
epsilon/v models, rectified flow for flow models; the deterministic samplers need neither, the ODE is the
same). Notation as in k-diffusion's sampling.py: d = (x - D)/sigma is the ODE derivative dx/dsigma, and
t = -ln sigma the log-SNR-like time DPM-Solver++ steps in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlx_sd_server.engine.sampling.denoiser import Denoiser, Noising, VarianceExploding


@dataclass(frozen=True)
class Step:
    """One finished denoising step: what progress, previews, partial images and cancellation read."""

    index: int  # 0-based; index + 1 steps are done
    sigma: float  # the noise level the step started from
    x: mx.array  # the latents after the step
    denoised: mx.array | None  # the model's estimate of the clean latents at `sigma` (None: not known)


NoiseFn = Callable[[], mx.array]
# Yields a Step per step; a value sent back is the x to continue from (None: the step's own).
Steps = Generator[Step, mx.array | None, None]
Sampler = Callable[..., Steps]


def to_d(x: mx.array, sigma: float, denoised: mx.array) -> mx.array:
    """The probability-flow ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


VE = VarianceExploding()


def ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of the variance-exploding ancestral split of a step to sigma_next."""
    step = VE.ancestral_step(sigma, sigma_next)
    return step.sigma_down, step.sigma_up


def resume(x: mx.array, sent: mx.array | None) -> mx.array:
    """The x to continue from: what the caller sent back into the generator, else our own."""
    return x if sent is None else sent


def _noise_fn(x: mx.array, noise: NoiseFn | None) -> NoiseFn:
    return noise if noise is not None else (lambda: mx.random.normal(x.shape, dtype=x.dtype))


def _steps(sigmas: Sequence[float]) -> Iterator[tuple[int, float, float]]:
    """(i, sigma_i, sigma_{i+1}) as python floats."""
    sigmas = [float(s) for s in sigmas]
    return ((i, sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 1))


def sample_euler(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """Euler's method on the probability-flow ODE (first order)."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        x = resume(x, (yield Step(i, sigma, x, denoised)))


def sample_euler_a(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to sigma_next."""
    noise = _noise_fn(x, noise)
    for i, sigma, sigma_next in _steps(sigmas):
        split = noising.ancestral_step(sigma, sigma_next)
        denoised = denoise(x, sigma)
        x = x + to_d(x, sigma, denoised) * (split.sigma_down - sigma)
        if sigma_next > 0:
            x = split.x_scale * x + noise() * split.sigma_up
        x = resume(x, (yield Step(i, sigma, x, denoised)))


def sample_heun(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """Heun's method (second order; the final step to sigma 0 is plain Euler)."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))
            x = x + (d + d_next) * (dt / 2)
        x = resume(x, (yield Step(i, sigma, x, denoised)))


def sample_dpm2(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """DPM-Solver-2 (Karras et al.'s variant): the midpoint method with the midpoint at the geometric mean sigma."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_next)
            x_mid = x + d * (sigma_mid - sigma)
            x = x + to_d(x_mid, sigma_mid, denoise(x_mid, sigma_mid)) * (sigma_next - sigma)
        x = resume(x, (yield Step(i, sigma, x, denoised)))


def sample_dpmpp_2s_a(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """Ancestral DPM-Solver++(2S): a two-stage exponential-integrator step down to sigma_down, then noise."""
    noise = _noise_fn(x, noise)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        split = noising.ancestral_step(sigma, sigma_next)
        sigma_down = split.sigma_down
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = math.log(sigma / sigma_down)  # t(sigma_down) - t(sigma), t = -ln sigma
            sigma_mid = sigma * math.exp(-h / 2)
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoise(x_mid, sigma_mid)
        if sigma_next > 0:
            x = split.x_scale * x + noise() * split.sigma_up
        x = resume(x, (yield Step(i, sigma, x, denoised)))


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
    v2: bool = False,
) -> Steps:
    """DPM-Solver++(2M): second-order multistep, extrapolating D linearly in t = -ln sigma.

    With v2 (stable-diffusion.cpp's dpm++2mv2, a heuristic from A1111 discussion #8457), the multistep
    update uses the ratio of the longer to the shorter of the last two steps and, in the D coefficient,
    their mean length. It equals dpm++2m when steps are equal in log sigma (the exponential schedule) and
    is only first order otherwise (tests/test_samplers.py measures both).
    """
    sigma_list = [float(s) for s in sigmas]
    previous = None  # D at the previous step
    for i, sigma, sigma_next in _steps(sigma_list):
        denoised = denoise(x, sigma)
        ratio = sigma_next / sigma
        if previous is None or sigma_next == 0:  # first order: x = ratio*x - (e^-h - 1) D, e^-h = ratio
            x = ratio * x + (1 - ratio) * denoised
        else:
            h = math.log(sigma / sigma_next)
            h_last = math.log(sigma_list[i - 1] / sigma)
            if v2:
                h_min, h_max = min(h_last, h), max(h_last, h)
                r, h_eff = h_max / h_min, (h_max + h_min) / 2
            else:
                r, h_eff = h_last / h, h
            extrapolated = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = ratio * x - math.expm1(-h_eff) * extrapolated
        previous = denoised
        x = resume(x, (yield Step(i, sigma, x, denoised)))


def sample_dpmpp_2mv2(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """DPM-Solver++(2M) with stable-diffusion.cpp's "v2" step-size rule (see sample_dpmpp_2m)."""
    yield from sample_dpmpp_2m(denoise, x, sigmas, noise, noising=noising, v2=True)


# Adams-Bashforth weights for d, d_-1, d_-2, d_-3, by order (equal step lengths assumed).
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_ipndm(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
    variable_step: bool = False,
) -> Steps:
    """Improved PNDM: Adams-Bashforth on d in sigma, with up to three past derivatives (order up to 4).

    With variable_step (ipndm_v), the second-order step uses the exact variable-step Adams-Bashforth
    weights; the third and fourth orders keep the equal-step weights, as stable-diffusion.cpp does.
    """
    sigma_list = [float(s) for s in sigmas]
    history: list[mx.array] = []  # past derivatives, newest last
    for i, sigma, sigma_next in _steps(sigma_list):
        denoised = denoise(x, sigma)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if variable_step and len(history) == 1:
            step_ratio = dt / (sigma - sigma_list[i - 1])
            slope = ((2 + step_ratio) * d - step_ratio * history[-1]) / 2
        else:
            weights = ADAMS_BASHFORTH[len(history)]
            terms = [w * di for w, di in zip(weights, [d, *reversed(history)])]
            slope = sum(terms[1:], terms[0])
        x = x + slope * dt
        history = (history + [d])[-3:]
        x = resume(x, (yield Step(i, sigma, x, denoised)))


def sample_ipndm_v(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """iPNDM with a variable-step second order (see sample_ipndm)."""
    yield from sample_ipndm(denoise, x, sigmas, noise, noising=noising, variable_step=True)


def sample_lcm(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    *,
    noising: Noising = VE,
) -> Steps:
    """Latent Consistency Model sampling: jump to the x0 estimate, then re-noise to the next sigma."""
    noise = _noise_fn(x, noise)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        x = noising.add_noise(denoised, noise(), sigma_next) if sigma_next > 0 else denoised
        x = resume(x, (yield Step(i, sigma, x, denoised)))


SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "dpm++2s_a": sample_dpmpp_2s_a,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++2mv2": sample_dpmpp_2mv2,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "lcm": sample_lcm,
}
SAMPLE_METHODS = tuple(SAMPLERS)  # the `sample_method` names (stable-diffusion.cpp's)
# dpm++2mv2's step rule does not converge on flow schedules (their last steps, 3/n -> 2/n -> 1/n, always differ
# in log length): ~22% error at any step count (tests/test_flow_samplers.py). The rest converge.
FLOW_SAMPLERS = tuple(name for name in SAMPLERS if name != "dpm++2mv2")
