"""Our pipelines loaded in float16 (what a Mac runs by default) against diffusers in float32, on the same noise.

One txt2img per family, on the tiny models and with the calls of the float32 parity tests (their fixtures'
converted folders, loaded again with dtype="float16"); for SD 1.x also with its VAE in float16 (the tiny
VAEs say force_upcast, as diffusers writes by default; the release of SD 1.5 does not), and img2img and
inpainting that way (the VAE encoder in float16). Components whose precision rule says so stay in their own
dtype, as in serving: a force_upcast VAE (SDXL's) in float32, FLUX's T5 in bfloat16.

The tolerance is float32's too, mean absolute difference <= 1/255, though float16 rounds each product to
~5e-4 relative and bfloat16 text encoders to ~4e-3. Measured, in 1/255 (kernels on / MLX_SD_CPU_KERNELS=0;
.ci/run runs this file in both modes): SD 1.x txt2img 0.032 / 0.046, with its VAE in float16 0.046 / 0.064,
img2img 0.062 / 0.088, inpainting 0.046 / 0.052; SDXL 0.024 / 0.028; FLUX.1 dev 0.094 / 0.075, schnell
0.071 / 0.044; SD3 0.349 / 0.336; Z-Image 0.197 / 0.173; FLUX.2 klein 0.151 / 0.158; Qwen-Image 0.123 / 0.111.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
import test_flux_pipeline as flux_tests
import test_pipeline as sd_tests
import test_qwenimage_pipeline as qwen_tests
import test_zimage_pipeline as zimage_tests
import torch
from test_flux2_pipeline import klein  # noqa: F401 (a fixture)
from test_flux2_pipeline import noise as flux2_noise
from test_flux2_pipeline import reference as flux2_reference
from test_flux_pipeline import flux, t5_length  # noqa: F401 (a fixture)
from test_flux_pipeline import packed as flux_packed
from test_pipeline import ReplayNoise, mean_abs_diff, models, ours_image  # noqa: F401 (a fixture)
from test_qwenimage_pipeline import qwen  # noqa: F401 (a fixture)
from test_sd3_pipeline import sd3  # noqa: F401 (a fixture)
from test_zimage_pipeline import zimage  # noqa: F401 (a fixture)

from mlx_sd_server.engine.model_io import MANIFEST, load_model, read_manifest, write_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline

TOLERANCE = 1 / 255


@pytest.fixture(scope="module")
def float16(tmp_path_factory):
    """get(our float32 pipeline, vae_in_float16=False) -> the same converted folder loaded in float16 (cached).

    `vae_in_float16`: as if the VAE's config had no force_upcast (diffusers writes True by default, so every
    tiny model has it): a copy of the folder, weights linked, whose manifest says false."""
    cache: dict[tuple[Path, bool], DiffusionPipeline] = {}

    def get(ours: DiffusionPipeline, vae_in_float16: bool = False) -> DiffusionPipeline:
        source = folder = ours.model.folder
        if (source, vae_in_float16) not in cache:
            if vae_in_float16:
                folder = tmp_path_factory.mktemp("vae-float16") / source.name
                folder.mkdir()
                for item in source.iterdir():
                    if item.name != MANIFEST:
                        (folder / item.name).symlink_to(item)
                manifest = read_manifest(source)
                manifest["components"]["vae"]["config"]["force_upcast"] = False
                write_manifest(folder, manifest)
            cache[source, vae_in_float16] = DiffusionPipeline(load_model(folder, dtype="float16"), paste_back=False)
        return cache[source, vae_in_float16]

    return get


def check(label: str, half: DiffusionPipeline, job, initial, expected, steps=()) -> None:
    diff = mean_abs_diff(ours_image(half, job, ReplayNoise(initial, list(steps))), expected)
    print(f"float16 {label}: mean abs diff {diff * 255:.3f}/255")
    assert diff <= TOLERANCE


@pytest.mark.parametrize(
    "family, vae_in_float16", [("sd1", False), ("sd1", True), ("sdxl", False)], ids=["sd1", "sd1-vae-float16", "sdxl"]
)
def test_sd_txt2img(models, float16, family, vae_in_float16):  # noqa: F811 (the fixture)
    pipe, ours = models(family)
    sd_tests.use_scheduler(pipe, "euler")
    half = float16(ours, vae_in_float16)
    assert half.model.dtype == mx.float16
    assert half.model.vae_dtype == (mx.float16 if vae_in_float16 else mx.float32)  # the config's force_upcast
    initial, _ = sd_tests.make_noise()
    size = sd_tests.SIZE
    expected = pipe(
        sd_tests.PROMPT,
        negative_prompt=sd_tests.NEGATIVE,
        num_inference_steps=6,
        guidance_scale=5.0,
        height=size,
        width=size,
        latents=torch.from_numpy(initial),
        output_type="np",
    ).images
    job = sd_tests.build_job(
        {
            "prompt": sd_tests.PROMPT,
            "negative_prompt": sd_tests.NEGATIVE,
            "steps": 6,
            "cfg_scale": 5.0,
            "sample_method": "euler",
            "size": f"{size}x{size}",
        }
    )
    check(f"{family}{' (VAE in float16)' if vae_in_float16 else ''} txt2img", half, job, initial, expected)


def test_sd_img2img(models, float16):  # noqa: F811 (the fixture)
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, ours = models("sd1")
    module = sd_tests.use_scheduler(pipe, "euler_a")
    reference = StableDiffusionImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial, steps = sd_tests.make_noise()
    image = sd_tests.sample_image()
    img2img = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
    with sd_tests.posterior_mode(img2img), sd_tests.diffusers_noise([initial, *steps], img2img, module):
        expected = reference(
            sd_tests.PROMPT, image=image, strength=0.5, num_inference_steps=10, guidance_scale=6.0, output_type="np"
        ).images
    job = sd_tests.build_job(
        {
            "prompt": sd_tests.PROMPT,
            "steps": 10,
            "cfg_scale": 6.0,
            "sample_method": "euler_a",
            "strength": 0.5,
            "size": f"{sd_tests.SIZE}x{sd_tests.SIZE}",
        },
        {"image": image},
    )
    check("sd1 img2img (VAE in float16)", float16(ours, vae_in_float16=True), job, initial, expected, steps)


def test_sd_inpainting(models, float16):  # noqa: F811 (the fixture)
    from diffusers import StableDiffusionInpaintPipeline

    pipe, ours = models("sd1")
    sd_tests.use_scheduler(pipe, "euler")
    reference = StableDiffusionInpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial, _ = sd_tests.make_noise()
    image, mask, size = sd_tests.sample_image(), sd_tests.sample_mask(), sd_tests.SIZE
    with sd_tests.posterior_mode("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"):
        expected = reference(
            sd_tests.PROMPT,
            image=image,
            mask_image=mask,
            num_inference_steps=8,
            guidance_scale=7.0,
            height=size,
            width=size,
            latents=torch.from_numpy(initial),
            output_type="np",
        ).images
    job = sd_tests.build_job(
        {
            "prompt": sd_tests.PROMPT,
            "steps": 8,
            "cfg_scale": 7.0,
            "sample_method": "euler",
            "strength": 1.0,
            "size": f"{size}x{size}",
        },
        {"image": image, "mask": mask},
    )
    check("sd1 inpainting (VAE in float16)", float16(ours, vae_in_float16=True), job, initial, expected)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_txt2img(flux, float16, variant):  # noqa: F811 (the fixture)
    pipe, ours, manifest = flux(variant)
    half = float16(ours)
    assert half.model.text_encoders["text_encoder_2"].parameters()["shared"]["weight"].dtype == mx.bfloat16  # T5
    initial = flux_tests.noise()
    extra = {"guidance_scale": 3.5} if variant == "dev" else {}
    expected = pipe(
        flux_tests.PROMPT,
        num_inference_steps=4,
        height=flux_tests.HEIGHT,
        width=flux_tests.WIDTH,
        latents=flux_packed(initial),
        max_sequence_length=t5_length(manifest),
        output_type="np",
        **extra,
    ).images
    job = flux_tests.make_job(manifest, {"steps": 4, "width": flux_tests.WIDTH, "height": flux_tests.HEIGHT})
    check(f"FLUX {variant} txt2img", half, job, initial, expected)


def test_sd3_txt2img(sd3, float16):  # noqa: F811 (the fixture)
    pipe, ours, manifest = sd3("sd3")
    initial = flux_tests.noise()
    expected = pipe(
        flux_tests.PROMPT,
        negative_prompt=flux_tests.NEGATIVE,
        guidance_scale=5.0,
        num_inference_steps=4,
        height=flux_tests.HEIGHT,
        width=flux_tests.WIDTH,
        latents=torch.from_numpy(initial),
        output_type="np",
    ).images
    job = flux_tests.make_job(
        manifest,
        {
            "steps": 4,
            "cfg_scale": 5.0,
            "negative_prompt": flux_tests.NEGATIVE,
            "width": flux_tests.WIDTH,
            "height": flux_tests.HEIGHT,
        },
    )
    check("SD3 txt2img", float16(ours), job, initial, expected)


def test_zimage_txt2img(zimage, float16):  # noqa: F811 (the fixture)
    pipe, ours, manifest, _ = zimage
    initial = zimage_tests.noise()
    expected = pipe(
        zimage_tests.PROMPT,
        num_inference_steps=4,
        guidance_scale=0.0,
        height=zimage_tests.HEIGHT,
        width=zimage_tests.WIDTH,
        latents=torch.from_numpy(initial),
        output_type="np",
    ).images
    check("Z-Image txt2img", float16(ours), zimage_tests.make_job(manifest, {"steps": 4}), initial, expected)


def test_flux2_txt2img(klein, float16):  # noqa: F811 (the fixture)
    import test_flux2_pipeline as flux2_tests

    pipe, ours, manifest = klein("distilled")
    width, height = flux2_tests.WIDTH, flux2_tests.HEIGHT
    initial = flux2_noise(width, height)
    expected = flux2_reference(pipe, width, height, initial, num_inference_steps=4, guidance_scale=1.0)
    job = flux2_tests.make_job(manifest, {"width": width, "height": height})
    check("FLUX.2 klein txt2img", float16(ours), job, initial, expected)


def test_qwenimage_txt2img(qwen, float16):  # noqa: F811 (the fixture)
    pipe, ours, manifest = qwen
    initial = qwen_tests.noise()
    expected = pipe(
        qwen_tests.PROMPT,
        num_inference_steps=4,
        true_cfg_scale=1.0,
        height=qwen_tests.HEIGHT,
        width=qwen_tests.WIDTH,
        latents=qwen_tests.packed(initial),
        output_type="np",
    ).images
    job = qwen_tests.make_job(manifest, {"steps": 4, "cfg_scale": 1.0})
    check("Qwen-Image txt2img", float16(ours), job, initial, expected)
