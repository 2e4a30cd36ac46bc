"""`max_sequence_length`: T5's tokens per prompt, set per request on a model with T5 (FLUX.1, SD3), as
diffusers' FluxPipeline and StableDiffusion3Pipeline take it.

The default is the model's own (its manifest's `max_length`: FLUX.1-dev 512, schnell 256, SD3 256); the most is
512 (both pipelines refuse more). SD3 converted without T5 takes it too, as diffusers' pipeline does with
text_encoder_3=None: it is the length of the zeros read in T5's place. A model without T5 (SD 1.x/2.x/XL) and a
value out of range are 400s naming the field. Both engines are compared with diffusers at a non-default length,
and the length is shown to change the image by more than the comparison tolerates (so it is not vacuous).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_flux
from api_server import live_server, request
from convert.model import convert_model
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.openapi import openapi_document
from mlx_sd_server.cli import build_parser
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.job import JobError, Limits, build_job, request_schema
from mlx_sd_server.registry import TINY_MODEL_NAME, ModelRegistry
from mlx_sd_server.store import FileStore
from test_flux_pipeline import HEIGHT, NEGATIVE, PROMPT, TOLERANCE, WIDTH, flux, make_job, noise, packed  # noqa: F401
from test_pipeline import ReplayNoise, mean_abs_diff, ours_image
from test_sd3_pipeline import LONG_PROMPT, sd3  # noqa: F401 - `sd3` is a fixture
from test_torch_engine_flux import engines  # noqa: F401 - a fixture

LENGTH = 32  # not any model's own; PROMPT is padded to it, LONG_PROMPT cut


# --- the field ---------------------------------------------------------------------------------------------


def test_the_request_schema_the_openapi_document_and_generate_list_it():
    field = request_schema()["max_sequence_length"]
    assert (field["type"], field["minimum"], field["maximum"]) == ("integer", 1, 512)
    assert "T5" in field["description"] and "default" not in field  # the model's, not the table's
    document = openapi_document(Limits())
    generations = document["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]
    edits = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert generations["application/json"]["schema"]["properties"]["max_sequence_length"] == field
    assert "max_sequence_length" in edits["multipart/form-data"]["schema"]["properties"]
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", "--max-sequence-length", "77"])
    assert args.max_sequence_length == 77


@pytest.mark.parametrize("variant, own", [("dev", 512), ("schnell", 256)])
def test_flux_defaults_to_its_own_length_and_takes_up_to_512(flux, variant, own):
    _, _, manifest = flux(variant)
    assert capabilities(manifest).text_length.default == own == manifest["components"]["text_encoder_2"]["max_length"]
    assert make_job(manifest, {}).max_sequence_length == own
    assert make_job(manifest, {"max_sequence_length": "512"}).max_sequence_length == 512  # schnell too, as diffusers
    assert make_job(manifest, {"max_sequence_length": 1}).max_sequence_length == 1
    for value, code in ((0, "out_of_range"), (513, "out_of_range"), (-5, "out_of_range"), (10**30, "out_of_range"),
                        ("many", "invalid_type"), (128.5, "invalid_type"), (True, "invalid_type")):
        with pytest.raises(JobError) as error:
            make_job(manifest, {"max_sequence_length": value})
        assert (error.value.param, error.value.code, error.value.status) == ("max_sequence_length", code, 400), value


def test_a_model_without_t5_refuses_it(tmp_path):
    from mlx_sd_server.engine.model_io import read_manifest
    from mlx_sd_server.engine.tiny import ensure_tiny_model

    sd = capabilities(read_manifest(ensure_tiny_model(tmp_path / "tiny")))
    assert sd.text_length is None
    assert build_job({"prompt": "x"}, capabilities=sd).max_sequence_length is None
    for value in (128, "128", 0):
        with pytest.raises(JobError) as error:
            build_job({"prompt": "x", "max_sequence_length": value}, capabilities=sd, model_name="sd-tiny")
        assert (error.value.param, error.value.code) == ("max_sequence_length", "unsupported_parameter")
        assert "T5" in error.value.message


# --- the MLX engine against diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_matches_diffusers_at_another_length(flux, variant):
    """A prompt longer than the length: cut there, as diffusers cuts it."""
    pipe, ours, manifest = flux(variant)
    assert len(ours.model.tokenizers["text_encoder_2"].tokenize(LONG_PROMPT)) > LENGTH
    initial = noise(seed=7)
    extra = {"guidance_scale": 3.5} if variant == "dev" else {}
    expected = pipe(LONG_PROMPT, num_inference_steps=3, height=HEIGHT, width=WIDTH, latents=packed(initial),
                    max_sequence_length=LENGTH, output_type="np", **extra).images
    fields = {"prompt": LONG_PROMPT, "steps": 3, "width": WIDTH, "height": HEIGHT}
    job = make_job(manifest, {**fields, "max_sequence_length": LENGTH})
    assert ours.encode_prompts(job, guided=False).context.shape[1] == LENGTH
    image = ours_image(ours, job, ReplayNoise(initial, []))
    diff = mean_abs_diff(image, expected)
    change = np.abs(image - ours_image(ours, make_job(manifest, fields), ReplayNoise(initial, []))).mean()
    print(f"FLUX {variant} at {LENGTH} T5 tokens: mean abs diff {diff:.2e}; vs its own length {change * 255:.1f}/255")
    assert diff <= TOLERANCE < change


@pytest.mark.parametrize("variant", ["sd3", "sd3-no-t5"])
def test_sd3_matches_diffusers_at_another_length(sd3, variant):
    """With T5, its states are cut/padded to the length; without, diffusers reads that many zeros (and so do we)."""
    pipe, ours, manifest = sd3(variant)
    initial = noise(seed=8)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, num_inference_steps=3, height=HEIGHT,
                    width=WIDTH, latents=torch.from_numpy(initial), max_sequence_length=LENGTH,
                    output_type="np").images
    fields = {"steps": 3, "cfg_scale": 4.0, "negative_prompt": NEGATIVE, "width": WIDTH, "height": HEIGHT}
    assert make_job(manifest, fields).max_sequence_length == 256  # the model's own (SD3's pipelines' default)
    job = make_job(manifest, {**fields, "max_sequence_length": LENGTH})
    assert ours.encode_prompts(job, guided=True).context.shape[1] == 77 + LENGTH
    image = ours_image(ours, job, ReplayNoise(initial, []))
    diff = mean_abs_diff(image, expected)
    own = ours_image(ours, make_job(manifest, fields), ReplayNoise(initial, []))
    change = np.abs(image - own).mean()
    print(f"SD3 ({variant}) at {LENGTH} T5 tokens: mean abs diff {diff:.2e}; vs 256: {change * 255:.1f}/255")
    assert diff <= TOLERANCE < change


# --- the torch engine ----------------------------------------------------------------------------------------


def test_the_torch_engine_honours_it(engines):
    """diffusers' FluxPipeline run by the fallback engine at the job's length agrees with the MLX engine there,
    and differs from its own run at the model's length."""
    _, ours, fallback, manifest = engines("schnell")
    initial = noise(seed=1)
    size = {"steps": 3, "width": WIDTH, "height": HEIGHT}
    job = make_job(manifest, {**size, "max_sequence_length": LENGTH})
    got = ours_image(fallback, job, ReplayNoise(initial, []))
    diff = mean_abs_diff(got, ours_image(ours, job, ReplayNoise(initial, [])))
    change = np.abs(got - ours_image(fallback, make_job(manifest, size), ReplayNoise(initial, []))).mean()
    print(f"torch engine vs MLX, FLUX schnell at {LENGTH} T5 tokens: mean abs diff {diff:.2e}; "
          f"vs its own length {change * 255:.1f}/255")
    assert diff <= TOLERANCE < change


# --- over HTTP -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_t5_length")
    tiny_flux.make_pipeline(root / "src", "schnell")
    convert_model(root / "src", root / "models" / "flux-schnell-tiny", dtype="float32", progress=False)
    registry = ModelRegistry([TINY_MODEL_NAME, "flux-schnell-tiny"], root / "models")
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def post(url: str, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(),
                   {"Content-Type": "application/json"})


def test_models_list_their_length(server):
    models = {m["id"]: m for m in request(server, "GET", "/v1/models").json()["data"]}
    assert models["flux-schnell-tiny"]["max_sequence_length"] == {"default": 256, "maximum": 512}
    assert models[TINY_MODEL_NAME]["max_sequence_length"] is None


def test_a_flux_request_takes_it(server):
    reply = post(server, model="flux-schnell-tiny", prompt="a cat", size="64x64", steps=1, max_sequence_length=64)
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("fields, code", [
    ({"model": TINY_MODEL_NAME, "max_sequence_length": 128}, "unsupported_parameter"),
    ({"model": "flux-schnell-tiny", "max_sequence_length": 513}, "out_of_range"),
    ({"model": "flux-schnell-tiny", "max_sequence_length": 0}, "out_of_range"),
    ({"model": "flux-schnell-tiny", "max_sequence_length": "x"}, "invalid_type"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(server, fields, code):
    reply = post(server, prompt="a cat", size="64x64", steps=1, **fields)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == ("max_sequence_length", code), error
