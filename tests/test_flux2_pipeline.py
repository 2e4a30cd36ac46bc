"""FLUX.2 klein against diffusers' Flux2KleinPipeline on a tiny random model, with identical injected noise.

Converted from a diffusers folder: the distilled model's txt2img at two sizes (one not square), the base
model's with CFG, within 1/255 mean absolute difference; the schedule (FLUX.2's empirical mu) and the
conditioning and latent space against diffusers' own functions; what klein refuses before a job is queued
(and at conversion); one HTTP request answered with a PNG. Its edits (reference images, inpainting) are in
test_flux2_references.py.
"""

from __future__ import annotations

import base64
import io
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_flux2
from api_server import live_server, request
from convert.model import convert_model
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.runtime import Settings
from mlx_sd_server.engine.families.spec import Capabilities
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.engine.sampling.schedules import flow_sigmas
from mlx_sd_server.engine.source import CheckpointError
from mlx_sd_server.job import JobError, ModelDefaults, build_job
from parity import max_rel_err, nchw_to_nhwc
from test_pipeline import ReplayNoise, mean_abs_diff, ours_image, sample_image

PROMPT = "a photo of a cat"
TOLERANCE = 1 / 255
WIDTH, HEIGHT = 96, 64  # non-square: 6x4 tokens of 2x2 latent pixels at 1/8


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """"distilled" | "base" -> (diffusers pipeline, our pipeline, our manifest), built lazily: the same weights,
    model_index.json's is_distilled tells them apart."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            src = tmp_path_factory.mktemp(f"flux2-{variant}-src")
            pipe = tiny_flux2.make_pipeline(src, distilled=variant == "distilled")
            dst = tmp_path_factory.mktemp(f"flux2-{variant}-dst") / "model"
            convert_model(src, dst, dtype="float32", progress=False)
            cache[variant] = (pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False),
                              read_manifest(dst))
        return cache[variant]

    return get


def make_job(manifest: dict, fields: dict, images: dict | None = None, caps: Capabilities | None = None):
    return build_job({"prompt": PROMPT, **fields}, images, defaults=ModelDefaults(**manifest["defaults"]),
                     capabilities=caps or capabilities(manifest))


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Noise in the transformer's latent space, NCHW as diffusers takes `latents`: 128 channels at 1/16."""
    return np.random.default_rng(seed).standard_normal((1, 128, height // 16, width // 16)).astype(np.float32)


def reference(pipe, width: int, height: int, initial: np.ndarray, **options) -> np.ndarray:
    return pipe(prompt=PROMPT, height=height, width=width, latents=torch.from_numpy(initial), output_type="np",
                **options).images


@pytest.mark.parametrize("width, height", [(WIDTH, HEIGHT), (64, 80)])
def test_distilled_txt2img_matches_diffusers(klein, width, height):
    pipe, ours, manifest = klein("distilled")
    assert manifest["pipeline"] == {"is_distilled": True}
    assert manifest["defaults"] == {"steps": 4, "cfg_scale": 1.0, "sample_method": "euler", "scheduler": "discrete",
                                    "width": 1024, "height": 1024}
    initial = noise(width, height)
    expected = reference(pipe, width, height, initial, num_inference_steps=4, guidance_scale=1.0)
    job = make_job(manifest, {"width": width, "height": height})  # the manifest's defaults: 4 steps, euler
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX.2 klein distilled txt2img {width}x{height}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    # A distilled model ignores cfg_scale, as diffusers ignores guidance_scale there.
    ignored = make_job(manifest, {"width": width, "height": height, "cfg_scale": 4.0})
    assert not ours.family.guided(Settings.of(ignored))


def test_base_with_cfg_matches_diffusers(klein):
    pipe, ours, manifest = klein("base")
    assert manifest["pipeline"] == {"is_distilled": False}
    assert (manifest["defaults"]["steps"], manifest["defaults"]["cfg_scale"]) == (50, 4.0)
    initial = noise(WIDTH, HEIGHT, seed=1)
    expected = reference(pipe, WIDTH, HEIGHT, initial, num_inference_steps=5, guidance_scale=4.0)
    job = make_job(manifest, {"steps": 5, "width": WIDTH, "height": HEIGHT})  # cfg 4 from the manifest
    assert ours.family.guided(Settings.of(job))
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX.2 klein base, CFG 4, {WIDTH}x{HEIGHT}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("tokens, steps", [(24, 4), (4096, 50), (4624, 28)])  # (above 4300: one line)
def test_schedule_is_flux2s_empirical_shift(klein, tokens, steps):
    """The converted model's schedule (its manifest's settings, the spec's `mu_rule`) against the scheduler
    given the pipeline's sigmas and compute_empirical_mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    _, _, manifest = klein("distilled")
    assert manifest["scheduler"]["mu_rule"] == "empirical"
    scheduler = FlowMatchEulerDiscreteScheduler(**tiny_flux2.SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    ours = flow_sigmas("discrete", steps, manifest["scheduler"], tokens)
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), atol=1e-6)


def test_conditioning_and_latent_space_match_diffusers(klein):
    """Qwen3's stacked states (9, 18, 27 of the chat-templated prompt, 512 tokens) against the pipeline's
    `_get_qwen3_prompt_embeds`; the autoencoder's latent space against `_encode_vae_image` (posterior mean,
    patchified, normalised) and its inverse before decoding."""
    from diffusers import Flux2KleinPipeline

    pipe, ours, manifest = klein("distilled")
    with torch.no_grad():
        expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, ["a dog", PROMPT])
    job = make_job(manifest, {"width": WIDTH, "height": HEIGHT, "negative_prompt": "a dog"})  # [negative, prompt]
    errors = {"qwen3 states": max_rel_err(ours.encode_prompts(job, guided=True), expected)}

    pixels = np.asarray(sample_image().resize((WIDTH, HEIGHT)), dtype=np.float32) / 255
    image = torch.from_numpy(pixels.transpose(2, 0, 1)[None] * 2 - 1)
    with torch.no_grad():
        latents = pipe._encode_vae_image(image, generator=None)
        bn = pipe.vae.bn
        z = Flux2KleinPipeline._unpatchify_latents(
            latents * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
            + bn.running_mean.view(1, -1, 1, 1))
    ours_latents = ours.encode_image(pixels)
    assert ours_latents.shape == ours.model.vae.latent_shape(1, HEIGHT, WIDTH) == (1, 4, 6, 128)
    errors["latent space"] = max_rel_err(ours_latents, nchw_to_nhwc(latents))
    errors["from latents"] = max_rel_err(ours.model.vae.from_latents(mx.array(nchw_to_nhwc(latents))), nchw_to_nhwc(z))
    print("FLUX.2 klein conditioning and latents, max rel err:", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= 1e-4


def test_shared_pipeline_encodes_and_decodes_through_the_latent_space(klein):
    """img2img at strength 0 (klein has no img2img without a mask: see the spec) runs no step: the image
    comes back through the autoencoder's latent space, as diffusers' VAE gives it back from its posterior mean."""
    pipe, ours, manifest = klein("distilled")
    image = sample_image().resize((WIDTH, HEIGHT))
    job = make_job(manifest, {"width": WIDTH, "height": HEIGHT, "strength": 0.0}, {"image": image},
                   caps=Capabilities(family="flux2"))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    with torch.no_grad():
        expected = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(noise(WIDTH, HEIGHT), [])),
                         nchw_to_nhwc(expected) / 2 + 0.5)
    print(f"FLUX.2 klein image through the latent space: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_emphasis_weights_the_stacked_states(klein):
    _, ours, manifest = klein("distilled")

    def states(prompt: str) -> np.ndarray:
        return np.array(ours.encode_prompts(make_job(manifest, {"prompt": prompt}), guided=False)[0])

    plain = states(PROMPT)
    assert np.array_equal(states("(a photo:1.0) of a cat"), plain)
    assert not np.allclose(states("(a photo:1.5) of a cat"), plain)


@pytest.mark.parametrize("fields, images, param", [
    ({"strength": 0.5}, {"image": "image"}, "strength"),  # no img2img: an image alone is a reference
    ({"guidance": 3.5}, None, "guidance"),  # no guidance embedding
    ({"max_sequence_length": 256}, None, "max_sequence_length"),  # Qwen3 reads 512 tokens
    ({"width": 72, "height": 64}, None, "width"),  # 2x2 patches of an 8x VAE: multiples of 16
    ({"scheduler": "ays"}, None, "scheduler"),
    ({"sample_method": "dpm++2mv2"}, None, "sample_method"),
    ({}, {"control_image": "image"}, "control_image"),
])
def test_what_klein_cannot_do_is_refused_before_queueing(klein, fields, images, param):
    _, _, manifest = klein("distilled")
    given = {name: sample_image() for name in images or {}}
    with pytest.raises(JobError) as error:
        make_job(manifest, fields, given)
    assert error.value.param == param


def test_conversion_refuses_flux2_dev_and_a_too_shallow_text_encoder():
    from mlx_sd_server.engine.families.flux2.spec import variant_of

    with pytest.raises(CheckpointError, match="guidance embedding"):
        variant_of("flux2", "flow", {"transformer": {"guidance_embeds": True}}, "flux2-dev")
    with pytest.raises(CheckpointError, match="hidden states"):
        variant_of("flux2", "flow", {"transformer": {"guidance_embeds": False},
                                     "text_encoder": {"num_hidden_layers": 12}}, "klein")
    klein_base = variant_of("flux2", "flow", {"transformer": {"guidance_embeds": False}}, "flux.2-klein-base-4b")
    assert klein_base.name == "base"


def test_http_request_returns_a_png(klein, tmp_path):
    from mlx_sd_server.api import Settings, create_app
    from mlx_sd_server.registry import ModelRegistry
    from mlx_sd_server.store import FileStore

    _, ours, _ = klein("distilled")
    registry = ModelRegistry(["model"], ours.model.folder.parent)  # the converted folder
    with live_server(create_app(registry, FileStore(tmp_path / "files"), Settings())) as url:
        body = json.dumps({"model": "model", "prompt": PROMPT, "size": f"{WIDTH}x{HEIGHT}", "steps": 2,
                           "response_format": "b64_json"}).encode()
        reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    data = base64.b64decode(reply.json()["data"][0]["b64_json"])
    assert data.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(data)) as png:
        assert png.size == (WIDTH, HEIGHT)
