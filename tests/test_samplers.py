"""Samplers and the denoiser wrapper.

(a) Against the exact answer for Gaussian data ~ N(0, s^2): the denoiser is D(x, sigma) = x s^2/(s^2+sigma^2)
    and the probability-flow ODE solution is x(sigma) = x(sigma0) sqrt((s^2+sigma^2)/(s^2+sigma0^2)).
    Deterministic samplers must converge to it at their order; ancestral ones must give variance -> s^2.
(b) Against diffusers' schedulers driven by the same deterministic fake network and the same injected noise.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd_server.engine.sampling.denoiser import model_denoiser
from mlx_sd_server.engine.sampling.samplers import SAMPLERS, ancestral_step
from mlx_sd_server.engine.sampling.schedules import exponential, karras, training_sigmas
from mlx_sd_server.job import SAMPLE_METHODS
from parity import max_rel_err

TABLE = training_sigmas()


def test_samplers_cover_the_job_sample_methods():
    assert tuple(SAMPLERS) == SAMPLE_METHODS


def test_ancestral_step_splits_the_variance():
    sigma_down, sigma_up = ancestral_step(3.0, 1.5)
    assert sigma_down**2 + sigma_up**2 == pytest.approx(1.5**2)
    assert sigma_up == pytest.approx(math.sqrt(1.5**2 * (3.0**2 - 1.5**2) / 3.0**2))
    assert ancestral_step(3.0, 0.0) == (0.0, 0.0)


# Denoiser calls per step; the two-evaluation samplers take a single Euler step onto sigma 0.
EVALS_PER_STEP = {"heun": 2, "dpm2": 2, "dpm++2s_a": 2}


@pytest.mark.parametrize("name", SAMPLE_METHODS)
def test_sampler_yields_once_per_step(name):
    calls = []

    def counting_denoiser(x, sigma):
        calls.append(sigma)
        return x * 0.5

    sigmas = karras(6, TABLE)
    yielded = list(SAMPLERS[name](counting_denoiser, mx.zeros((2, 3)), sigmas, lambda: mx.ones((2, 3))))
    assert len(yielded) == 6
    assert len(calls) == 5 * EVALS_PER_STEP.get(name, 1) + 1
    assert calls[0] == sigmas[0]



@pytest.mark.parametrize("name", SAMPLE_METHODS)
def test_steps_carry_the_estimate_at_their_sigma_and_resume_from_what_is_sent(name):
    """Step i holds (i, sigma_i, x after it, D(x_i, sigma_i)); an x sent back is where the next step starts."""
    sigmas = karras(4, TABLE)
    steps = SAMPLERS[name](lambda x, sigma: x * 0.5, mx.full((2, 3), 3.0), sigmas, lambda: mx.ones((2, 3)))
    x = mx.full((2, 3), 3.0)
    for i in range(4):
        step = steps.send(None if i == 0 else x)
        assert (step.index, step.sigma) == (i, float(sigmas[i]))
        assert np.array_equal(np.array(step.denoised), np.array(x * 0.5))
        assert step.x.shape == (2, 3) and not np.array_equal(np.array(step.x), np.array(x))
        x = step.x + float(i + 1)  # what an inpainting blend would send back
    with pytest.raises(StopIteration):
        steps.send(x)

# --- (a) analytic Gaussian data --------------------------------------------------------------------------

DATA_STD = 0.8


def gaussian_denoiser(x: mx.array, sigma: float) -> mx.array:
    """The exact posterior mean E[x0 | x] for x0 ~ N(0, DATA_STD^2)."""
    return x * (DATA_STD**2 / (DATA_STD**2 + sigma**2))


def run(name: str, denoise, x: mx.array, sigmas, noise=None) -> mx.array:
    *_, last = SAMPLERS[name](denoise, x, sigmas, noise)
    return last.x


def ode_error(name: str, sigmas: np.ndarray) -> float:
    """Relative error of a sampler against the exact ODE solution from sigmas[0] to sigmas[-1] (float64)."""
    x0 = mx.array(np.linspace(-3, 3, 16), dtype=mx.float64)
    exact = np.array(x0) * math.sqrt((DATA_STD**2 + sigmas[-1] ** 2) / (DATA_STD**2 + sigmas[0] ** 2))
    return max_rel_err(run(name, gaussian_denoiser, x0, sigmas), exact)


# Grids from sigma 10 down to 0.1 or 0.5 (no final 0: that last step is a jump whose error does not shrink with n).
GRIDS = {
    "karras": lambda n: karras(n + 1, np.array([0.1, 10.0]))[:-1],
    "exponential": lambda n: exponential(n + 1, np.array([0.1, 10.0]))[:-1],
    "uniform": lambda n: np.linspace(10.0, 0.5, n + 1),  # equal steps in sigma, where AB weights are exact
}

# (sampler, grid, expected order). Multistep methods started with lower orders, on a grid whose steps
# change length, are second order whatever their nominal order; iPNDM shows its fourth order on equal
# steps. dpm++2mv2 (sd.cpp's heuristic) is second order only when steps are equal in log sigma
# (there it is exactly dpm++2m) and drops to first order on karras.
CONVERGENCE = [
    ("euler", "karras", 1),
    ("heun", "karras", 2),
    ("dpm2", "karras", 2),
    ("dpm++2m", "karras", 2),
    ("dpm++2mv2", "exponential", 2),
    ("dpm++2mv2", "karras", 1),
    ("ipndm", "karras", 2),
    ("ipndm_v", "karras", 2),
    ("ipndm", "uniform", 4),
]


@pytest.mark.parametrize("name,grid,order", CONVERGENCE)
def test_deterministic_sampler_converges_at_its_order(name, grid, order):
    steps = [32, 64, 128, 256]
    errors = [ode_error(name, GRIDS[grid](n)) for n in steps]
    fitted_order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert errors[-1] < 1e-2
    assert order - 0.25 < fitted_order < order + 0.5, (errors, fitted_order)


def test_dpmpp_2mv2_equals_2m_on_log_uniform_steps():
    sigmas = GRIDS["exponential"](12)
    x = mx.array(np.linspace(-2, 2, 8), dtype=mx.float64)
    v2, v1 = (run(name, gaussian_denoiser, x, sigmas) for name in ("dpm++2mv2", "dpm++2m"))
    assert max_rel_err(v2, v1) < 1e-12


def sample_variance(name: str, denoise, steps: int, samples: int = 40000) -> float:
    """Variance / DATA_STD^2 of `samples` independent runs from pure noise on the karras schedule."""
    mx.random.seed(1234)
    sigmas = karras(steps, TABLE)
    x = mx.random.normal((samples,), dtype=mx.float64) * math.sqrt(DATA_STD**2 + sigmas[0] ** 2)
    noise = lambda: mx.random.normal((samples,), dtype=mx.float64)  # noqa: E731
    return float(mx.var(run(name, denoise, x, sigmas, noise))) / DATA_STD**2


# With 40000 samples the variance estimate has a relative standard deviation of about 0.007.
@pytest.mark.parametrize("name,coarse,fine,tolerance", [("euler_a", 25, 400, 0.05), ("dpm++2s_a", 10, 100, 0.03)])
def test_ancestral_sampler_variance_tends_to_data_variance(name, coarse, fine, tolerance):
    coarse_deficit = 1 - sample_variance(name, gaussian_denoiser, coarse)
    fine_deficit = 1 - sample_variance(name, gaussian_denoiser, fine)
    assert abs(fine_deficit) < tolerance
    assert coarse_deficit > 2 * abs(fine_deficit)  # it converges, rather than being right by accident


def test_lcm_with_a_consistency_function_keeps_the_data_variance():
    """A consistency model maps x at sigma to its ODE endpoint, here x s/sqrt(s^2+sigma^2), so each LCM step
    turns N(0, s^2+sigma^2) into N(0, s^2+sigma'^2) exactly, at any step count. (With the posterior mean
    instead, LCM loses variance at every step: that is why it needs consistency-distilled models.)"""

    def consistency_function(x: mx.array, sigma: float) -> mx.array:
        return x * (DATA_STD / math.sqrt(DATA_STD**2 + sigma**2))

    for steps in (1, 4):
        assert abs(1 - sample_variance("lcm", consistency_function, steps)) < 0.03


# --- (b) against diffusers' schedulers --------------------------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 8, 8)
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def fake_network(xp, x_in, t: float):
    """A deterministic stand-in for a UNet: mostly "the input is noise", nonlinear, varying with t.
    (Close enough to a real denoiser that the samplers' results differ by 3-30% from one another.)"""
    return 0.9 * x_in + 0.3 * xp.sin(3 * x_in + t / 150.0)


def ours_predict(x_in: mx.array, t: float) -> mx.array:
    return fake_network(mx, x_in, t)


def draw_noises(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


def run_diffusers(scheduler, x: torch.Tensor, noises: list[torch.Tensor], monkeypatch) -> torch.Tensor:
    """The standard diffusers denoising loop with our fake network; randn_tensor replays `noises`."""
    replay = iter(noises)
    module = __import__(type(scheduler).__module__, fromlist=["randn_tensor"])
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: next(replay))
    for t in scheduler.timesteps:
        output = fake_network(torch, scheduler.scale_model_input(x, t), float(t))
        x = scheduler.step(output, t, x).prev_sample
    return x


def run_ours(name: str, prediction_type: str, x: torch.Tensor, sigmas, noises: list[torch.Tensor]) -> mx.array:
    replay = iter(noises)
    denoise = model_denoiser(ours_predict, prediction_type, TABLE)
    return run(name, denoise, mx.array(x.numpy()), [float(s) for s in sigmas], lambda: mx.array(next(replay).numpy()))


def euler_family_sigmas(steps: int) -> np.ndarray:
    """The sigmas the linspace-spaced Euler/Heun/KDPM2 schedulers step through, from EulerDiscrete."""
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.numpy()


# 10 steps puts every linspace timestep on an integer (999, 888, ...), where diffusers' linear-in-sigma
# interpolation and our log-sigma interpolation agree exactly; then any difference is the sampler's.
STEPS = 10

CASES = [
    ("euler", "EulerDiscreteScheduler", "epsilon"),
    ("euler", "EulerDiscreteScheduler", "v_prediction"),
    ("euler_a", "EulerAncestralDiscreteScheduler", "epsilon"),
    ("euler_a", "EulerAncestralDiscreteScheduler", "v_prediction"),
    ("heun", "HeunDiscreteScheduler", "epsilon"),
    ("heun", "HeunDiscreteScheduler", "v_prediction"),
    ("dpm2", "KDPM2DiscreteScheduler", "epsilon"),
    ("dpm2", "KDPM2DiscreteScheduler", "v_prediction"),
]


@pytest.mark.parametrize("name,scheduler_name,prediction_type", CASES)
def test_matches_diffusers_k_scheduler(name, scheduler_name, prediction_type, monkeypatch):
    scheduler_class = getattr(diffusers, scheduler_name)
    scheduler = scheduler_class(**SD_BETAS, timestep_spacing="linspace", prediction_type=prediction_type)
    scheduler.set_timesteps(STEPS)
    sigmas = euler_family_sigmas(STEPS)
    noises = draw_noises(STEPS, seed=1)
    x = draw_noises(1, seed=0)[0] * float(sigmas[0])
    reference = run_diffusers(scheduler, x.clone(), noises, monkeypatch)
    ours = run_ours(name, prediction_type, x, sigmas, noises)
    assert max_rel_err(ours, reference) <= 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(prediction_type, monkeypatch):
    # The k-diffusion-equivalent configuration: data prediction, second order, midpoint, final sigma 0.
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        final_sigmas_type="zero", lower_order_final=True, prediction_type=prediction_type,
    )
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas.numpy()
    x_vp = draw_noises(1, seed=0)[0]  # diffusers' DPM-Solver works on x / sqrt(sigma^2 + 1)
    reference = run_diffusers(scheduler, x_vp.clone(), [], monkeypatch)
    ours = run_ours("dpm++2m", prediction_type, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, [])
    assert max_rel_err(ours, reference) <= 1e-4


@pytest.mark.parametrize("steps", [1, 4, 6])
def test_lcm_matches_diffusers_lcm_scheduler(steps, monkeypatch):
    """LCMScheduler's boundary condition c_skip = 0.25/((10 t)^2 + 0.25) is ~1e-6 at the timesteps the
    lcm schedule visits; sd.cpp (and we) take D as is, hence an error of that order."""
    from mlx_sd_server.engine.sampling.schedules import lcm

    scheduler = diffusers.LCMScheduler(**SD_BETAS)
    scheduler.set_timesteps(steps)
    sigmas = lcm(steps, TABLE)
    noises = draw_noises(steps, seed=1)
    x_vp = draw_noises(1, seed=0)[0]  # LCMScheduler works on x / sqrt(sigma^2 + 1)
    reference = run_diffusers(scheduler, x_vp.clone(), noises, monkeypatch)
    ours = run_ours("lcm", "epsilon", x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, noises)
    assert max_rel_err(ours, reference) <= 1e-4


def test_v_prediction_denoiser_formula():
    """D = c_skip x + c_out v with c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)."""
    sigma, x, v = 2.5, mx.array([0.3, -1.2]), mx.array([0.7, 0.1])
    denoise = model_denoiser(lambda x_in, t: v, "v_prediction", TABLE)
    expected = np.array(x) / (sigma**2 + 1) - np.array(v) * sigma / math.sqrt(sigma**2 + 1)
    assert max_rel_err(denoise(x, sigma), expected) < 1e-6


def test_denoiser_feeds_scaled_input_and_training_timestep():
    seen = {}

    def predict(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return mx.zeros_like(x_in)

    sigma = float(TABLE[500])
    denoised = model_denoiser(predict, "epsilon", TABLE)(mx.array([2.0]), sigma)
    assert seen["t"] == pytest.approx(500.0, abs=1e-6)
    assert seen["x_in"].item() == pytest.approx(2.0 / math.sqrt(sigma**2 + 1), rel=1e-6)
    assert denoised.item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        model_denoiser(predict, "sample", TABLE)
