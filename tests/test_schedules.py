"""Noise schedules: shape invariants, and equality with diffusers where diffusers has the same schedule.

Comparisons of schedule *logic* use diffusers' own training table (it computes it in float32, which alone
differs from our float64 table by up to 1.3e-5 relative; that is checked separately).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mlx_sd_server.engine.families.runtime import Settings
from mlx_sd_server.engine.families.sd.family import AYS_SIGMAS, StableDiffusionFamily
from mlx_sd_server.engine.sampling.schedules import (
    SCHEDULES, ays, discrete, img2img_sigmas, lcm, make_sigmas, sgm_uniform, sigma_to_t, simple, t_to_sigma,
    training_sigmas,
)
from mlx_sd_server.job import SCHEDULERS

TABLE = training_sigmas()


def test_schedules_cover_the_job_schedulers():
    assert tuple(SCHEDULES) == SCHEDULERS


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_schedule_is_descending_and_ends_in_zero(name, steps):
    sigmas = SCHEDULES[name](steps, TABLE)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == np.float64
    assert sigmas[-1] == 0.0
    assert np.all(np.diff(sigmas) < 0)
    assert sigmas[0] <= TABLE[-1] * (1 + 1e-9)


def test_sigma_to_t_and_back():
    t = np.array([0.0, 0.25, 1.5, 498.7, 999.0])
    np.testing.assert_allclose(sigma_to_t(t_to_sigma(t, TABLE), TABLE), t, atol=1e-9)
    np.testing.assert_allclose(t_to_sigma(np.arange(1000), TABLE), TABLE, rtol=1e-12)
    assert sigma_to_t(100.0, TABLE) == 999.0 and sigma_to_t(1e-3, TABLE) == 0.0  # clamped to the table


def test_img2img_keeps_the_tail_of_the_schedule():
    sigmas = discrete(20, TABLE)
    np.testing.assert_array_equal(img2img_sigmas(sigmas, 20, 1.0), sigmas)  # the whole schedule
    np.testing.assert_array_equal(img2img_sigmas(sigmas, 20, 0.75), sigmas[5:])  # 15 steps, as diffusers
    np.testing.assert_array_equal(img2img_sigmas(sigmas, 20, 0.5), sigmas[10:])
    np.testing.assert_array_equal(img2img_sigmas(sigmas, 20, 0.0), sigmas[-1:])  # no step at all


def test_flow_img2img_keeps_a_partial_step_as_diffusers_flow_pipelines_do():
    sigmas = np.linspace(1.0, 0.0, 5)
    np.testing.assert_array_equal(img2img_sigmas(sigmas, 4, 0.6), sigmas[2:])  # SD's rule: floor(2.4) = 2 steps
    np.testing.assert_array_equal(img2img_sigmas(sigmas, 4, 0.6, flow=True), sigmas[1:])  # 4 - floor(1.6) = 3
    for strength in (0.0, 0.25, 0.5, 1.0):  # where steps * strength is whole, the rules agree
        np.testing.assert_array_equal(
            img2img_sigmas(sigmas, 4, strength, flow=True), img2img_sigmas(sigmas, 4, strength)
        )


def test_ays_stretches_the_published_levels_log_linearly():
    sd1, sdxl = np.array(AYS_SIGMAS["sd1"]), np.array(AYS_SIGMAS["sdxl"])
    np.testing.assert_allclose(ays(10, sd1)[:-1], AYS_SIGMAS["sd1"][:-1], rtol=1e-12)
    np.testing.assert_allclose(make_sigmas("ays", 10, TABLE, sdxl)[:-1], AYS_SIGMAS["sdxl"][:-1], rtol=1e-12)
    # 20 steps put a new level at the log-midpoint between each pair of published ones.
    np.testing.assert_allclose(ays(20, sd1)[:-1:2], sd1[:-1], rtol=1e-12)
    np.testing.assert_allclose(ays(20, sd1)[1::2], np.sqrt(sd1[:-1] * sd1[1:]), rtol=1e-12)


@pytest.mark.parametrize("family, levels", [("sd1", "sd1"), ("sd2", "sd1"), ("sdxl", "sdxl")])
def test_sd_family_gives_ays_its_variants_levels(family, levels):
    """SDXL has its own AYS levels; SD 2.x takes SD 1.5's (AYS publishes none for it)."""
    model = SimpleNamespace(family=family, manifest={"scheduler": {}, "prediction_type": "epsilon",
                                                     "components": {"unet": {"config": {}}}})
    settings = Settings("", "", 1, 10, "ays", 7.0, None, 512, 512, 0.9)
    sigmas = StableDiffusionFamily(model).sigmas(settings)
    np.testing.assert_allclose(sigmas[:-1], AYS_SIGMAS[levels][:-1], rtol=1e-12)


def test_sgm_uniform_and_simple():
    np.testing.assert_allclose(sgm_uniform(8, TABLE)[:-1], discrete(9, TABLE)[:-2], rtol=1e-12)
    np.testing.assert_array_equal(simple(4, TABLE)[:-1], TABLE[[999, 749, 499, 249]])
    np.testing.assert_array_equal(simple(3, TABLE)[:-1], TABLE[[999, 666, 333]])


def test_lcm_schedule_refuses_more_than_its_grid():
    with pytest.raises(ValueError):
        lcm(51, TABLE)


# --- against diffusers ---------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def diffusers_table(**config) -> np.ndarray:
    alphas_cumprod = diffusers.EulerDiscreteScheduler(**config).alphas_cumprod.double().numpy()
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


REFERENCE_TABLE = diffusers_table(**SD_BETAS)


def euler_sigmas(steps: int, **config) -> np.ndarray:
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, **config)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end,rtol", [
    ("scaled_linear", 0.00085, 0.012, 2e-5), ("linear", 0.0001, 0.02, 1e-4),
])
def test_training_table_matches_diffusers(beta_schedule, beta_start, beta_end, rtol):
    config = dict(num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule)
    np.testing.assert_allclose(training_sigmas(**config), diffusers_table(**config), rtol=rtol)


def test_sigma_to_t_matches_diffusers():
    sigmas = np.exp(np.random.default_rng(0).uniform(np.log(0.03), np.log(14.6), 64))
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS)
    reference = np.array([scheduler._sigma_to_t(s, np.log(REFERENCE_TABLE)) for s in sigmas]).ravel()
    np.testing.assert_allclose(sigma_to_t(sigmas, REFERENCE_TABLE), reference, atol=1e-9)


@pytest.mark.parametrize("steps", [2, 4, 10, 28, 334])
def test_discrete_equals_diffusers_linspace_on_integer_timesteps(steps):
    """When 999/(steps-1) is an integer every timestep is a table entry and the schedules agree exactly."""
    reference = euler_sigmas(steps, timestep_spacing="linspace")
    np.testing.assert_allclose(discrete(steps, REFERENCE_TABLE), reference, rtol=1e-6)


@pytest.mark.parametrize("steps", [3, 20, 25, 30, 50, 150])
def test_discrete_differs_from_diffusers_only_by_its_interpolation(steps):
    """Between table entries diffusers interpolates sigma linearly, we (as sd.cpp and k-diffusion) log-linearly:
    measured up to 3e-5 relative at 30 steps, 5e-4 at 150. (With 1 step diffusers uses t = 0; we use 999.)"""
    reference = euler_sigmas(steps, timestep_spacing="linspace")
    np.testing.assert_allclose(discrete(steps, REFERENCE_TABLE), reference, rtol=6e-4)


@pytest.mark.parametrize("name,config", [
    ("karras", dict(use_karras_sigmas=True)),
    ("exponential", dict(use_exponential_sigmas=True)),
    ("trailing", dict(timestep_spacing="trailing")),
])
@pytest.mark.parametrize("steps", [2, 3, 4, 7, 8, 25])
def test_schedule_equals_diffusers(name, config, steps):
    np.testing.assert_allclose(SCHEDULES[name](steps, REFERENCE_TABLE), euler_sigmas(steps, **config), rtol=1e-6)


def test_trailing_one_step_is_the_top_timestep():
    reference = euler_sigmas(1, timestep_spacing="trailing")
    np.testing.assert_allclose(SCHEDULES["trailing"](1, REFERENCE_TABLE), reference, rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 13, 50])
def test_lcm_timesteps_equal_diffusers(steps):
    scheduler = diffusers.LCMScheduler(**SD_BETAS)
    scheduler.set_timesteps(steps)
    np.testing.assert_allclose(sigma_to_t(lcm(steps, TABLE)[:-1], TABLE), scheduler.timesteps.numpy(), atol=1e-6)
