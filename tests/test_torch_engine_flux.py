"""The diffusers/torch fallback engine on FLUX.1, loaded from our converted tiny dev/schnell folders, against
our MLX engine with identical injected noise: final images within 1/255 mean absolute difference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import JobError, build_job
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.torch_engine import TorchPipeline
from test_flux_pipeline import (  # noqa: F401 - `flux` is a fixture
    HEIGHT, NEGATIVE, PROMPT, TOLERANCE, WIDTH, flux, make_job, noise, packed,
)
from test_pipeline import (
    ReplayNoise, diffusers_noise, mean_abs_diff, ours_image, posterior_mode, sample_image, sample_mask,
)
from test_torch_engine import run

FLUX_SCHEDULER = "diffusers.schedulers.scheduling_flow_match_euler_discrete"


@pytest.fixture(scope="module")
def engines(flux):
    """variant -> (the diffusers reference pipeline, our MLX pipeline, the torch engine, our manifest)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            pipe, mlx, manifest = flux(variant)
            cache[variant] = (pipe, mlx, TorchPipeline.from_folder(mlx.model.folder, device="cpu"), manifest)
        return cache[variant]

    return get


def compare(engines, variant: str, fields: dict, images: dict | None = None, steps: list | None = None,
            diffusers_steps: list | None = None, mlx=None) -> float:
    """Mean abs difference of the two engines' images for one job; the same noise for both."""
    _, ours, fallback, manifest = engines(variant)
    job = make_job(manifest, {"width": WIDTH, "height": HEIGHT, **fields}, images)
    initial = noise(seed=1)
    assert fallback.total_steps(job) == (mlx or ours).total_steps(job)
    expected = ours_image(mlx or ours, job, ReplayNoise(initial, steps or []))
    modules = ["diffusers.pipelines.flux.pipeline_flux_img2img", "diffusers.pipelines.flux.pipeline_flux_inpaint"]
    with posterior_mode(*modules), diffusers_noise([initial], *modules), \
            diffusers_noise(diffusers_steps or [], FLUX_SCHEDULER):  # edits draw their noise in diffusers
        got = ours_image(fallback, job, ReplayNoise(initial, []))
    return mean_abs_diff(got, expected)


def test_weights_come_back_exactly(engines):
    """T5 (its tied embedding included), transformer, CLIP and VAE equal the reference pipeline's, bit for bit."""
    pipe, _, fallback, _ = engines("dev")
    for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        expected = getattr(pipe, name).state_dict()
        got = getattr(fallback.base, name).state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    t5 = fallback.base.text_encoder_2.state_dict()
    assert torch.equal(t5["encoder.embed_tokens.weight"], t5["shared.weight"])


@pytest.mark.parametrize("variant, fields", [
    ("dev", {}),  # the manifest's guidance 3.5
    ("dev", {"guidance": 2.0}),
    ("schnell", {}),
    ("dev", {"cfg_scale": 4.0, "guidance": 2.0, "negative_prompt": NEGATIVE}),  # true CFG + distilled guidance
    ("schnell", {"cfg_scale": 3.0}),  # true CFG against the empty negative prompt
], ids=["dev", "dev-guidance2", "schnell", "dev-true-cfg", "schnell-cfg-empty-negative"])
def test_txt2img_agrees_with_mlx(engines, variant, fields):
    diff = compare(engines, variant, {"steps": 4, **fields})
    print(f"torch engine vs MLX, FLUX {variant} txt2img {fields}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_true_cfg_with_an_empty_negative_prompt_is_guided(engines):
    """cfg_scale > 1 guides against "" (FluxPipeline would skip true CFG for negative_prompt=None)."""
    _, _, fallback, manifest = engines("schnell")
    plain, guided = (ours_image(fallback, make_job(manifest, {"steps": 2, "width": WIDTH, "height": HEIGHT, **f}), None)
                     for f in ({}, {"cfg_scale": 3.0}))
    assert np.abs(plain - guided).mean() > 4 / 255


@pytest.mark.parametrize("sample_method, scheduler", [("euler", "karras"), ("euler", "exponential"),
                                                      ("lcm", "discrete")])
def test_other_samplers_agree_with_mlx(engines, sample_method, scheduler):
    """karras/exponential: FlowMatchEulerDiscreteScheduler's own respacing; lcm: its stochastic sampling, with
    the same step noise (diffusers draws it packed, and once more after the last step)."""
    steps = [noise(seed=10 + i) for i in range(3)]
    diff = compare(engines, "schnell", {"steps": 3, "sample_method": sample_method, "scheduler": scheduler},
                   steps=steps, diffusers_steps=[packed(s).numpy() for s in steps + steps[:1]])
    print(f"torch engine vs MLX, FLUX schnell {sample_method}/{scheduler}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_img2img_agrees_with_mlx(engines, variant):
    """steps * strength whole (6 * 0.5): both engines run the last 3 steps from the same noised image."""
    image = sample_image().resize((WIDTH, HEIGHT))
    diff = compare(engines, variant, {"steps": 6, "strength": 0.5}, {"image": image})
    print(f"torch engine vs MLX, FLUX {variant} img2img strength 0.5: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_inpainting_agrees_with_mlx_and_keeps_the_unmasked_pixels(engines):
    _, ours, fallback, manifest = engines("dev")
    image, mask = sample_image().resize((WIDTH, HEIGHT)), sample_mask().crop((0, 0, WIDTH, HEIGHT))
    pasting = DiffusionPipeline(ours.model)  # (the fixture's MLX pipeline leaves the paste-back out)
    diff = compare(engines, "dev", {"steps": 4, "strength": 0.75}, {"image": image, "mask": mask}, mlx=pasting)
    print(f"torch engine vs MLX, FLUX dev inpainting strength 0.75: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    job = make_job(manifest, {"steps": 2, "width": WIDTH, "height": HEIGHT}, {"image": image, "mask": mask})
    _, result = run(fallback, job)
    outside = np.ones((HEIGHT, WIDTH), bool)
    outside[4:60, 0:52] = False  # clear of the mask (16:48, 8:40) and its feathered edge
    assert np.array_equal(np.asarray(result[0])[outside], np.asarray(image)[outside])


def test_img2img_steps_follow_diffusers_flux_rule(engines):
    """diffusers' Flux pipelines run steps - int(steps - steps * strength): a fractional steps * strength
    rounds up (as ours does); strength 0 leaves no step, which they refuse."""
    _, ours, fallback, manifest = engines("schnell")
    image = sample_image().resize((WIDTH, HEIGHT))
    job = make_job(manifest, {"steps": 4, "strength": 0.6, "width": WIDTH, "height": HEIGHT}, {"image": image})
    assert (fallback.total_steps(job), ours.total_steps(job)) == (3, 3)
    steps, result = run(fallback, job)
    assert steps == [1, 2, 3] and result[0].size == (WIDTH, HEIGHT)
    with pytest.raises(JobError) as error:
        fallback.total_steps(make_job(manifest, {"steps": 4, "strength": 0.0}, {"image": image}))
    assert error.value.param == "strength"


@pytest.mark.parametrize("fields, param", [
    ({"sample_method": "euler_a"}, "sample_method"),
    ({"sample_method": "heun"}, "sample_method"),
    ({"sample_method": "dpm++2m"}, "sample_method"),
    ({"scheduler": "trailing"}, "scheduler"),
    ({"scheduler": "lcm"}, "scheduler"),
    ({"scheduler": "ays"}, "scheduler"),
])
def test_what_diffusers_cannot_do_on_flux_is_a_job_error(engines, fields, param):
    _, _, fallback, _ = engines("schnell")
    job = build_job({"prompt": PROMPT, "sample_method": "euler", "size": f"{WIDTH}x{HEIGHT}", **fields})
    with pytest.raises(JobError) as error:  # (SD's capabilities: FLUX's own would refuse these earlier)
        fallback.total_steps(job)
    assert error.value.param == param and error.value.status == 400


def test_flux_takes_no_controlnet(engines):
    _, mlx, fallback, _ = engines("schnell")
    job = build_job({"prompt": PROMPT, "size": f"{WIDTH}x{HEIGHT}", "sample_method": "euler"},
                    {"control_image": sample_image()})
    with pytest.raises(JobError) as error:
        fallback.generate(job).send(None)
    assert error.value.param == "control_image" and "FLUX" in error.value.message
    with pytest.raises(ValueError, match="FLUX"):
        TorchPipeline.from_folder(mlx.model.folder, control_net=mlx.model.folder, device="cpu")


def test_registry_serves_flux_on_the_torch_engine(engines, tmp_path):
    _, mlx, _, manifest = engines("dev")
    registry = ModelRegistry([str(mlx.model.folder)], tmp_path, engine="torch")
    pipeline = registry.pipeline()
    assert isinstance(pipeline, TorchPipeline) and type(pipeline.base).__name__ == "FluxPipeline"
    job = make_job(manifest, {"steps": 3, "n": 2, "width": WIDTH, "height": HEIGHT})
    gen, sigmas = pipeline.generate(job), []
    try:
        while True:
            step = next(gen)
            assert step.x.shape == (2, HEIGHT // 8, WIDTH // 8, 16)  # our layout, unpacked
            sigmas.append(step.sigma)
    except StopIteration as done:
        images = done.value
    assert len(sigmas) == pipeline.total_steps(job) == 3
    assert sigmas == sorted(sigmas, reverse=True) and 0 < sigmas[-1] < sigmas[0] <= 1
    assert [image.size for image in images] == [(WIDTH, HEIGHT)] * 2
