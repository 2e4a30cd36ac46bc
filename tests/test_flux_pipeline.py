"""FLUX.1 pipelines against diffusers on tiny random models, with identical injected noise.

txt2img against FluxPipeline (distilled guidance on dev, true CFG with a negative prompt), img2img against
FluxImg2ImgPipeline and inpainting against FluxInpaintPipeline: final images within 1/255 mean absolute
difference. Also: the capabilities a FLUX model declares are enforced before a job is queued.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_diffusers
import tiny_flux
from convert.model import convert_model
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline, drive
from mlx_sd_server.job import JobError, ModelDefaults, build_job
from parity import max_rel_err, nchw_to_nhwc
from test_pipeline import (
    ReplayNoise, diffusers_noise, mean_abs_diff, ours_image, posterior_mode, sample_image, sample_mask,
)

PROMPT = "a photo of a cat"
NEGATIVE = "a dog"
TOLERANCE = 1 / 255
WIDTH, HEIGHT = 80, 64  # non-square: 10x8 latents, 5x4 packed tokens


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """variant -> (diffusers pipeline, our pipeline, our manifest), built lazily."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            src = tmp_path_factory.mktemp(f"flux-{variant}-src")
            pipe = tiny_flux.make_pipeline(src, variant)
            dst = tmp_path_factory.mktemp(f"flux-{variant}-dst") / "model"
            convert_model(src, dst, dtype="float32", progress=False)
            cache[variant] = (pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False),
                              read_manifest(dst))
        return cache[variant]

    return get


def make_job(manifest: dict, fields: dict, images: dict | None = None):
    return build_job({"prompt": PROMPT, "sample_method": "euler", **fields}, images,
                     defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))


def noise(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def packed(initial: np.ndarray) -> torch.Tensor:
    from diffusers import FluxPipeline

    n, c, h, w = initial.shape
    return FluxPipeline._pack_latents(torch.from_numpy(initial), n, c, h, w)


def vae_errors(pipe, model, rng: np.random.Generator) -> dict[str, float]:
    """Our 16-channel autoencoder against diffusers' (FLUX's and SD3's): decode and encode, max rel err."""
    z = rng.standard_normal((1, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, HEIGHT, WIDTH)).astype(np.float32)
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.from_numpy(z)).sample
        encoded = pipe.vae.encode(torch.from_numpy(image)).latent_dist.mean
    mean, _ = model.vae.encode(mx.array(image.transpose(0, 2, 3, 1)))
    return {"vae decode": max_rel_err(model.vae.decode(mx.array(z.transpose(0, 2, 3, 1))), nchw_to_nhwc(decoded)),
            "vae encode": max_rel_err(mean, nchw_to_nhwc(encoded))}


def t5_length(manifest: dict) -> int:
    return manifest["components"]["text_encoder_2"]["max_length"]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_txt2img_matches_diffusers(flux, variant):
    pipe, ours, manifest = flux(variant)
    initial = noise()
    extra = {"guidance_scale": 3.5} if variant == "dev" else {}
    expected = pipe(PROMPT, num_inference_steps=4, height=HEIGHT, width=WIDTH, latents=packed(initial),
                    max_sequence_length=t5_length(manifest), output_type="np", **extra).images
    job = make_job(manifest, {"steps": 4, "width": WIDTH, "height": HEIGHT})
    assert job.cfg_scale == 1.0 and job.guidance == (3.5 if variant == "dev" else None)  # the manifest's defaults
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX {variant} txt2img: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_true_cfg_and_guidance_match_diffusers(flux):
    pipe, ours, manifest = flux("dev")
    initial = noise(seed=1)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, guidance_scale=2.0, num_inference_steps=3,
                    height=HEIGHT, width=WIDTH, latents=packed(initial), max_sequence_length=t5_length(manifest),
                    output_type="np").images
    job = make_job(manifest, {"steps": 3, "cfg_scale": 4.0, "guidance": 2.0, "negative_prompt": NEGATIVE,
                              "width": WIDTH, "height": HEIGHT})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX dev true CFG 4 + guidance 2: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


FLUX_SCHEDULER = "diffusers.schedulers.scheduling_flow_match_euler_discrete"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_img2img_matches_diffusers(flux, variant):
    from diffusers import FluxImg2ImgPipeline

    pipe, ours, manifest = flux(variant)
    reference = FluxImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=2)
    image = sample_image().resize((WIDTH, HEIGHT))
    module = "diffusers.pipelines.flux.pipeline_flux_img2img"
    extra = {"guidance_scale": 3.5} if variant == "dev" else {}
    with posterior_mode(module), diffusers_noise([initial], module):
        expected = reference(PROMPT, image=image, strength=0.5, num_inference_steps=6, height=HEIGHT, width=WIDTH,
                             max_sequence_length=t5_length(manifest), output_type="np", **extra).images
    job = make_job(manifest, {"steps": 6, "strength": 0.5, "width": WIDTH, "height": HEIGHT}, {"image": image})
    assert ours.total_steps(job) == 3
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX {variant} img2img strength 0.5: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_matches_diffusers(flux, strength):
    from diffusers import FluxInpaintPipeline

    pipe, ours, manifest = flux("dev")
    reference = FluxInpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=3)
    image, mask = sample_image().resize((WIDTH, HEIGHT)), sample_mask().crop((0, 0, WIDTH, HEIGHT))  # black beyond
    module = "diffusers.pipelines.flux.pipeline_flux_inpaint"
    with posterior_mode(module), diffusers_noise([initial], module):
        expected = reference(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=4,
                             guidance_scale=3.5, height=HEIGHT, width=WIDTH, max_sequence_length=t5_length(manifest),
                             output_type="np").images
    job = make_job(manifest, {"steps": 4, "strength": strength, "width": WIDTH, "height": HEIGHT},
                   {"image": image, "mask": mask})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX inpainting strength {strength}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("sample_method", ["euler_a", "heun", "dpm++2m", "dpm++2s_a", "ipndm", "lcm"])
def test_every_sampler_runs_on_flux(flux, sample_method):
    _, ours, manifest = flux("schnell")
    job = make_job(manifest, {"steps": 3, "width": WIDTH, "height": HEIGHT, "sample_method": sample_method, "n": 2})
    images = ours_image(ours, job, None)
    assert images.shape == (2, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


def test_capabilities_are_checked_before_queueing(flux):
    _, _, dev = flux("dev")
    _, _, schnell = flux("schnell")
    with pytest.raises(JobError) as error:
        make_job(schnell, {"guidance": 3.5})
    assert error.value.param == "guidance" and error.value.code == "unsupported_parameter"
    with pytest.raises(JobError) as error:
        make_job(dev, {"width": 72, "height": 64})  # FLUX packs 2x2 latent pixels: sides are multiples of 16
    assert error.value.param == "width" and "multiple of 16" in error.value.message
    with pytest.raises(JobError) as error:
        make_job(dev, {"scheduler": "ays"})
    assert error.value.param == "scheduler"
    with pytest.raises(JobError) as error:  # does not converge on flow schedules (tests/test_flow_samplers.py)
        make_job(dev, {"sample_method": "dpm++2mv2"})
    assert error.value.param == "sample_method"
    with pytest.raises(JobError) as error:
        make_job(dev, {}, {"control_image": sample_image()})
    assert error.value.param == "control_image"
    assert make_job(dev, {"guidance": 5.0}).guidance == 5.0


def test_emphasis_weights_t5_states(flux):
    """A1111 emphasis reaches FLUX through T5's states (scaled, then the mean restored, as on SD); weight 1
    is the plain prompt exactly."""
    _, ours, manifest = flux("schnell")

    def context(prompt: str) -> np.ndarray:
        job = make_job(manifest, {"prompt": prompt, "width": WIDTH, "height": HEIGHT})
        return np.array(ours.encode_prompts(job, guided=False).context[0])

    plain = context("a photo of a cat")
    assert np.array_equal(context("(a photo:1.0) of a cat"), plain)
    assert np.array_equal(context("a photo BREAK of a cat"), plain)  # T5 reads one sequence: a word break
    ratio = context("(a photo:1.5) of a cat") / plain
    emphasised = len(ours.model.tokenizers["text_encoder_2"].tokenize("a photo"))
    restore = ratio[-1, 0]  # the mean correction every token gets
    np.testing.assert_allclose(ratio[:emphasised], 1.5 * restore, rtol=1e-4)
    np.testing.assert_allclose(ratio[emphasised:], restore, rtol=1e-4)
    assert abs(restore - 1) > 1e-4


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_converted_components_match_diffusers(flux, variant):
    """Each FLUX component as converted from the diffusers folder, against its diffusers/transformers module:
    CLIP-L's pooled output, T5's states, the transformer's velocity, the 16-channel autoencoder both ways."""
    from mlx_sd_server.engine.families.flux.transformer import latent_image_ids, pack_latents

    pipe, ours, _ = flux(variant)
    model = ours.model
    rng = np.random.default_rng(5)
    clip_ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = pipe.text_encoder(clip_ids).pooler_output
        states = pipe.text_encoder_2(t5_ids)[0]
    clip, t5 = model.text_encoders["text_encoder"], model.text_encoders["text_encoder_2"]
    errors = {"clip pooled": max_rel_err(clip(mx.array(clip_ids.numpy())).pooled_output, pooled),
              "t5": max_rel_err(t5(mx.array(t5_ids.numpy())), states)}

    latents = rng.standard_normal((2, HEIGHT // 8, WIDTH // 8, 16)).astype(np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    vector = rng.standard_normal((2, 32)).astype(np.float32)
    sigma = np.array([0.9, 0.35], np.float32)
    guidance = np.array([3.5, 2.0], np.float32) if variant == "dev" else None
    image_ids = np.array(latent_image_ids(HEIGHT // 8, WIDTH // 8))
    packed = np.array(pack_latents(mx.array(latents)))
    with torch.no_grad():
        expected = pipe.transformer(
            hidden_states=torch.from_numpy(packed), encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(vector), timestep=torch.from_numpy(sigma),
            img_ids=torch.from_numpy(image_ids), txt_ids=torch.zeros(7, 3),
            guidance=None if guidance is None else torch.from_numpy(guidance), return_dict=False)[0]
    got = model.components["transformer"](mx.array(packed), mx.array(context), mx.array(vector), mx.array(sigma),
                                          mx.array(image_ids), mx.zeros((7, 3)),
                                          None if guidance is None else mx.array(guidance))
    errors["transformer"] = max_rel_err(got, expected)

    errors.update(vae_errors(pipe, model, rng))
    print(f"FLUX {variant} components, max rel err:", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= 1e-4


def test_three_level_autoencoder_sets_the_latent_geometry(tmp_path_factory, tmp_path):
    """An autoencoder with three levels downscales by 4, not 8: sides are multiples of 8 (4 x the 2x2 patch),
    and the latents, token count (dev's shift) and position ids follow it. This crashed at 96x64 with
    `[broadcast_shapes] Shapes (1,2,352,12) and (280,12)` when the geometry was assumed to be 1/8."""
    from diffusers import AutoencoderKL, FluxPipeline

    src = tmp_path_factory.mktemp("flux-vae4-src")
    base = tiny_flux.make_pipeline(src, "dev")
    torch.manual_seed(3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    tiny_diffusers._randomize_zero_init(vae)
    vae.save_pretrained(str(src / "vae"), safe_serialization=True)
    pipe = FluxPipeline(**{**base.components, "vae": vae})
    pipe.set_progress_bar_config(disable=True)
    dst = tmp_path_factory.mktemp("flux-vae4-dst") / "model"
    convert_model(src, dst, dtype="float32", progress=False)
    manifest = read_manifest(dst)
    assert capabilities(manifest).size_multiple == 8
    ours = DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False)

    width, height = 96, 64  # 24x16 latents, 12x8 packed tokens
    initial = np.random.default_rng(6).standard_normal((1, 16, height // 4, width // 4)).astype(np.float32)
    expected = pipe(PROMPT, num_inference_steps=3, height=height, width=width, latents=packed(initial),
                    guidance_scale=3.5, max_sequence_length=t5_length(manifest), output_type="np").images
    job = make_job(manifest, {"steps": 3, "width": width, "height": height})
    steps = []
    images = drive(ours.generate(job, ReplayNoise(initial, [])), steps.append)
    assert len(steps) == 3 and all(np.isfinite(np.array(step.x)).all() for step in steps)
    images[0].save(tmp_path / "flux.png")
    with Image.open(tmp_path / "flux.png") as png:
        assert png.size == (width, height)
    diff = mean_abs_diff(np.asarray(images[0], dtype=np.float64)[None] / 255, expected)
    print(f"FLUX dev, three-level autoencoder, 96x64: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE
