"""FLUX.2 klein's edits against diffusers on a tiny random model, with identical injected noise.

Instruction edits (Flux2KleinPipeline's `image=[...]`: one reference image, two of different sizes and aspects,
one with the base model's CFG) and inpainting (Flux2KleinInpaintPipeline: the source noised and blended back
outside a bilinear mask, and read as the first reference; with and without an `image_reference`), each at two
output sizes, one not square, within 1/255 mean absolute difference; a batch reading the references in every
image; how reference images are resized, and the mask brought to the token grid, against diffusers' own code;
what an edit on klein may send.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlx_sd_server.engine.families.flux2.family import reference_pixels
from mlx_sd_server.engine.families.runtime import Settings, bilinear_mask, downsample_mask
from mlx_sd_server.job import JobError
from test_flux2_pipeline import HEIGHT, PROMPT, TOLERANCE, WIDTH, klein, make_job, noise  # noqa: F401 (a fixture)
from test_pipeline import ReplayNoise, diffusers_noise, mean_abs_diff, ours_image

SIZES = [(WIDTH, HEIGHT), (64, 80)]
INPAINT_MODULE = "diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint"


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients with some grain: an image the tiny autoencoder encodes into varied latents."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(4 * x + 3 * y + p) for p in phase], axis=-1) * 0.4 + 0.5
    pixels = np.clip(base + rng.normal(0, 0.08, base.shape), 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def ellipse_mask(width: int, height: int) -> Image.Image:
    """An ellipse whose edge crosses the 16-pixel token cells anywhere: the bilinear mask has partial tokens."""
    y, x = np.mgrid[0:height, 0:width]
    inside = ((x - 0.55 * width) / (0.3 * width)) ** 2 + ((y - 0.45 * height) / (0.35 * height)) ** 2 <= 1
    return Image.fromarray((inside * 255).astype(np.uint8))


# (width, height) of reference images: not multiples of 16 (cropped), and of other aspects than the output's
ONE = ((100, 70),)
TWO = ((100, 70), (64, 150))


@pytest.mark.parametrize("width, height", SIZES)
@pytest.mark.parametrize("sizes", [ONE, TWO], ids=["one reference", "two references"])
def test_references_match_diffusers(klein, width, height, sizes):
    pipe, ours, manifest = klein("distilled")
    images = [picture(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]
    initial = noise(width, height, seed=2)
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, image=images, height=height, width=width, num_inference_steps=4,
                        guidance_scale=1.0, latents=torch.from_numpy(initial), output_type="np").images
    job = make_job(manifest, {"width": width, "height": height}, {"image": images})
    assert job.init_image is None and job.reference_images == tuple(images)
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    unreferenced = mean_abs_diff(ours_image(ours, make_job(manifest, {"width": width, "height": height}),
                                            ReplayNoise(initial, [])), expected)
    print(f"FLUX.2 klein, {len(images)} reference(s), {width}x{height}: mean abs diff {diff:.2e} "
          f"(without the references: {unreferenced:.2e})")
    assert diff <= TOLERANCE < unreferenced  # the references change the image, as diffusers' do


def test_references_with_cfg_match_diffusers(klein):
    """The base model's CFG: both halves read the same reference tokens."""
    pipe, ours, manifest = klein("base")
    images = [picture(w, h, seed=20 + i) for i, (w, h) in enumerate(TWO)]
    initial = noise(WIDTH, HEIGHT, seed=3)
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, image=images, height=HEIGHT, width=WIDTH, num_inference_steps=5,
                        guidance_scale=4.0, latents=torch.from_numpy(initial), output_type="np").images
    job = make_job(manifest, {"width": WIDTH, "height": HEIGHT, "steps": 5}, {"image": images})
    assert ours.family.guided(Settings.of(job))
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX.2 klein base, CFG 4, 2 references, {WIDTH}x{HEIGHT}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_a_batch_reads_the_references_in_every_image(klein):
    """Image i of a batch (each its own seed) is that seed's image with n=1: every image reads the references."""
    _, ours, manifest = klein("distilled")
    images = [picture(w, h, seed=30 + i) for i, (w, h) in enumerate(TWO)]

    def run(n: int, seed: int) -> np.ndarray:
        return ours_image(ours, make_job(manifest, {"width": WIDTH, "height": HEIGHT, "n": n, "seed": seed},
                                         {"image": images}), None)

    batch = run(2, 5)
    diff = mean_abs_diff(batch[1:], run(1, 6))
    print(f"FLUX.2 klein, 2 references, batch of 2 against n=1: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE and mean_abs_diff(batch[:1], batch[1:]) > TOLERANCE


@pytest.mark.parametrize("width, height", SIZES)
@pytest.mark.parametrize("with_reference", [False, True], ids=["source only", "image_reference"])
def test_inpainting_matches_diffusers(klein, width, height, with_reference):
    """Flux2KleinInpaintPipeline takes its output size from the source image: the source is the output's size.
    Its initial noise is drawn inside the pipeline (given `latents`, it would start from them un-noised), so
    it is injected there."""
    from diffusers import Flux2KleinInpaintPipeline

    pipe, ours, manifest = klein("distilled")
    inpaint = Flux2KleinInpaintPipeline(**pipe.components, is_distilled=True)
    inpaint.set_progress_bar_config(disable=True)
    source, mask = picture(width, height, seed=4), ellipse_mask(width, height)
    extra = picture(90, 120, seed=5) if with_reference else None
    initial = noise(width, height, seed=6)
    with torch.no_grad(), diffusers_noise([initial], INPAINT_MODULE):
        expected = inpaint(prompt=PROMPT, image=source, mask_image=mask, image_reference=extra, strength=0.75,
                           num_inference_steps=4, guidance_scale=1.0, output_type="np").images
    job = make_job(manifest, {"width": width, "height": height, "strength": 0.75},
                   {"image": [source, extra] if extra else source, "mask": mask})
    assert job.init_image is source and job.reference_images == ((extra,) if extra else ())
    assert ours.total_steps(job) == 3  # 4 steps at strength 0.75
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX.2 klein inpainting, {'source and image_reference' if extra else 'source'} as references, "
          f"{width}x{height}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_inpainting_reads_the_source_and_a_bilinear_mask(klein, monkeypatch):
    """What the inpainting match rests on, shown to matter: without the source as a reference, or with a
    max-pooled mask, the image is not diffusers' (measured where the mask repaints: outside it, both keep
    the source)."""
    from diffusers import Flux2KleinInpaintPipeline

    pipe, ours, manifest = klein("distilled")
    inpaint = Flux2KleinInpaintPipeline(**pipe.components, is_distilled=True)
    inpaint.set_progress_bar_config(disable=True)
    source, mask = picture(WIDTH, HEIGHT, seed=7), ellipse_mask(WIDTH, HEIGHT)
    initial = noise(WIDTH, HEIGHT, seed=8)
    with torch.no_grad(), diffusers_noise([initial], INPAINT_MODULE):
        expected = inpaint(prompt=PROMPT, image=source, mask_image=mask, strength=1.0, num_inference_steps=4,
                           guidance_scale=1.0, output_type="np").images
    job = make_job(manifest, {"width": WIDTH, "height": HEIGHT, "strength": 1.0}, {"image": source, "mask": mask})

    inside = np.asarray(mask)[None, :, :, None] >= 128

    def diff() -> float:
        ours_pixels = ours_image(ours, job, ReplayNoise(initial, []))
        return mean_abs_diff(ours_pixels * inside, expected * inside) / inside.mean()

    errors = {"as diffusers": diff()}
    monkeypatch.setattr(ours, "source_as_reference", False)
    errors["no source reference"] = diff()
    monkeypatch.setattr(ours, "source_as_reference", True)
    monkeypatch.setattr(ours, "latent_mask", downsample_mask)
    errors["max-pooled mask"] = diff()
    print("FLUX.2 klein inpainting, strength 1, mean abs diff inside the mask:", ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["as diffusers"] <= TOLERANCE < min(errors["no source reference"], errors["max-pooled mask"])


@pytest.mark.parametrize("width, height", [(1300, 900), (700, 1500), (100, 70), (64, 64)])
def test_reference_pixels_are_diffusers(klein, width, height):
    """Over 1024 x 1024 pixels scaled down to it, then centre-cropped to multiples of 16, as
    Flux2KleinPipeline prepares its `image`s."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    pipe, _, _ = klein("distilled")
    image = picture(width, height, seed=9)
    scaled = Flux2ImageProcessor._resize_to_target_area(image) if width * height > 1024 * 1024 else image
    w, h = scaled.width // 16 * 16, scaled.height // 16 * 16
    expected = pipe.image_processor.preprocess(scaled, height=h, width=w, resize_mode="crop")[0].numpy()
    ours = reference_pixels(image, 16)
    assert ours.shape == (h, w, 3) and w * h <= 1024 * 1024
    np.testing.assert_allclose(ours * 2 - 1, expected.transpose(1, 2, 0), atol=1e-6)


def test_reference_too_small_to_encode_is_a_job_error():
    with pytest.raises(JobError, match="too small") as error:
        reference_pixels(picture(100, 12, seed=0), 16)
    assert error.value.param == "image"


@pytest.mark.parametrize("width, height", [(96, 64), (64, 80), (100, 70)])
def test_bilinear_mask_is_torchs(width, height):
    mask = np.random.default_rng(width).random((height, width)) < 0.5
    expected = torch.nn.functional.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None],
                                               size=(height // 16, width // 16), mode="bilinear")[0, 0].numpy()
    ours = bilinear_mask(mask, 16)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert ours.dtype == np.float32 and not np.isin(ours, (0.0, 1.0)).all()  # partly repainted tokens


def test_what_an_edit_on_klein_may_send(klein):
    _, _, manifest = klein("distilled")
    images = [picture(80, 80, seed=i) for i in range(5)]
    with pytest.raises(JobError, match="at most 4") as error:
        make_job(manifest, {}, {"image": images})  # four references at most
    assert error.value.param == "image"
    with pytest.raises(JobError) as error:
        make_job(manifest, {"strength": 0.5}, {"image": images[:1]})  # an instruction edit has no strength
    assert error.value.param == "strength"
    inpainting = make_job(manifest, {"width": 80, "height": 80}, {"image": images[:4], "mask": ellipse_mask(80, 80)})
    assert inpainting.init_image is images[0] and inpainting.reference_images == tuple(images[1:4])
