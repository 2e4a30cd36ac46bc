"""The diffusers/torch fallback engine, loaded from our converted folders, against the MLX engine."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from api_server import live_server, request
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.job import JobError, build_job
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore
from mlx_sd_server.torch_engine import TorchPipeline
from test_controlnet_pipeline import CONTROL_STRENGTH, control_image, controlled  # noqa: F401 - fixture
from test_pipeline import (  # noqa: F401 - `models` is a fixture
    NEGATIVE, PROMPT, SIZE, TOLERANCE, ReplayNoise, diffusers_noise, make_noise, mean_abs_diff, models, ours_image,
)

STEPS = 6


@pytest.fixture(scope="module")
def engines(models, controlled):
    """(the diffusers reference pipeline, our MLX pipeline, the torch engine), all sd1 with a ControlNet."""
    pipe, _ = models("sd1")
    mlx_controlled = controlled("sd1")
    fallback = TorchPipeline.from_folder(mlx_controlled.ours.model.folder, control_net=mlx_controlled.controlnet_folder,
                                         device="cpu")
    return pipe, mlx_controlled, fallback


def job(**fields):
    images = {"control_image": control_image()} if fields.pop("controlled", False) else {}
    return build_job({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": STEPS, "cfg_scale": 6.0,
                      "sample_method": "euler", "size": f"{SIZE}x{SIZE}", **fields}, images)


def run(pipeline, job) -> tuple[list[int], list[Image.Image]]:
    """The steps done after each yielded `Step`, and the images."""
    gen, steps = pipeline.generate(job), []
    while True:
        try:
            steps.append(next(gen).index + 1)
        except StopIteration as done:
            return steps, done.value


def test_weights_come_back_exactly(engines):
    """Our mapping run backwards restores every diffusers tensor of the float32 conversion bit for bit."""
    pipe, mlx_controlled, fallback = engines
    pairs = [(fallback.base.unet, pipe.unet), (fallback.base.vae, pipe.vae),
             (fallback.base.text_encoder, pipe.text_encoder),
             (fallback.controlnet, mlx_controlled.reference.controlnet)]
    for ours, reference in pairs:
        expected = reference.state_dict()
        got = ours.state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), type(ours).__name__


@pytest.mark.parametrize("sample_method, module", [
    ("euler", "diffusers.schedulers.scheduling_euler_discrete"),
    ("euler_a", "diffusers.schedulers.scheduling_euler_ancestral_discrete"),
])
@pytest.mark.parametrize("controlled_job", [False, True], ids=["txt2img", "controlnet"])
def test_torch_engine_agrees_with_mlx(engines, sample_method, module, controlled_job):
    _, mlx_controlled, fallback = engines
    the_job = job(sample_method=sample_method, controlled=controlled_job, control_strength=CONTROL_STRENGTH)
    initial, steps = make_noise()
    mlx = ours_image(mlx_controlled.ours, the_job, ReplayNoise(initial, steps))
    with diffusers_noise(steps, module):  # the ancestral sampler's step noise, replayed into diffusers
        torch_images = ours_image(fallback, the_job, ReplayNoise(initial, []))
    diff = mean_abs_diff(torch_images, mlx)
    kind = "controlnet" if controlled_job else "txt2img"
    print(f"torch engine vs MLX, {kind} {sample_method}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("family, controlled_job", [("sd2v", False), ("sdxl", False), ("sdxl", True)])
def test_other_families_agree_with_mlx(models, controlled, family, controlled_job):
    if controlled_job:
        mlx, control_folder = controlled(family).ours, controlled(family).controlnet_folder
    else:
        mlx, control_folder = models(family)[1], None
    fallback = TorchPipeline.from_folder(mlx.model.folder, control_net=control_folder, device="cpu")
    the_job = job(controlled=controlled_job, control_strength=CONTROL_STRENGTH)
    initial, _ = make_noise()
    diff = mean_abs_diff(ours_image(fallback, the_job, ReplayNoise(initial, [])),
                         ours_image(mlx, the_job, ReplayNoise(initial, [])))
    kind = "controlnet" if controlled_job else "txt2img"
    print(f"torch engine vs MLX, {family} {kind} euler: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_yields_every_step_and_stops_when_closed(engines):
    _, _, fallback = engines
    heun = job(sample_method="heun", steps=3)
    steps, images = run(fallback, heun)
    assert steps == list(range(1, fallback.total_steps(heun) + 1)) and len(steps) == 5  # Heun: 2 * 3 - 1
    assert images[0].size == (SIZE, SIZE)
    gen = fallback.generate(heun)
    assert next(gen).index == 0
    gen.close()  # a cancelled job: the helper thread is released and joined, nothing is left running
    assert not any(t.name == "torch-engine" and t.is_alive() for t in threading.enumerate())


def test_image_i_of_a_batch_is_its_own_seed(engines):
    _, _, fallback = engines
    _, batch = run(fallback, job(n=2, seed=7, steps=2))
    _, single = run(fallback, job(n=1, seed=8, steps=2))
    assert np.array_equal(np.asarray(batch[1]), np.asarray(single[0]))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


@pytest.mark.parametrize("fields, param", [
    ({"sample_method": "ipndm"}, "sample_method"),
    ({"scheduler": "ays"}, "scheduler"),
    ({"sample_method": "euler_a", "scheduler": "karras"}, "scheduler"),
    ({"sample_method": "lcm", "scheduler": "discrete"}, "scheduler"),
])
def test_what_diffusers_cannot_do_is_a_job_error(engines, fields, param):
    _, _, fallback = engines
    with pytest.raises(JobError) as error:
        fallback.total_steps(job(**fields))
    assert error.value.param == param and error.value.status == 400


def test_what_the_torch_engine_cannot_run_is_a_400_before_queueing(models, tmp_path):
    """--engine torch narrows the model's capabilities to what diffusers can run: ipndm (no diffusers
    equivalent) is refused by the HTTP API before any job is queued, the engine not even loaded; the MLX
    engine serving the same model takes it."""
    folder = str(models("sd1")[1].model.folder)
    registry = ModelRegistry([folder], tmp_path / "models", engine="torch")
    can_do = registry.info().capabilities
    assert "ipndm" not in can_do.samplers and "euler" in can_do.samplers and not can_do.lora
    assert "ipndm" in ModelRegistry([folder], tmp_path / "models").info().capabilities.samplers
    with pytest.raises(JobError) as error:
        build_job({"prompt": PROMPT, "sample_method": "ipndm"}, capabilities=can_do)
    assert error.value.param == "sample_method" and error.value.status == 400
    with live_server(create_app(registry, FileStore(tmp_path / "files"), Settings())) as url:
        body = {"prompt": PROMPT, "sample_method": "ipndm", "steps": 2, "size": f"{SIZE}x{SIZE}"}
        reply = request(url, "POST", "/v1/images/generations", json.dumps(body).encode(),
                        {"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["param"] == "sample_method"
    assert registry.loaded() == []  # no job reached the worker, which would have loaded the model


def test_img2img_and_inpaint_run_and_keep_the_unmasked_area(engines):
    _, _, fallback = engines
    rng = np.random.default_rng(0)
    original = Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    for images in ({"image": original}, {"image": original, "mask": Image.fromarray(mask)}):
        edit = build_job({"prompt": PROMPT, "steps": 4, "strength": 0.5, "sample_method": "euler",
                          "size": f"{SIZE}x{SIZE}"}, images)
        steps, result = run(fallback, edit)
        assert len(steps) == fallback.total_steps(edit) == 2
        assert result[0].size == (SIZE, SIZE)
    outside = np.ones((SIZE, SIZE), bool)
    outside[4:60, 4:60] = False  # clear of the mask and its feathered edge
    assert np.array_equal(np.asarray(result[0])[outside], np.asarray(original)[outside])
