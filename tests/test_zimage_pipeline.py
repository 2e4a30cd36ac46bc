"""Z-Image pipelines against diffusers on a tiny random model, with identical injected noise.

txt2img against ZImagePipeline (Turbo-like without CFG at two sizes, one not square; with CFG and a negative
prompt, two images), img2img against ZImageImg2ImgPipeline and inpainting against ZImageInpaintPipeline: final
images within 1/255 mean absolute difference. Also: the conditioning against diffusers' encode_prompt, the
variants' defaults, the capabilities enforced before a job is queued, emphasis, and the refusal of a lone
transformer file without its other files. Single and GGUF files: test_zimage_files.py; the torch engine:
test_torch_engine_zimage_flux2.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_zimage
from convert.model import convert_model
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.engine.source import CheckpointError
from mlx_sd_server.job import JobError, ModelDefaults, build_job
from parity import max_rel_err
from test_pipeline import ReplayNoise, diffusers_noise, mean_abs_diff, ours_image, posterior_mode, sample_image, sample_mask

PROMPT = "a photo of a cat"
NEGATIVE = "a dog"
TOLERANCE = 1 / 255
WIDTH, HEIGHT = 80, 64  # non-square: 10x8 latents, 5x4 patches (padded to 32 image tokens)
IMG2IMG = "diffusers.pipelines.z_image.pipeline_z_image_img2img"
INPAINT = "diffusers.pipelines.z_image.pipeline_z_image_inpaint"


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    """(diffusers pipeline, our pipeline, our manifest, the converted folder) of a tiny Z-Image named as Turbo."""
    src = tmp_path_factory.mktemp("zimage-src")
    pipe = tiny_zimage.make_pipeline(src)
    dst = tmp_path_factory.mktemp("zimage-dst") / "z-image-turbo-tiny"
    convert_model(src, dst, dtype="float32", progress=False)
    return pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False), read_manifest(dst), dst


def make_job(manifest: dict, fields: dict, images: dict | None = None):
    return build_job({"prompt": PROMPT, "sample_method": "euler", "width": WIDTH, "height": HEIGHT, **fields}, images,
                     defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))


def noise(n: int = 1, seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16, height // 8, width // 8)).astype(np.float32)


@pytest.mark.parametrize("width, height", [(WIDTH, HEIGHT), (64, 64)])
def test_txt2img_without_cfg_matches_diffusers(zimage, width, height):
    """Turbo's way: no CFG (diffusers' guidance_scale 0 is our cfg_scale 1, the Turbo default)."""
    pipe, ours, manifest, _ = zimage
    initial = noise(width=width, height=height)
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, height=height, width=width,
                    latents=torch.from_numpy(initial), output_type="np").images
    job = make_job(manifest, {"steps": 4, "width": width, "height": height})
    assert job.cfg_scale == 1.0  # the Turbo variant's default
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Z-Image txt2img {width}x{height}, no CFG: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_txt2img_with_cfg_and_negative_prompt_matches_diffusers(zimage):
    """cfg_scale s is diffusers' guidance_scale s - 1: pos + (s-1)(pos - neg) = neg + s(pos - neg). Two images, so
    that the [negative]*n + [prompt]*n batch is checked against diffusers' per-image pairing."""
    pipe, ours, manifest, _ = zimage
    initial = noise(n=2, seed=1)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=3.0, height=HEIGHT,
                    width=WIDTH, num_images_per_prompt=2, latents=torch.from_numpy(initial), output_type="np").images
    job = make_job(manifest, {"steps": 3, "cfg_scale": 4.0, "negative_prompt": NEGATIVE, "n": 2})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Z-Image txt2img, cfg_scale 4 (guidance_scale 3) with a negative prompt, n=2: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_img2img_matches_diffusers(zimage):
    """The flow pipelines' rule for strength (6 steps at 0.6 run 4, not SD's floor(3.6) = 3), the encoded image
    noised as (1 - s) x0 + s noise."""
    from diffusers import ZImageImg2ImgPipeline

    pipe, ours, manifest, _ = zimage
    reference = ZImageImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=2)
    image = sample_image().resize((WIDTH, HEIGHT))
    with posterior_mode(IMG2IMG), diffusers_noise([initial], IMG2IMG):
        expected = reference(PROMPT, image=image, strength=0.6, num_inference_steps=6, guidance_scale=0.0,
                             height=HEIGHT, width=WIDTH, output_type="np").images
    job = make_job(manifest, {"steps": 6, "strength": 0.6}, {"image": image})
    assert ours.total_steps(job) == 4
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Z-Image img2img strength 0.6: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_inpainting_matches_diffusers(zimage):
    from diffusers import ZImageInpaintPipeline

    pipe, ours, manifest, _ = zimage
    reference = ZImageInpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=3)
    image, mask = sample_image().resize((WIDTH, HEIGHT)), sample_mask().crop((0, 0, WIDTH, HEIGHT))  # black beyond
    with posterior_mode(INPAINT), diffusers_noise([initial], INPAINT):
        expected = reference(PROMPT, image=image, mask_image=mask, strength=0.75, num_inference_steps=4,
                             guidance_scale=2.0, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                             output_type="np").images
    job = make_job(manifest, {"steps": 4, "strength": 0.75, "cfg_scale": 3.0, "negative_prompt": NEGATIVE},
                   {"image": image, "mask": mask})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Z-Image inpainting strength 0.75, cfg_scale 3: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("sample_method", ["euler_a", "heun", "dpm++2m", "lcm"])
def test_other_samplers_run_on_zimage(zimage, sample_method):
    _, ours, manifest, _ = zimage
    job = make_job(manifest, {"steps": 2, "sample_method": sample_method, "cfg_scale": 2.0, "n": 2})
    images = ours_image(ours, job, None)
    assert images.shape == (2, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


def test_conditioning_matches_encode_prompt(zimage):
    """Qwen3's second-to-last states of each prompt's real tokens, as diffusers' encode_prompt gives them (there
    padded to 512 tokens, here to the longer prompt of the batch: causal attention makes them the same)."""
    pipe, ours, manifest, _ = zimage
    long = "a photo of a cat on the hill by the river, " * 3
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(long, do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    conditioning = ours.encode_prompts(make_job(manifest, {"prompt": long, "negative_prompt": NEGATIVE}), guided=True)
    assert conditioning.lengths == [len(negative[0]), len(positive[0])]
    errors = [max_rel_err(conditioning.states[i, :n], reference[0])
              for i, (n, reference) in enumerate(zip(conditioning.lengths, (negative, positive)))]
    print("Z-Image conditioning (negative, prompt): max rel err", ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) <= 1e-4


def test_variants_and_capabilities(zimage, tmp_path):
    from mlx_sd_server.engine.families.zimage.spec import variant_of

    _, _, manifest, _ = zimage
    assert manifest["family"] == "zimage" and manifest["scheduler"]["shift"] == 3.0
    assert manifest["defaults"] == {"steps": 8, "cfg_scale": 1.0, "sample_method": "euler", "scheduler": "discrete",
                                    "width": 1024, "height": 1024}
    base = variant_of("zimage", "flow", {}, "Z-Image")
    assert (base.name, base.defaults.steps, base.defaults.cfg_scale) == ("base", 50, 6.0)
    for fields, images, param in [
        ({"width": 72}, None, "width"),  # 16: the VAE's 8 x the 2x2 patch
        ({"guidance": 3.5}, None, "guidance"),  # no distilled guidance embedding
        ({"max_sequence_length": 128}, None, "max_sequence_length"),  # T5's field
        ({"scheduler": "ays"}, None, "scheduler"),
        ({"sample_method": "dpm++2mv2"}, None, "sample_method"),
        ({}, {"control_image": sample_image()}, "control_image"),
    ]:
        with pytest.raises(JobError) as error:
            make_job(manifest, fields, images)
        assert error.value.param == param, (fields, error.value)


def test_emphasis_weights_qwen_states(zimage):
    """A1111 emphasis reaches Z-Image through Qwen3's states; weight 1 and BREAK leave the plain prompt exactly."""
    _, ours, manifest, _ = zimage

    def states(prompt: str) -> np.ndarray:
        conditioning = ours.encode_prompts(make_job(manifest, {"prompt": prompt}), guided=False)
        return np.array(conditioning.states[0, : conditioning.lengths[0]])

    plain = states(PROMPT)
    assert np.array_equal(states("(a photo:1.0) of a cat"), plain)
    assert np.array_equal(states("a photo BREAK of a cat"), plain)
    weighted = states("(a photo:1.5) of a cat")
    assert weighted.shape == plain.shape and not np.allclose(weighted, plain)


def test_a_lone_transformer_file_is_refused_clearly(tmp_path):
    path = tmp_path / "z_image_turbo_bf16.safetensors"
    mx.save_safetensors(str(path), {"model.diffusion_model.layers.0.adaLN_modulation.0.weight": mx.zeros((4, 4))})
    with pytest.raises(CheckpointError, match="does not hold all of Z-Image: also give --vae .*--llm"):
        convert_model(path, tmp_path / "out", progress=False)
