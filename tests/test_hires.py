"""The hires fix on the real tiny model: the second pass is exactly our img2img of the enlarged first image
(same seed, same noise), latent upscaling is torch's interpolate, steps are numbered across the passes, the
metadata says what A1111 writes, and what cannot be a hires job is refused before the queue."""

from __future__ import annotations

import base64
import io
import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from api_server import live_server, request, tiny_registry
from mlx_sd_server.api import create_app
from mlx_sd_server.engine.families.runtime import encode_pixels
from mlx_sd_server.engine.hires import LATENT_UPSCALE_MODES, upscale_latents
from mlx_sd_server.engine.pipeline import SeededNoise, drive
from mlx_sd_server.images import a1111_parameters
from mlx_sd_server.job import Capabilities, JobError, build_job
from mlx_sd_server.store import FileStore

BASE = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 4, "seed": 7, "width": 64, "height": 64}
HIRES = {**BASE, "hr_scale": 2, "hr_steps": 3, "hr_strength": 0.5}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return tiny_registry(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pipeline(registry):
    return registry.pipeline()


def job_of(registry, fields, images=None):
    info = registry.info()
    return build_job(
        fields,
        images,
        defaults=info.defaults,
        capabilities=info.capabilities,
        model_name=info.name,
        upscalers=registry.upscalers.names(),
    )


def run(pipeline, job):
    indices = []
    images = drive(pipeline.generate(job), lambda step: indices.append(step.index))
    return images, indices


@pytest.mark.parametrize("mode", list(LATENT_UPSCALE_MODES))
@pytest.mark.parametrize("size", [(16, 16), (24, 40), (19, 13)])
def test_latent_upscaling_is_torch_interpolate(mode, size):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 9, 11, 4)).astype(np.float32)
    ours = np.array(upscale_latents(mx.array(latents), *size, mode))
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(latents.transpose(0, 3, 1, 2)),
        size=size,
        mode=LATENT_UPSCALE_MODES[mode],
        **({} if mode.startswith("latent-nearest") else {"align_corners": False}),
    )
    assert np.abs(ours - reference.numpy().transpose(0, 2, 3, 1)).max() <= 1e-5


def test_the_second_pass_is_our_img2img_of_the_upscaled_image(registry, pipeline):
    job = job_of(registry, {**HIRES, "n": 2, "hr_upscaler": "lanczos"})
    assert (job.hr_width, job.hr_height) == (128, 128)
    images, indices = run(pipeline, job)
    assert [image.size for image in images] == [(128, 128)] * 2
    assert indices == list(range(pipeline.total_steps(job)))  # one job's steps, numbered on across passes
    first, _ = run(pipeline, job_of(registry, {**BASE, "n": 2}))
    for index, (image, seed) in enumerate(zip(images, job.seeds())):
        enlarged = registry.upscalers.upscale("lanczos", first[index], 2)
        img2img = job_of(
            registry,
            {**BASE, "seed": seed, "steps": 3, "strength": 0.5, "width": 128, "height": 128},
            {"image": enlarged},
        )
        (expected,), _ = run(pipeline, img2img)
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_latent_hires_denoises_the_interpolated_latents(registry, pipeline):
    job = job_of(registry, {**HIRES, "hr_upscaler": "latent-bicubic", "hr_scale": 1.5})
    assert (job.hr_width, job.hr_height) == (96, 96)
    (image,), _ = run(pipeline, job)
    first = job.first_pass()
    latents = drive(pipeline.sample(first, SeededNoise(first.seeds())))
    vae = pipeline.model.vae
    start = vae.to_latents(upscale_latents(vae.from_latents(latents), 12, 12, "latent-bicubic"))
    second = job.second_pass(0, None)
    (expected,) = pipeline.decode_latents(drive(pipeline.sample(second, SeededNoise([job.seed]), start)))
    assert image.size == (96, 96)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    # the first pass's latents, only enlarged, would decode to another image: the second pass ran
    assert not np.array_equal(np.asarray(image), np.asarray(pipeline.decode_latents(start)[0]))


def test_large_images_are_encoded_in_tiles(pipeline):
    """Above the untiled limit (136x136 latents here) a source image is encoded in tiles, as decoding is; how
    close tiles come to the whole is test_vae's (within diffusers' own tiling's difference)."""
    model = pipeline.model
    rng = np.random.default_rng(1)
    for side, tiled in ((1088, True), (512, False)):
        pixels = rng.random((side, side, 3)).astype(np.float32)
        x = mx.array(pixels[None] * 2 - 1)
        mean, _ = model.vae.encode_tiled(x) if tiled else model.vae.encode(x)
        assert mx.array_equal(encode_pixels(model, pixels), model.vae.to_latents(mean))


def test_metadata_says_what_a1111_writes(registry):
    job = job_of(registry, {**HIRES, "hr_prompt": "a lighthouse, detailed"})
    text = a1111_parameters(job, job.seed, "tiny")
    assert "Size: 64x64" in text  # the first pass's, as A1111 writes it
    for part in ("Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 3", "Hires upscaler: Latent"):
        assert part in text
    assert 'Hires prompt: "a lighthouse, detailed"' in text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"hr_steps": 3}, "hr_steps"),  # a hires setting without hr_scale
        ({"hr_scale": 2, "hr_upscaler": "4x-nowhere"}, "hr_upscaler"),
        ({"hr_scale": 0.5}, "hr_scale"),
        ({"hr_scale": 4, "width": 1024, "height": 1024}, "hr_scale"),  # 4096x4096: over max_pixels
        ({"hr_scale": 2, "hr_prompt": "x <lora:other:1>"}, "hr_prompt"),
    ],
)
def test_what_cannot_be_a_hires_job_is_refused(registry, fields, param):
    with pytest.raises(JobError) as refused:
        job_of(registry, {**BASE, **fields})
    assert refused.value.param == param


def test_hires_is_for_generations_on_models_with_img2img(registry):
    image = Image.new("RGB", (64, 64), "white")
    with pytest.raises(JobError, match="for generations"):
        job_of(registry, {**BASE, "hr_scale": 2}, {"image": image})
    for capabilities in (Capabilities("flux", img2img=False), Capabilities("sd1", hires=False)):
        with pytest.raises(JobError) as refused:
            build_job({**BASE, "hr_scale": 2}, capabilities=capabilities)
        assert refused.value.code == "unsupported_parameter"


def test_generations_endpoint_runs_a_hires_job(registry, tmp_path):
    with live_server(create_app(registry, FileStore(tmp_path))) as url:
        body = json.dumps({**HIRES, "response_format": "b64_json"}).encode()
        response = request(url, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        listed = request(url, "GET", "/v1/upscalers").json()["data"]
    assert {"id": "lanczos", "object": "upscaler", "arch": "lanczos", "scale": 1, "built_in": True} in listed
    assert response.status == 200, response.body
    (item,) = response.json()["data"]
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert image.size == (128, 128)
    assert "Hires upscale: 2" in image.info["parameters"]
    assert math.isfinite(item["seed"])
