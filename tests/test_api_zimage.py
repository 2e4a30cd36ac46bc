"""A tiny Z-Image served over HTTP: a PNG with its defaults in the metadata, an edit with a mask, /v1/models, and what
it refuses (400 before queueing) as the capabilities its family declares."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

import tiny_zimage
from api_server import live_server, multipart, request
from convert.model import convert_model
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore

MODEL = "z-image-turbo-tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_zimage")
    tiny_zimage.make_pipeline(root / "src")
    convert_model(root / "src", root / "models" / MODEL, dtype="float32", progress=False)
    registry = ModelRegistry([MODEL], root / "models")
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
    ({"loras": [{"name": "x", "scale": 1.0}]}, "loras", "unsupported_parameter", "takes no LoRAs"),
])
def test_what_zimage_cannot_do_is_a_400(server, fields, param, code, says):
    reply = post(server, model=MODEL, prompt="a cat", steps=1, **fields)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and says in error["message"], error
