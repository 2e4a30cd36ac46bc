"""Whole pipelines against diffusers on tiny random models, with identical injected noise.

Final images are compared as diffusers returns them (float [0, 1]) against ours (uint8 / 255): the mean
absolute difference must be within 1/255.
"""

from __future__ import annotations

import contextlib
import importlib

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_diffusers
from convert.model import convert_model
from mlx_sd_server.engine.model_io import load_model
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import build_job

SIZE = 64
PROMPT = "a photo of a cat"
NEGATIVE = "dog"
TOLERANCE = 1 / 255


class ReplayNoise:
    """Our pipeline's NoiseSource, replaying arrays also handed to diffusers (NCHW there, NHWC here)."""

    def __init__(self, initial: np.ndarray, steps: list[np.ndarray]):
        self._initial, self._steps = initial, iter(steps)

    def initial(self, shape):
        return mx.array(self._initial.transpose(0, 2, 3, 1))

    def step(self, shape):
        return mx.array(next(self._steps).transpose(0, 2, 3, 1))


@contextlib.contextmanager
def diffusers_noise(steps: list[np.ndarray], *modules: str):
    """Make diffusers' schedulers draw their per-step noise from `steps`, in order."""
    replay = iter(steps)
    originals = {}
    for name in modules:
        module = importlib.import_module(name)
        if not hasattr(module, "randn_tensor"):  # a deterministic scheduler draws no noise
            continue
        originals[module] = module.randn_tensor
        module.randn_tensor = lambda shape, **_: torch.from_numpy(next(replay)).reshape(shape)
    try:
        yield
    finally:
        for module, original in originals.items():
            module.randn_tensor = original


def make_noise(n: int = 1, steps: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (n, 4, SIZE // 8, SIZE // 8)
    return rng.standard_normal(shape).astype(np.float32), [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def collect(pipeline: DiffusionPipeline, job, noise=None) -> list[Image.Image]:
    """Run the step generator to the end; its return value is the images."""
    gen = pipeline.generate(job, noise)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


def ours_image(pipeline: DiffusionPipeline, job, noise) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.float64) / 255 for img in collect(pipeline, job, noise)])


def mean_abs_diff(ours: np.ndarray, reference: np.ndarray) -> float:
    """Both quantised to 8 bits the same way, so rounding alone counts for nothing."""
    reference = np.round(np.clip(reference.astype(np.float64), 0, 1) * 255) / 255
    return float(np.abs(ours - reference).mean())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (diffusers pipeline, our pipeline), built lazily and shared by the module's tests."""
    cache = {}

    def get(family: str, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            src = tmp_path_factory.mktemp(f"{family}-src")
            pipe = tiny_diffusers.make_pipeline(src, family, **options)
            dst = tmp_path_factory.mktemp(f"{family}-dst") / "model"
            convert_model(src, dst, dtype="float32", progress=False, name="lcm" if options.get("lcm") else None)
            cache[key] = (pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False))
        return cache[key]

    return get


DIFFUSERS_SAMPLERS = {
    # ours: (diffusers scheduler class, its module (where it draws noise), extra config)
    "euler": ("EulerDiscreteScheduler", "diffusers.schedulers.scheduling_euler_discrete", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", "diffusers.schedulers.scheduling_euler_ancestral_discrete", {}),
    "heun": ("HeunDiscreteScheduler", "diffusers.schedulers.scheduling_heun_discrete", {}),
    "dpm2": ("KDPM2DiscreteScheduler", "diffusers.schedulers.scheduling_k_dpm_2_discrete", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", "diffusers.schedulers.scheduling_dpmsolver_multistep",
                {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}),
}


def use_scheduler(pipe, sample_method: str) -> str:
    import diffusers

    class_name, module, extra = DIFFUSERS_SAMPLERS[sample_method]
    config = {**tiny_diffusers.scheduler_config("sd1"), **{"prediction_type": pipe.scheduler.config.prediction_type}, **extra}
    pipe.scheduler = getattr(diffusers, class_name).from_config(config)
    return module


@pytest.mark.parametrize("sample_method", list(DIFFUSERS_SAMPLERS))
def test_txt2img_matches_diffusers(models, sample_method):
    pipe, ours = models("sd1")
    module = use_scheduler(pipe, sample_method)
    initial, steps = make_noise()
    with diffusers_noise(steps, module):
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.0, height=SIZE,
                        width=SIZE, latents=torch.from_numpy(initial), output_type="np").images
    job = build_job({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 8, "cfg_scale": 7.0,
                     "sample_method": sample_method, "size": f"{SIZE}x{SIZE}"})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, steps)), expected)
    print(f"txt2img {sample_method}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("family", ["sd2v", "sdxl"])
def test_txt2img_other_families_match_diffusers(models, family):
    pipe, ours = models(family)
    use_scheduler(pipe, "euler")
    initial, _ = make_noise()
    expected = pipe(PROMPT, num_inference_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE,
                    latents=torch.from_numpy(initial), output_type="np").images
    job = build_job({"prompt": PROMPT, "steps": 6, "cfg_scale": 5.0, "sample_method": "euler", "size": f"{SIZE}x{SIZE}"})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"txt2img {family}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_lcm_matches_diffusers(models):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    pipe, ours = models("sd1", lcm=True)
    reference = LatentConsistencyModelPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=LCMScheduler(**tiny_diffusers.scheduler_config("sd1")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    initial, steps = make_noise()
    with diffusers_noise(steps, "diffusers.schedulers.scheduling_lcm"):
        expected = reference(PROMPT, num_inference_steps=4, guidance_scale=8.5, height=SIZE, width=SIZE,
                             latents=torch.from_numpy(initial), output_type="np").images
    job = build_job({"prompt": PROMPT, "steps": 4, "cfg_scale": 8.5, "sample_method": "lcm", "scheduler": "lcm",
                     "size": f"{SIZE}x{SIZE}"})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, steps)), expected)
    print(f"lcm: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def sample_image(seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, SIZE)[None, :, None] * np.ones((SIZE, 1, 3))
    return Image.fromarray((0.7 * base + 0.3 * rng.uniform(0, 255, (SIZE, SIZE, 3))).astype(np.uint8))


def sample_mask() -> Image.Image:
    """Aligned to 8-pixel blocks, where our max-pool and diffusers' nearest downsampling agree."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    return Image.fromarray(mask)


@contextlib.contextmanager
def posterior_mode(*modules: str):
    """diffusers samples the VAE posterior; we use its mean. Make diffusers use the mean too."""
    originals = {}
    for name in modules:
        module = importlib.import_module(name)
        originals[module] = module.retrieve_latents
        module.retrieve_latents = lambda output, generator=None, sample_mode="sample": output.latent_dist.mode()
    try:
        yield
    finally:
        for module, original in originals.items():
            module.retrieve_latents = original


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers(models, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, ours = models("sd1")
    module = use_scheduler(pipe, "euler_a")
    reference = StableDiffusionImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial, steps = make_noise()
    image = sample_image()
    img2img = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
    with posterior_mode(img2img), diffusers_noise([initial, *steps], img2img, module):
        expected = reference(PROMPT, image=image, strength=strength, num_inference_steps=10, guidance_scale=6.0,
                             output_type="np").images
    job = build_job({"prompt": PROMPT, "steps": 10, "cfg_scale": 6.0, "sample_method": "euler_a", "strength": strength,
                     "size": f"{SIZE}x{SIZE}"}, {"image": image})
    assert ours.total_steps(job) == int(10 * strength)
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, steps)), expected)
    print(f"img2img strength {strength}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("inpaint_unet", [False, True])
def test_inpainting_matches_diffusers(models, inpaint_unet):
    from diffusers import StableDiffusionInpaintPipeline

    pipe, ours = models("sd1", inpaint=inpaint_unet)
    use_scheduler(pipe, "euler")
    reference = StableDiffusionInpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial, _ = make_noise()
    image, mask = sample_image(), sample_mask()
    with posterior_mode("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"):
        expected = reference(PROMPT, image=image, mask_image=mask, num_inference_steps=8, guidance_scale=7.0,
                             height=SIZE, width=SIZE, latents=torch.from_numpy(initial), output_type="np").images
    job = build_job({"prompt": PROMPT, "steps": 8, "cfg_scale": 7.0, "sample_method": "euler", "strength": 1.0,
                     "size": f"{SIZE}x{SIZE}"}, {"image": image, "mask": mask})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"inpainting ({'9' if inpaint_unet else '4'}-channel UNet): mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_inpainting_keeps_unmasked_pixels_exactly(models):
    _, ours = models("sd1")
    image, mask = sample_image(), sample_mask()
    pasting = DiffusionPipeline(ours.model, paste_back=True)
    job = build_job({"prompt": PROMPT, "steps": 3, "size": f"{SIZE}x{SIZE}", "strength": 1.0}, {"image": image, "mask": mask})
    out = ours_image(pasting, job, None)[0]
    far_from_mask = np.ones((SIZE, SIZE), bool)
    far_from_mask[16 - 12 : 48 + 12, 0 : 40 + 12] = False  # the mask plus 3 feather widths
    original = np.asarray(image, dtype=np.float64) / 255
    assert np.array_equal(out[far_from_mask], original[far_from_mask])
    assert np.abs(out[20:44, 12:36] - original[20:44, 12:36]).mean() > 0.01  # and the inside was repainted


def run(pipeline: DiffusionPipeline, fields: dict) -> list[bytes]:
    job = build_job({"prompt": PROMPT, "steps": 4, "size": f"{SIZE}x{SIZE}", **fields})
    return [img.tobytes() for img in collect(pipeline, job)]


def test_same_seed_same_bytes_and_batches_reproduce_single_images(models):
    _, ours = models("sd1")
    first = run(ours, {"seed": 7, "n": 2})
    assert first == run(ours, {"seed": 7, "n": 2})
    alone = run(ours, {"seed": 8})[0]  # image i of a batch is seed + i on its own, up to BLAS rounding
    assert np.abs(np.frombuffer(first[1], np.uint8).astype(int) - np.frombuffer(alone, np.uint8)).max() <= 2
    assert first[0] != first[1]
    assert run(ours, {"seed": 9})[0] != first[0]


def test_long_and_weighted_prompts_generate(models):
    _, ours = models("sdxl")
    long_prompt = ", ".join(["a (very:1.3) detailed [photo] of a cat"] * 12)  # well over 77 tokens
    job = build_job({"prompt": long_prompt, "negative_prompt": "dog", "steps": 2, "size": f"{SIZE}x{SIZE}"})
    context, pooled = ours.encode_prompts(job, guided=True)
    assert context.shape[1] > 77 and context.shape[1] % 77 == 0
    assert pooled.shape[0] == 2
    images = collect(ours, job)
    assert len(images) == 1 and images[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_low_memory_frees_text_encoders_and_gives_the_same_images(models, family):
    """low_memory=True: the text encoders' weights are dropped after each job's prompts, re-read lazily."""
    _, ours = models(family)
    low = DiffusionPipeline(load_model(ours.model.folder, dtype="float32", low_memory=True), paste_back=False)
    job = build_job({"prompt": PROMPT, "steps": 2, "cfg_scale": 5.0, "size": f"{SIZE}x{SIZE}", "seed": 3})
    expected = collect(ours, job)[0]
    for _ in range(2):  # the second job reads the encoders back from disk
        before = list(low.model.text_encoders.values())
        assert np.array_equal(np.asarray(collect(low, job)[0]), np.asarray(expected))
        assert all(a is not b for a, b in zip(low.model.text_encoders.values(), before))
    assert not low.model.vae.decoder.up_blocks[-1].resnets[0].conv1.keeps_winograd_kernel  # see test_winograd.py
    assert ours.model.vae.decoder.up_blocks[-1].resnets[0].conv1.keeps_winograd_kernel
    kept = ours.model.text_encoders
    ours.model.text_encoding_done()  # the default mode keeps them
    assert ours.model.text_encoders is kept
