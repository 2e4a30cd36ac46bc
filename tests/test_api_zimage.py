"""A tiny Z-Image served over HTTP: a PNG with its defaults in the metadata, an edit with a mask, /v1/models, and what
it refuses (400 before queueing) as the capabilities its family declares; README's curl request and the `openai`
SDK (b64 and url); LoRAs from the LoRA folder (ComfyUI's original layout and PEFT's), by tag and by field."""

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
import tiny_zimage
from api_server import live_server, multipart, request
from convert.model import convert_model
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore

MODEL = "z-image-turbo-tiny"
LORA = "zimage-comfy-style"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_zimage")
    pipe = tiny_zimage.make_pipeline(root / "src")
    convert_model(root / "src", root / "models" / MODEL, dtype="float32", progress=False)
    loras = root / "loras"
    loras.mkdir()
    lora_files.write_lora(loras / f"{LORA}.safetensors", "zimage_comfy", {"transformer": pipe.transformer}, alpha=8.0)
    (loras / "styles").mkdir()
    lora_files.write_lora(loras / "styles" / "ink.safetensors", "peft", {"transformer": pipe.transformer}, seed=1)
    lora_files.write_lora(loras / "flux-style.safetensors", "flux_comfy",
                          {"transformer": tiny_flux.transformer(guidance=True)})
    registry = ModelRegistry([MODEL], root / "models", lora_dir=loras)
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def post(url: str, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(),
                   {"Content-Type": "application/json"})


def test_zimage_generates_a_png_with_its_defaults(server):
    reply = post(server, model=MODEL, prompt="a cat", size="80x64", steps=2, response_format="b64_json")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["model"] == MODEL
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.format == "PNG" and image.size == (80, 64)
    parameters = image.text["parameters"]
    assert "CFG scale: 1" in parameters and "Sampler: Euler," in parameters  # Turbo's: no CFG
    reply = post(server, model=MODEL, prompt="a cat", negative_prompt="a dog", cfg_scale=3.0, size="64x64", steps=1,
                 response_format="b64_json")
    assert reply.status == 200, reply.body


def test_zimage_edits_with_a_mask(server):
    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image, "PNG")
    Image.new("L", (64, 64), 255).save(mask, "PNG")
    body, content_type = multipart({"model": MODEL, "prompt": "a cat", "steps": "2", "size": "64x64",
                                    "image": ("i.png", image.getvalue()), "mask": ("m.png", mask.getvalue())})
    reply = request(server, "POST", "/v1/images/edits", body, {"Content-Type": content_type})
    assert reply.status == 200, reply.body


def test_zimage_is_listed(server):
    reply = request(server, "GET", "/v1/models")
    assert reply.status == 200, reply.body
    [entry] = [m for m in reply.json()["data"] if m["id"] == MODEL]
    assert entry["family"] == "zimage"


@pytest.mark.parametrize("fields, param, code, says", [
    ({"size": "72x64"}, "size", "invalid_size", "16"),
    ({"guidance": 2.0}, "guidance", "unsupported_parameter", "no guidance embedding"),
    ({"scheduler": "ays"}, "scheduler", "unsupported_scheduler", "ays"),
    ({"loras": [{"name": "flux-style", "scale": 1.0}]}, "loras", "lora_family_mismatch", "flux-style"),
])
def test_what_zimage_cannot_do_is_a_400(server, fields, param, code, says):
    reply = post(server, model=MODEL, prompt="a cat", steps=1, **fields)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and says in error["message"], error


def image_of(reply) -> Image.Image:
    assert reply.status == 200, reply.body
    return Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))


def test_zimage_loras_by_tag_and_by_field(server):
    request_fields = {"model": MODEL, "size": "64x64", "steps": 2, "response_format": "b64_json"}
    with_lora = image_of(post(server, prompt=f"a cat<lora:{LORA}:0.8>", **request_fields))
    without = image_of(post(server, prompt="a cat", **request_fields))
    by_field = image_of(post(server, prompt="a cat", loras=[{"name": LORA, "scale": 0.8}], **request_fields))
    assert with_lora.tobytes() != without.tobytes() and by_field.tobytes() == with_lora.tobytes()
    assert f'Lora hashes: "{LORA}: ' in with_lora.text["parameters"]
    two = image_of(post(server, prompt=f"a cat<lora:{LORA}:0.8>", loras=[{"name": "styles/ink", "scale": -0.5}],
                        **request_fields))
    assert two.tobytes() != with_lora.tobytes()


def test_zimage_loras_are_listed_with_their_family(server):
    reply = request(server, "GET", "/v1/loras")
    assert reply.status == 200, reply.body
    listed = {item["id"]: item["family"] for item in reply.json()["data"]}
    assert listed == {LORA: "zimage", "styles/ink": "zimage", "flux-style": "flux"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_zimage_answers_the_readme_curl_request(server, tmp_path):
    """README's request as is (the served model is the default), at a tiny size and step count."""
    body = json.loads(subprocess.run(
        ["curl", "-sS", "--fail-with-body", f"{server}/v1/images/generations", "-H", "Content-Type: application/json",
         "-d", '{"prompt": "a lovely cat", "size": "64x64", "steps": 2}'],
        check=True, capture_output=True, timeout=120).stdout)
    [item] = body["data"]
    subprocess.run(["curl", "-sS", "--fail-with-body", "-o", str(tmp_path / "cat.png"), item["url"]], check=True,
                   timeout=120)
    assert Image.open(tmp_path / "cat.png").size == (64, 64)


def test_zimage_through_the_openai_sdk(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(model=MODEL, prompt=f"a lighthouse <lora:{LORA}:1>", size="64x64",
                                    response_format="b64_json", extra_body={"steps": 2, "seed": 5})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64) and "Seed: 5" in image.info["parameters"] and LORA in image.info["parameters"]
    by_url = client.images.generate(model=MODEL, prompt="a lighthouse", size="64x64", extra_body={"steps": 2},
                                    response_format="url").data[0].url
    downloaded = client._client.get(by_url)
    assert downloaded.status_code == 200 and Image.open(io.BytesIO(downloaded.content)).size == (64, 64)
