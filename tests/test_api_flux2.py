"""A tiny FLUX.2 klein (distilled) served over HTTP: README's curl request, the `openai` SDK (b64 and url), its
defaults in the PNG, /v1/models; LoRAs from the LoRA folder (ai-toolkit's BFL layout, kohya's, PEFT's) by tag and
by field, listed with their family by GET /v1/loras, and a LoRA of another family refused before queueing."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess

import openai
import pytest
from PIL import Image

import lora_files
import tiny_flux
import tiny_flux2
from api_server import live_server, request
from convert.model import convert_model
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore

MODEL = "flux2-klein-tiny"
LORA = "klein-style"  # ai-toolkit's BFL names under diffusion_model.
FAST = {"size": "64x64", "steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_flux2")
    pipe = tiny_flux2.make_pipeline(root / "src")
    convert_model(root / "src", root / "models" / MODEL, dtype="float32", progress=False)
    loras = root / "loras"
    (loras / "styles").mkdir(parents=True)
    lora_files.write_lora(loras / f"{LORA}.safetensors", "flux2_bfl", {"transformer": pipe.transformer})
    lora_files.write_lora(loras / "styles" / "ink.safetensors", "flux2_kohya", {"transformer": pipe.transformer},
                          alpha=8.0, seed=1)
    lora_files.write_lora(loras / "detail.safetensors", "peft", {"transformer": pipe.transformer}, seed=2)
    lora_files.write_lora(loras / "flux1-style.safetensors", "flux_comfy",
                          {"transformer": tiny_flux.transformer(guidance=True)})
    registry = ModelRegistry([MODEL], root / "models", lora_dir=loras)
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def post(url: str, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(),
                   {"Content-Type": "application/json"})


def image_of(reply) -> Image.Image:
    assert reply.status == 200, reply.body
    return Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))


def test_klein_generates_a_png_with_its_defaults(server):
    image = image_of(post(server, model=MODEL, prompt="a cat", size="96x64", response_format="b64_json"))
    assert image.format == "PNG" and image.size == (96, 64)
    parameters = image.text["parameters"]
    assert "Steps: 4," in parameters and "CFG scale: 1" in parameters and "Sampler: Euler," in parameters


def test_klein_is_listed(server):
    reply = request(server, "GET", "/v1/models")
    assert reply.status == 200, reply.body
    [entry] = [m for m in reply.json()["data"] if m["id"] == MODEL]
    assert entry["family"] == "flux2"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_klein_answers_the_readme_curl_request(server, tmp_path):
    """README's request as is (the served model is the default), at a tiny size and step count."""
    body = json.loads(subprocess.run(
        ["curl", "-sS", "--fail-with-body", f"{server}/v1/images/generations", "-H", "Content-Type: application/json",
         "-d", '{"prompt": "a lovely cat", "size": "64x64", "steps": 2}'],
        check=True, capture_output=True, timeout=120).stdout)
    [item] = body["data"]
    assert item["prompt"] == "a lovely cat" and item["seed"] == 42
    subprocess.run(["curl", "-sS", "--fail-with-body", "-o", str(tmp_path / "cat.png"), item["url"]], check=True,
                   timeout=120)
    assert Image.open(tmp_path / "cat.png").size == (64, 64)


def test_klein_through_the_openai_sdk(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(model=MODEL, prompt=f"a lighthouse<lora:{LORA}:0.7>", n=2, size="64x64",
                                    response_format="b64_json", extra_body={"steps": 2, "seed": 5})
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [image.size for image in images] == [(64, 64)] * 2 and images[0].tobytes() != images[1].tobytes()
    assert "Seed: 5" in images[0].info["parameters"] and f'Lora hashes: "{LORA}: ' in images[0].info["parameters"]
    url = client.images.generate(model=MODEL, prompt="a lighthouse", size="64x64", response_format="url",
                                 extra_body={"steps": 2}).data[0].url
    downloaded = client._client.get(url)
    assert downloaded.status_code == 200 and Image.open(io.BytesIO(downloaded.content)).size == (64, 64)


@pytest.mark.parametrize("lora", [LORA, "styles/ink", "detail"])
def test_klein_loras_by_tag_and_by_field(server, lora):
    with_lora = image_of(post(server, model=MODEL, prompt=f"a cat<lora:{lora}:0.8>", response_format="b64_json",
                              **FAST))
    without = image_of(post(server, model=MODEL, prompt="a cat", response_format="b64_json", **FAST))
    by_field = image_of(post(server, model=MODEL, prompt="a cat", loras=[{"name": lora, "scale": 0.8}],
                             response_format="b64_json", **FAST))
    assert with_lora.tobytes() != without.tobytes() and by_field.tobytes() == with_lora.tobytes()


def test_klein_loras_are_listed_with_their_family(server):
    reply = request(server, "GET", "/v1/loras")
    assert reply.status == 200, reply.body
    listed = {item["id"]: item["family"] for item in reply.json()["data"]}
    assert listed == {LORA: "flux2", "styles/ink": "flux2", "detail": "flux2", "flux1-style": "flux"}


@pytest.mark.parametrize("fields, param, code, says", [
    ({"prompt": "a cat <lora:flux1-style:1>"}, "prompt", "lora_family_mismatch", "flux1-style"),
    ({"prompt": "a cat", "loras": [{"name": "nothing"}]}, "loras", "lora_not_found", "nothing"),
    ({"prompt": "a cat", "size": "72x64"}, "size", "invalid_size", "16"),
])
def test_what_klein_refuses_is_a_400(server, fields, param, code, says):
    reply = post(server, model=MODEL, steps=1, **fields)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and says in error["message"], error
