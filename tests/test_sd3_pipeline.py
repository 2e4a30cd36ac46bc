"""SD3/SD3.5 pipelines against diffusers on tiny random models, with identical injected noise.

txt2img against StableDiffusion3Pipeline (CFG with a negative prompt, and without CFG; a prompt longer than
CLIP's window), img2img against StableDiffusion3Img2ImgPipeline, inpainting against
StableDiffusion3InpaintPipeline, and a model converted without T5 against the pipeline with
text_encoder_3=None: final images within 1/255 mean absolute difference. Also: the converted components, the
schedule, emphasis, defaults and the capabilities an SD3 model declares.

Measured mean abs diffs: txt2img with CFG 3.6e-6 (sd3), 1.5e-6 (sd35-medium), 5.1e-6 (sd35-large); without CFG
3.1e-6; long prompt 2.2e-6; without T5 3.1e-6; img2img 1.5e-6; inpainting 4.9e-6 (strength 1), 3.1e-6 (0.75):
at most one channel value in ~800 one level apart.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_flux
import tiny_sd3
from convert.model import convert_model
from mlx_sd_server.engine.families.runtime import Settings
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.job import JobError
from parity import max_rel_err, nchw_to_nhwc
# the same 16-channel latents, sizes (80x64: 10x8 latents, 5x4 patches), prompts and job defaults as FLUX's tests
from test_flux_pipeline import HEIGHT, NEGATIVE, PROMPT, TOLERANCE, WIDTH, make_job, noise, vae_errors
from test_pipeline import (
    ReplayNoise, diffusers_noise, mean_abs_diff, ours_image, posterior_mode, sample_image, sample_mask,
)



@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """variant ("sd3", "sd35-medium", "sd35-large", or "sd3-no-t5") -> (diffusers pipeline, our pipeline,
    our manifest), built lazily."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            src = tmp_path_factory.mktemp(f"{variant}-src")
            t5 = variant != "sd3-no-t5"
            pipe = tiny_sd3.make_pipeline(src, variant if t5 else "sd3", t5=t5)
            dst = tmp_path_factory.mktemp(f"{variant}-dst") / "model"
            convert_model(src, dst, dtype="float32", progress=False)
            cache[variant] = (pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False),
                              read_manifest(dst))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["sd3", "sd35-medium", "sd35-large"])
def test_txt2img_with_cfg_matches_diffusers(sd3, variant):
    pipe, ours, manifest = sd3(variant)
    initial = noise()
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=4, height=HEIGHT,
                    width=WIDTH, latents=torch.from_numpy(initial), output_type="np").images
    job = make_job(manifest, {"steps": 4, "cfg_scale": 5.0, "negative_prompt": NEGATIVE, "width": WIDTH,
                              "height": HEIGHT})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"SD3 {variant} txt2img CFG 5: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


LONG_PROMPT = "a highly detailed photo of a cat sitting on a wooden table by the window, soft morning light, " * 3


@pytest.mark.parametrize("prompt, cfg_scale", [(PROMPT, 1.0), (LONG_PROMPT, 4.0)])
def test_txt2img_without_cfg_and_long_prompts_match_diffusers(sd3, prompt, cfg_scale):
    """cfg 1 runs the prompt alone; CFG with no negative prompt encodes "" (as diffusers); a prompt beyond
    CLIP's 77 tokens is cut to them, whole in T5's 256."""
    pipe, ours, manifest = sd3("sd35-large")
    assert prompt == PROMPT or len(ours.model.tokenizers["text_encoder"].tokenize(prompt)) > 77
    initial = noise(n=2, seed=1)
    expected = pipe(prompt, guidance_scale=cfg_scale, num_inference_steps=3, num_images_per_prompt=2, height=HEIGHT,
                    width=WIDTH, latents=torch.from_numpy(initial), output_type="np").images
    job = make_job(manifest, {"prompt": prompt, "steps": 3, "cfg_scale": cfg_scale, "n": 2, "width": WIDTH,
                              "height": HEIGHT})
    assert ours.family.guided(Settings.of(job)) == (cfg_scale > 1)
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"SD3.5-large txt2img cfg {cfg_scale}, {len(prompt)} characters: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_without_t5_matches_diffusers(sd3):
    """A folder saved with text_encoder_3=None converts to a model without T5, which reads zeros in its place."""
    pipe, ours, manifest = sd3("sd3-no-t5")
    assert "text_encoder_3" not in manifest["components"] and len(ours.model.text_encoders) == 2
    initial = noise(seed=2)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, num_inference_steps=4, height=HEIGHT,
                    width=WIDTH, latents=torch.from_numpy(initial), output_type="np").images
    job = make_job(manifest, {"steps": 4, "cfg_scale": 4.0, "negative_prompt": NEGATIVE, "width": WIDTH,
                              "height": HEIGHT})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"SD3 without T5 txt2img: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_a_folder_missing_its_t5_converts_without_it(sd3, tmp_path):
    """Users leave the T5 (~9 GB) out of a download: a model_index naming a missing text_encoder_3 converts too."""
    pipe, _, _ = sd3("sd3")
    src = tmp_path / "src"
    pipe.save_pretrained(str(src), safe_serialization=True)
    shutil.rmtree(src / "text_encoder_3")
    assert json.loads((src / "model_index.json").read_text())["text_encoder_3"][0] is not None
    manifest = read_manifest(convert_model(src, tmp_path / "model", dtype="float32", progress=False))
    assert [n for n in manifest["components"] if n.startswith("text_encoder")] == ["text_encoder", "text_encoder_2"]


def test_no_t5_leaves_a_models_t5_out(sd3, tmp_path):
    """`convert --no-t5` (for small machines): the full model converts without T5, and generates as diffusers'
    pipeline does with text_encoder_3=None; a model that needs its T5 (FLUX) refuses it."""
    from diffusers import StableDiffusion3Pipeline

    from mlx_sd_server.cli import main

    pipe, _, _ = sd3("sd3")
    src = tmp_path / "src"
    pipe.save_pretrained(str(src), safe_serialization=True)
    models = tmp_path / "models"
    assert main(["convert", str(src), "no-t5", "--no-t5", "--dtype", "float32", "--model-dir", str(models)]) == 0
    manifest = read_manifest(models / "no-t5")
    assert "text_encoder_3" not in manifest["components"] and not (models / "no-t5" / "tokenizer_3").exists()
    reference = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=4)
    expected = reference(PROMPT, guidance_scale=3.0, num_inference_steps=3, height=HEIGHT, width=WIDTH,
                         latents=torch.from_numpy(initial), output_type="np").images
    ours = DiffusionPipeline(load_model(models / "no-t5", dtype="float32"), paste_back=False)
    job = make_job(manifest, {"steps": 3, "cfg_scale": 3.0, "width": WIDTH, "height": HEIGHT})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"SD3 converted with --no-t5: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    flux_src = tmp_path / "flux"
    tiny_flux.make_pipeline(flux_src, "schnell")
    with pytest.raises(ValueError, match="only SD3"):
        convert_model(flux_src, tmp_path / "flux-out", with_t5=False, progress=False)


def test_img2img_matches_diffusers(sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe, ours, manifest = sd3("sd35-medium")
    reference = StableDiffusion3Img2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=3)
    image = sample_image().resize((WIDTH, HEIGHT))
    module = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img"
    with posterior_mode(module), diffusers_noise([initial], module):
        expected = reference(PROMPT, image=image, strength=0.5, negative_prompt=NEGATIVE, guidance_scale=4.0,
                             num_inference_steps=6, height=HEIGHT, width=WIDTH, output_type="np").images
    job = make_job(manifest, {"steps": 6, "strength": 0.5, "cfg_scale": 4.0, "negative_prompt": NEGATIVE,
                              "width": WIDTH, "height": HEIGHT}, {"image": image})
    assert ours.total_steps(job) == 3
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"SD3.5-medium img2img strength 0.5: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_matches_diffusers(sd3, strength):
    """SD3's inpainting pipeline with the regular transformer blends the known latents back after every step,
    as ours does. Its final latents are compared decoded as the other SD3 pipelines decode them: diffusers
    0.42's inpainting pipeline leaves out the VAE's shift_factor there (huggingface/diffusers#13611, issue 1),
    which alone moves its images by ~1.2/255 on average here."""
    from diffusers import StableDiffusion3InpaintPipeline

    pipe, ours, manifest = sd3("sd3")
    reference = StableDiffusion3InpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    initial = noise(seed=4)
    image, mask = sample_image().resize((WIDTH, HEIGHT)), sample_mask().crop((0, 0, WIDTH, HEIGHT))  # black beyond
    module = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint"
    with posterior_mode(module), diffusers_noise([initial], module):
        latents = reference(PROMPT, image=image, mask_image=mask, strength=strength, guidance_scale=4.0,
                            num_inference_steps=4, height=HEIGHT, width=WIDTH, output_type="latent").images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    expected = pipe.image_processor.postprocess(decoded, output_type="np")
    job = make_job(manifest, {"steps": 4, "strength": strength, "cfg_scale": 4.0, "width": WIDTH, "height": HEIGHT},
                   {"image": image, "mask": mask})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"SD3 inpainting strength {strength}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_prompt_and_guidance_change_the_image(sd3):
    """The tiny models are random enough that what parity checks matters: the prompt and CFG move the image."""
    _, ours, manifest = sd3("sd3")
    initial = noise(seed=5)

    def image(fields: dict) -> np.ndarray:
        job = make_job(manifest, {"steps": 3, "width": WIDTH, "height": HEIGHT, **fields})
        return ours_image(ours, job, ReplayNoise(initial, []))

    base = image({"cfg_scale": 1.0})
    prompt_effect = np.abs(image({"cfg_scale": 1.0, "prompt": "a red car"}) - base).mean()
    cfg_effect = np.abs(image({"cfg_scale": 5.0}) - base).mean()
    print(f"SD3 mean abs change: prompt {prompt_effect * 255:.1f}/255, CFG 5 {cfg_effect * 255:.1f}/255")
    assert prompt_effect > 4 / 255 and cfg_effect > 4 / 255


@pytest.mark.parametrize("scheduler", ["discrete", "karras", "exponential"])
def test_schedule_matches_the_scheduler_defaults(scheduler):
    """The SD3 pipelines pass no sigmas: FlowMatchEulerDiscreteScheduler spaces them itself, from 1 to its
    smallest (shifted) training sigma, not to 1/steps as the FLUX pipelines pass them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    options = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
    reference = FlowMatchEulerDiscreteScheduler(**tiny_sd3.SCHEDULER, **options.get(scheduler, {}))
    reference.set_timesteps(7)
    ours = flow_sigmas(scheduler, 7, tiny_sd3.SCHEDULER, 4096, scheduler_spacing=True)
    np.testing.assert_allclose(ours, reference.sigmas.numpy(), rtol=1e-6, atol=1e-7)


def test_emphasis_weights_clip_and_t5_states(sd3):
    """A1111 emphasis scales each encoder's states (then restores their mean, as on SD); weight 1 and BREAK (a
    word break here) leave the plain prompt's conditioning exactly."""
    _, ours, manifest = sd3("sd3")

    def context(prompt: str) -> np.ndarray:
        job = make_job(manifest, {"prompt": prompt, "width": WIDTH, "height": HEIGHT, "cfg_scale": 1.0})
        return np.array(ours.encode_prompts(job, guided=False).context[0])

    plain = context("a photo of a cat")
    assert np.array_equal(context("(a photo:1.0) of a cat"), plain)
    assert np.array_equal(context("a photo BREAK of a cat"), plain)
    ratio = context("(a photo:1.5) of a cat") / np.where(plain == 0, 1, plain)
    clip_l, t5 = ours.model.tokenizers["text_encoder"], ours.model.tokenizers["text_encoder_3"]
    for start, count, width in ((1, len(clip_l.tokenize("a photo")), 32), (77, len(t5.tokenize("a photo")), 80)):
        restore = ratio[start + count, 0]  # the mean correction every token of this encoder gets
        np.testing.assert_allclose(ratio[start : start + count, :width], 1.5 * restore, rtol=1e-4)
        assert abs(restore - 1) > 1e-4


def test_converted_components_match_diffusers(sd3):
    """Each converted component against its diffusers/transformers module: both CLIPs' penultimate states and
    projections, T5's states, the transformer's velocity, the 16-channel VAE both ways."""
    pipe, ours, _ = sd3("sd35-medium")
    model = ours.model
    rng = np.random.default_rng(6)
    errors = {}
    clips = (("text_encoder", pipe.tokenizer, pipe.text_encoder),
             ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2))
    for i, (name, tokenizer, encoder) in enumerate(clips):
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert ids[0].tolist() == model.tokenizers[name].encode(PROMPT)
        with torch.no_grad():
            expected = encoder(ids, output_hidden_states=True)
        got = model.text_encoders[name](mx.array(ids.numpy()))
        errors[f"clip {i + 1} states"] = max_rel_err(got.hidden_states[-2], expected.hidden_states[-2])
        errors[f"clip {i + 1} projection"] = max_rel_err(got.text_embeds, expected.text_embeds)
    t5_ids = pipe.tokenizer_3(PROMPT, padding="max_length", max_length=256, return_tensors="pt").input_ids
    assert t5_ids[0].tolist() == model.tokenizers["text_encoder_3"].encode(PROMPT, 256)
    with torch.no_grad():
        expected = pipe.text_encoder_3(t5_ids)[0]
    errors["t5"] = max_rel_err(model.text_encoders["text_encoder_3"](mx.array(t5_ids.numpy())), expected)

    latents = rng.standard_normal((2, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    context = rng.standard_normal((2, 9, tiny_sd3.T5_WIDTH)).astype(np.float32)
    pooled = rng.standard_normal((2, 64)).astype(np.float32)
    sigma = np.array([1.0, 0.3217], np.float32)
    with torch.no_grad():
        expected = pipe.transformer(
            hidden_states=torch.from_numpy(latents), encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigma) * 1000, return_dict=False,
        )[0]
    got = model.components["transformer"](mx.array(latents.transpose(0, 2, 3, 1)), mx.array(context),
                                          mx.array(pooled), mx.array(sigma))
    errors["transformer"] = max_rel_err(got, nchw_to_nhwc(expected))

    errors.update(vae_errors(pipe, model, rng))
    assert (model.vae.scaling_factor, model.vae.shift_factor) == (1.5305, 0.0609)
    print("SD3.5-medium components, max rel err:", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= 1e-4


@pytest.mark.parametrize("variant, name, expected", [
    ("sd3", "sd3-medium", {"steps": 28, "cfg_scale": 7.0}),
    ("sd35-medium", "sd3.5-medium", {"steps": 40, "cfg_scale": 4.5}),
    ("sd35-large", "sd3.5-large", {"steps": 28, "cfg_scale": 3.5}),
    ("sd35-large", "stable-diffusion-3.5-large-turbo", {"steps": 4, "cfg_scale": 1.0}),
])
def test_defaults_follow_the_release(variant, name, expected):
    from convert.model import model_defaults
    from mlx_sd_server.engine.source import SourceModel

    config = dict(tiny_sd3.transformer(variant).config)
    source = SourceModel(family="sd3", prediction_type="flow", scheduler={}, components={"transformer": (config, ())})
    assert model_defaults(source, name) == {**expected, "sample_method": "euler", "scheduler": "discrete",
                                            "width": 1024, "height": 1024}


def test_manifest_and_capabilities(sd3):
    _, ours, manifest = sd3("sd3")
    assert manifest["family"] == "sd3" and manifest["prediction_type"] == "flow"
    assert manifest["scheduler"]["shift"] == 3.0 and manifest["components"]["text_encoder_3"]["max_length"] == 256
    assert manifest["defaults"]["steps"] == 28 and manifest["defaults"]["cfg_scale"] == 7.0
    for fields, images, param in [
        ({"guidance": 3.5}, None, "guidance"),  # no distilled guidance embedding
        ({"width": 72, "height": 64}, None, "width"),  # 2x2 patches of 8-pixel latents: multiples of 16
        ({"scheduler": "ays"}, None, "scheduler"),
        ({"sample_method": "dpm++2mv2"}, None, "sample_method"),  # does not converge on flow schedules
        ({"width": WIDTH, "height": HEIGHT}, {"control_image": sample_image()}, "control_image"),
    ]:
        with pytest.raises(JobError) as error:
            make_job(manifest, fields, images)
        assert error.value.param == param
    # The position table covers 12 patches a side: 192 pixels here (3072 on the released models).
    with pytest.raises(JobError) as error:  # refused by build_job, before the queue
        ours.total_steps(make_job(manifest, {"width": 208, "height": 64}))
    assert error.value.param == "size" and "192" in error.value.message


@pytest.mark.parametrize("sample_method", ["euler_a", "heun", "dpm++2m", "lcm"])
def test_other_samplers_run(sd3, sample_method):
    _, ours, manifest = sd3("sd3")
    job = make_job(manifest, {"steps": 3, "width": WIDTH, "height": HEIGHT, "sample_method": sample_method, "n": 2,
                              "cfg_scale": 2.0})
    images = ours_image(ours, job, None)
    assert images.shape == (2, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


def test_torch_engine_refuses_sd3(sd3):
    from mlx_sd_server.torch_engine import TorchPipeline

    _, ours, _ = sd3("sd3")
    with pytest.raises(ValueError, match="sd3 models"):
        TorchPipeline.from_folder(ours.model.folder)
