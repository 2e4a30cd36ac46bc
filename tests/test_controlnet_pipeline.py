"""ControlNet in the MLX pipeline against diffusers' ControlNet pipelines, with identical injected noise.

The ControlNet is saved as a lone diffusers folder, converted on its own, and attached at load time, the
way `--control-net` attaches one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_diffusers
from convert.model import convert_model
from mlx_sd_server.engine.model_io import load_model
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import build_job
from test_pipeline import (  # noqa: F401 - `models` is a fixture
    NEGATIVE, PROMPT, SIZE, TOLERANCE, ReplayNoise, diffusers_noise, make_noise, mean_abs_diff, models, ours_image,
    use_scheduler,
)

CONTROL_STRENGTH = 0.8


class Controlled(NamedTuple):
    reference: Any  # diffusers' ControlNet pipeline
    ours: DiffusionPipeline  # with the ControlNet attached
    uncontrolled: DiffusionPipeline  # the same model without it
    controlnet_folder: Path  # the converted ControlNet


def control_image() -> Image.Image:
    """A white ring on black, like an edge map."""
    y, x = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(y - SIZE / 2, x - SIZE / 3)
    return Image.fromarray(np.where(np.abs(radius - SIZE / 4) < 2, 255, 0).astype(np.uint8)).convert("RGB")


@pytest.fixture(scope="module")
def controlled(models, tmp_path_factory):
    """family -> Controlled (built lazily, shared by the module's tests)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            import diffusers

            pipe, ours = models(family)
            controlnet = tiny_diffusers.controlnet(pipe.unet)
            src = tmp_path_factory.mktemp(f"{family}-controlnet-src")
            controlnet.save_pretrained(str(src), safe_serialization=True)
            dst = tmp_path_factory.mktemp(f"{family}-controlnet-dst") / "controlnet"
            convert_model(src, dst, dtype="float32", progress=False)
            name = "StableDiffusionXLControlNetPipeline" if family == "sdxl" else "StableDiffusionControlNetPipeline"
            reference = getattr(diffusers, name).from_pipe(pipe, controlnet=controlnet)
            reference.set_progress_bar_config(disable=True)
            with_controlnet = load_model(ours.model.folder, dtype="float32", controlnet=dst)
            ours_controlled = DiffusionPipeline(with_controlnet, paste_back=False)
            cache[family] = Controlled(reference, ours_controlled, ours, dst)
        return cache[family]

    return get


def job(sample_method: str = "euler", **fields):
    return build_job({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 6, "cfg_scale": 6.0,
                      "sample_method": sample_method, "size": f"{SIZE}x{SIZE}", **fields},
                     {"control_image": control_image()})


@pytest.mark.parametrize("family, sample_method", [("sd1", "euler"), ("sd1", "euler_a"), ("sdxl", "euler")])
def test_controlnet_txt2img_matches_diffusers(controlled, family, sample_method):
    reference, ours = controlled(family).reference, controlled(family).ours
    module = use_scheduler(reference, sample_method)
    initial, steps = make_noise()
    with diffusers_noise(steps, module):
        expected = reference(PROMPT, image=control_image(), negative_prompt=NEGATIVE, num_inference_steps=6,
                             guidance_scale=6.0, controlnet_conditioning_scale=CONTROL_STRENGTH, height=SIZE,
                             width=SIZE, latents=torch.from_numpy(initial), output_type="np").images
    got = ours_image(ours, job(sample_method, control_strength=CONTROL_STRENGTH), ReplayNoise(initial, steps))
    diff = mean_abs_diff(got, expected)
    print(f"controlnet txt2img {family} {sample_method}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_zero_control_strength_reproduces_the_uncontrolled_image(controlled):
    _, ours, uncontrolled, _ = controlled("sd1")
    initial, _ = make_noise()
    plain_job = build_job({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 6, "cfg_scale": 6.0,
                           "sample_method": "euler", "size": f"{SIZE}x{SIZE}"})
    without = ours_image(uncontrolled, plain_job, ReplayNoise(initial, []))
    with_zero_control = ours_image(ours, job(control_strength=0.0), ReplayNoise(initial, []))
    assert np.array_equal(with_zero_control, without)
    with_control = ours_image(ours, job(control_strength=1.5), ReplayNoise(initial, []))
    change = mean_abs_diff(with_control, without)
    print(f"control_strength 1.5 changes the image by {change:.2e} (mean abs)")
    assert change > 2 * TOLERANCE  # so the parity test above is not passing with the control ignored


def test_canny_preprocessing_feeds_the_edge_map(controlled):
    """control_preprocess=canny on a photo-like image equals passing the canny edge map directly."""
    from mlx_sd_server.engine.canny import canny

    ours = controlled("sd1").ours
    rng = np.random.default_rng(3)
    photo = np.kron(rng.random((4, 4, 3)), np.ones((SIZE // 4, SIZE // 4, 1)))  # flat patches: clear edges
    photo_image = Image.fromarray((photo * 255).round().astype(np.uint8))
    edges = canny(np.asarray(photo_image, dtype=np.float32) / 255)
    assert edges.any()
    fields = {"prompt": PROMPT, "steps": 3, "sample_method": "euler", "size": f"{SIZE}x{SIZE}"}
    initial, _ = make_noise()
    canny_job = build_job({**fields, "control_preprocess": "canny"}, {"control_image": photo_image})
    edges_job = build_job(fields, {"control_image": Image.fromarray((edges * 255).astype(np.uint8))})
    preprocessed = ours_image(ours, canny_job, ReplayNoise(initial, []))
    direct = ours_image(ours, edges_job, ReplayNoise(initial, []))
    assert np.array_equal(preprocessed, direct)
