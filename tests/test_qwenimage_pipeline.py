"""Qwen-Image pipelines against diffusers on a tiny random model, with identical injected noise.

txt2img against QwenImagePipeline (without CFG at two sizes, one not square; with true CFG and a negative prompt,
two images), img2img against QwenImageImg2ImgPipeline and inpainting against QwenImageInpaintPipeline: final
images within 1/255 mean absolute difference. Also: the conditioning against diffusers' encode_prompt (padded
across a batch, the template's tokens dropped), the schedule (shift_terminal), the defaults and capabilities.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_qwenimage
from convert.model import convert_model
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.runtime import Settings
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import JobError, ModelDefaults, build_job
from parity import max_rel_err
from PIL import Image

from test_pipeline import ReplayNoise, diffusers_noise, mean_abs_diff, ours_image, posterior_mode, sample_image

PROMPT = "a photo of a cat"
NEGATIVE = "a dog"
TOLERANCE = 1 / 255
WIDTH, HEIGHT = 80, 64  # non-square: 10x8 latents, 5x4 patches
IMG2IMG = "diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img"
INPAINT = "diffusers.pipelines.qwenimage.pipeline_qwenimage_inpaint"


SOURCE = {}  # the tiny diffusers folder the module's fixture converted


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(diffusers pipeline, our pipeline, our manifest) of a tiny Qwen-Image."""
    src = SOURCE["folder"] = tmp_path_factory.mktemp("qwenimage-src")
    pipe = tiny_qwenimage.make_pipeline(src)
    dst = tmp_path_factory.mktemp("qwenimage-dst") / "qwen-image-tiny"
    convert_model(src, dst, dtype="float32", progress=False)
    return pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False), read_manifest(dst)


def make_job(manifest: dict, fields: dict, images: dict | None = None):
    return build_job({"prompt": PROMPT, "sample_method": "euler", "width": WIDTH, "height": HEIGHT, **fields}, images,
                     defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))


def noise(n: int = 1, seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16, height // 8, width // 8)).astype(np.float32)


def packed(latents: np.ndarray) -> torch.Tensor:
    """NCHW latents as QwenImagePipeline takes `latents`: 2x2 patches as tokens, channels (c, row, col)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return torch.from_numpy(np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4)))


@pytest.mark.parametrize("width, height", [(WIDTH, HEIGHT), (64, 64)])
def test_txt2img_without_cfg_matches_diffusers(qwen, width, height):
    pipe, ours, manifest = qwen
    initial = noise(width=width, height=height)
    expected = pipe(PROMPT, num_inference_steps=4, true_cfg_scale=1.0, height=height, width=width,
                    latents=packed(initial), output_type="np").images
    job = make_job(manifest, {"steps": 4, "width": width, "height": height, "cfg_scale": 1.0})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Qwen-Image txt2img {width}x{height}, no CFG: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_txt2img_with_true_cfg_matches_diffusers(qwen):
    """cfg_scale is diffusers' true_cfg_scale (the combination rescaled to the conditional norm); two images, so
    that the [negative]*n + [prompt]*n batch (padded to the longer prompt, masked) is checked per image."""
    pipe, ours, manifest = qwen
    initial = noise(n=2, seed=1)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, num_inference_steps=3, height=HEIGHT,
                    width=WIDTH, num_images_per_prompt=2, latents=packed(initial), output_type="np").images
    job = make_job(manifest, {"steps": 3, "cfg_scale": 4.0, "negative_prompt": NEGATIVE, "n": 2})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Qwen-Image txt2img, true CFG 4 with a negative prompt, n=2: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_img2img_matches_diffusers(qwen):
    from diffusers import QwenImageImg2ImgPipeline

    pipe, ours, manifest = qwen
    reference = QwenImageImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=2)
    image = sample_image().resize((WIDTH, HEIGHT))
    with posterior_mode(IMG2IMG), diffusers_noise([initial[:, :, None]], IMG2IMG):
        expected = reference(PROMPT, image=image, strength=0.6, num_inference_steps=6, true_cfg_scale=1.0,
                             height=HEIGHT, width=WIDTH, output_type="np").images
    job = make_job(manifest, {"steps": 6, "strength": 0.6, "cfg_scale": 1.0}, {"image": image})
    assert ours.total_steps(job) == 4
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Qwen-Image img2img strength 0.6: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_inpainting_matches_diffusers(qwen):
    from diffusers import QwenImageInpaintPipeline

    pipe, ours, manifest = qwen
    reference = QwenImageInpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=3)
    image = sample_image().resize((WIDTH, HEIGHT))
    edges = np.zeros((HEIGHT, WIDTH), np.uint8)
    edges[13:45, 5:43] = 255  # off the 8-pixel grid: the mask is brought to it by nearest neighbour, not max-pooled
    mask = Image.fromarray(edges)
    with posterior_mode(INPAINT), diffusers_noise([initial[:, :, None]], INPAINT):
        expected = reference(PROMPT, image=image, mask_image=mask, strength=0.75, num_inference_steps=4,
                             true_cfg_scale=3.0, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                             output_type="np").images
    job = make_job(manifest, {"steps": 4, "strength": 0.75, "cfg_scale": 3.0, "negative_prompt": NEGATIVE},
                   {"image": image, "mask": mask})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Qwen-Image inpainting strength 0.75, true CFG 3: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_conditioning_matches_encode_prompt(qwen):
    pipe, ours, manifest = qwen
    long = "a photo of a cat on the hill by the river, " * 3
    with torch.no_grad():
        reference = [pipe.encode_prompt(text)[0][0].numpy() for text in (NEGATIVE, long)]
    conditioning = ours.encode_prompts(make_job(manifest, {"prompt": long, "negative_prompt": NEGATIVE}), guided=True)
    lengths = [int(n) for n in np.array(conditioning.mask).sum(axis=1)]
    assert lengths == [len(r) for r in reference] and lengths[0] < lengths[1]
    states = np.array(conditioning.states)
    assert not states[0, lengths[0]:].any()  # padding: zeros, as diffusers pads
    errors = [max_rel_err(states[i, :n], r) for i, (n, r) in enumerate(zip(lengths, reference))]
    print("Qwen-Image conditioning (negative, prompt): max rel err", ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) <= 1e-4


def test_schedule_matches_the_scheduler(qwen):
    """linspace sigmas, the linear mu by token count, then stretched to shift_terminal, as diffusers' scheduler."""
    pipe, ours, manifest = qwen
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    steps, tokens = 7, (HEIGHT // 16) * (WIDTH // 16)
    config = pipe.scheduler.config
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    settings = Settings.of(make_job(manifest, {"steps": steps}))
    np.testing.assert_allclose(ours.family.sigmas(settings), pipe.scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    assert manifest["scheduler"]["shift_terminal"] == 0.02
    # one step: nothing to stretch (diffusers' scheduler divides by zero there and gives NaN, a black image)
    np.testing.assert_array_equal(ours.family.sigmas(Settings.of(make_job(manifest, {"steps": 1}))), [1.0, 0.0])


def test_defaults_and_capabilities(qwen):
    _, _, manifest = qwen
    assert manifest["family"] == "qwenimage"
    assert manifest["defaults"] == {"steps": 50, "cfg_scale": 4.0, "sample_method": "euler", "scheduler": "discrete",
                                    "width": 1328, "height": 1328}
    for fields, images, param in [
        ({"width": 72}, None, "width"),  # 16: the VAE's 8 x the 2x2 patch
        ({"guidance": 3.5}, None, "guidance"),
        ({"max_sequence_length": 128}, None, "max_sequence_length"),
        ({"scheduler": "ays"}, None, "scheduler"),
        ({}, {"control_image": sample_image()}, "control_image"),
    ]:
        with pytest.raises(JobError) as error:
            make_job(manifest, fields, images)
        assert error.value.param == param, (fields, error.value)


def test_low_memory_frees_the_transformer_while_encoding(qwen, tmp_path):
    """--low-memory: the transformer's weights are given back before the prompts are encoded and read from disk
    again by the first step (a 16 GB Mac cannot hold both at 4 bits); the images are the same."""
    import gc

    import mlx.core as mx
    from mlx.utils import tree_flatten

    _, plain, manifest = qwen
    folder = plain.model.folder
    low = DiffusionPipeline(load_model(folder, dtype="float32", low_memory=True), paste_back=False)
    job = make_job(manifest, {"steps": 2, "cfg_scale": 1.0, "seed": 4})
    first = ours_image(low, job, None)
    np.testing.assert_array_equal(first, ours_image(plain, job, None))
    transformer = low.model.components["transformer"]
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(transformer.parameters()))
    gc.collect()
    before = mx.get_active_memory()
    low.model.unread_denoisers()
    gc.collect()
    freed = before - mx.get_active_memory()
    print(f"low memory: {freed} of the transformer's {weight_bytes} weight bytes freed before encoding")
    assert freed >= 0.9 * weight_bytes
    np.testing.assert_array_equal(ours_image(low, job, None), first)  # read back from disk


def test_quantized_conversion_runs_close_to_the_float_model(qwen, tmp_path):
    """--quantize 8 quantizes the transformer's and Qwen2.5-VL's linear layers (the vision tower's too where its
    widths allow) and the model still makes nearly the same image."""
    import mlx.nn as nn

    _, plain, manifest = qwen
    dst = tmp_path / "qwen-image-tiny-q8"
    convert_model(SOURCE["folder"], dst, dtype="float32", quantize=8, progress=False)
    quantized = load_model(dst, dtype="float32")
    for module in (quantized.components["transformer"], quantized.text_encoders["text_encoder"]):
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in module.named_modules())
    job = make_job(manifest, {"steps": 2, "cfg_scale": 1.0, "seed": 1})
    diff = mean_abs_diff(ours_image(DiffusionPipeline(quantized, paste_back=False), job, None),
                         ours_image(plain, job, None))
    print(f"Qwen-Image 8-bit against float32: mean abs diff {diff:.2e}")
    assert diff < 0.02
