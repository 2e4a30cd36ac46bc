"""Qwen-Image-Edit against diffusers on tiny random models, with identical injected noise: the Plus pipeline
(2509/2511: "Picture i" slots, 384x384 condition images, the 2511 transformer's zero_cond_t) with one and two
input images of different shapes and true CFG, and the first edit model's pipeline with its one image. Final
images within 1/255 mean absolute difference; the conditioning within 1e-4 max relative error.

The language model reads the images' 3D RoPE positions as transformers intends; the installed diffusers passes no
mm_token_type_ids, which makes transformers 5 give it 1D ones (diffusers #14194), so the reference's text encoder
is given them here.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_qwenimage
from convert.model import convert_model
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import JobError, ModelDefaults, build_job
from parity import max_rel_err
from test_pipeline import ReplayNoise, mean_abs_diff, ours_image
from test_qwenimage_pipeline import noise, packed

PROMPT = "make the cat wear a hat"
NEGATIVE = "blurry"
TOLERANCE = 1 / 255
WIDTH, HEIGHT = 80, 64


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


@contextlib.contextmanager
def three_d_positions(pipe):
    """Give the reference's text encoder the mm_token_type_ids the pipeline leaves out (see the docstring)."""
    encoder, original = pipe.text_encoder, pipe.text_encoder.forward
    image_token = encoder.config.image_token_id

    def forward(*args, input_ids=None, **kwargs):
        kwargs.setdefault("mm_token_type_ids", (input_ids == image_token).int())
        return original(*args, input_ids=input_ids, **kwargs)

    encoder.forward = forward
    try:
        yield
    finally:
        encoder.forward = original


def converted(tmp_path_factory, name: str, plus: bool):
    src = tmp_path_factory.mktemp(f"{name}-src")
    pipe = tiny_qwenimage.make_edit_pipeline(src, plus=plus)
    dst = tmp_path_factory.mktemp(f"{name}-dst") / name
    convert_model(src, dst, dtype="float32", progress=False)
    return pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False), read_manifest(dst)


@pytest.fixture(scope="module")
def plus(tmp_path_factory):
    return converted(tmp_path_factory, "qwen-image-edit-2511-tiny", plus=True)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return converted(tmp_path_factory, "qwen-image-edit-tiny", plus=False)


def make_job(manifest: dict, images: list[Image.Image], fields: dict):
    return build_job({"prompt": PROMPT, "sample_method": "euler", "width": WIDTH, "height": HEIGHT, **fields},
                     {"image": images}, defaults=ModelDefaults(**manifest["defaults"]),
                     capabilities=capabilities(manifest))


@pytest.mark.parametrize("sizes, cfg", [([(96, 64)], 1.0), ([(96, 64), (48, 80)], 4.0)], ids=["one", "two-cfg"])
def test_edit_plus_matches_diffusers(plus, sizes, cfg):
    pipe, ours, manifest = plus
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    initial = noise(seed=len(sizes))
    extra = {"negative_prompt": NEGATIVE} if cfg > 1 else {}
    with three_d_positions(pipe):
        expected = pipe(image=images, prompt=PROMPT, true_cfg_scale=cfg, num_inference_steps=2, height=HEIGHT,
                        width=WIDTH, latents=packed(initial), output_type="np", **extra).images
    job = make_job(manifest, images, {"steps": 2, "cfg_scale": cfg, **extra})
    assert len(job.reference_images) == len(images) and job.init_image is None
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Qwen-Image-Edit-Plus, {len(images)} image(s), true CFG {cfg}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_first_edit_model_matches_diffusers(first):
    pipe, ours, manifest = first
    image = picture(96, 64, seed=5)
    initial = noise(seed=7)
    with three_d_positions(pipe):
        expected = pipe(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0,
                        num_inference_steps=2, height=HEIGHT, width=WIDTH, latents=packed(initial),
                        output_type="np").images
    job = make_job(manifest, [image], {"steps": 2, "cfg_scale": 3.0, "negative_prompt": NEGATIVE})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Qwen-Image-Edit (first model), true CFG 3: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_edit_conditioning_matches_encode_prompt(plus):
    pipe, ours, manifest = plus
    images = [picture(96, 64, seed=0), picture(48, 80, seed=1)]
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    conditions = [pipe.image_processor.resize(image, *reversed(calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)))
                  for image, (w, h) in zip(images, (image.size for image in images))]
    with torch.no_grad(), three_d_positions(pipe):
        reference, _ = pipe.encode_prompt(prompt=PROMPT, image=conditions)
    conditioning = ours.encode_prompts(make_job(manifest, images, {}), guided=False)
    error = max_rel_err(np.array(conditioning.states[0]), reference[0].numpy())
    print(f"Qwen-Image-Edit-Plus conditioning, two images: max rel err {error:.1e}")
    assert conditioning.states.shape[1] == reference.shape[1] and error <= 1e-4


def test_edit_models_edit_by_instruction(plus, first):
    for (_, _, manifest), references in ((plus, 3), (first, 1)):
        assert manifest["pipeline"]["_class_name"] in ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")
        caps = capabilities(manifest)
        assert (caps.references, caps.img2img, caps.inpainting) == (references, False, False)
    _, _, manifest = first
    with pytest.raises(JobError) as error:
        make_job(manifest, [picture(64, 64, 0), picture(64, 64, 1)], {})
    assert error.value.param == "image"
