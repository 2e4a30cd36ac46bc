"""A FLUX model served beside an SD model over HTTP: defaults, `guidance`, and what each model refuses (400
before queueing) as the capabilities its family declares."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

import tiny_flux
from api_server import live_server, multipart, request
from convert.model import convert_model
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import TINY_MODEL_NAME, ModelRegistry
from mlx_sd_server.store import FileStore


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_flux")
    tiny_flux.make_pipeline(root / "src", "dev")
    convert_model(root / "src", root / "models" / "flux-dev-tiny", dtype="float32", progress=False)
    registry = ModelRegistry([TINY_MODEL_NAME, "flux-dev-tiny"], root / "models")
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(url: str, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(),
                   {"Content-Type": "application/json"})


def test_flux_generates_with_its_defaults(server):
    reply = post(server, model="flux-dev-tiny", prompt="a cat", size="64x64", steps=2, response_format="b64_json")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["model"] == "flux-dev-tiny"
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    parameters = image.text["parameters"]
    assert "CFG scale: 1" in parameters and "Distilled CFG Scale: 3.5" in parameters and "Sampler: Euler," in parameters
    reply = post(server, model="flux-dev-tiny", prompt="a cat", size="64x64", steps=1, guidance=5.5, cfg_scale=2.0,
                 negative_prompt="a dog", response_format="b64_json")
    assert reply.status == 200, reply.body


def test_flux_edits_with_a_mask(server):
    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image, "PNG")
    Image.new("L", (64, 64), 255).save(mask, "PNG")
    body, content_type = multipart({"model": "flux-dev-tiny", "prompt": "a cat", "steps": "2", "size": "64x64",
                                    "image": ("i.png", image.getvalue()), "mask": ("m.png", mask.getvalue())})
    reply = request(server, "POST", "/v1/images/edits", body, {"Content-Type": content_type})
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("fields, param, code", [
    ({"model": TINY_MODEL_NAME, "guidance": 2.0}, "guidance", "unsupported_parameter"),
    ({"model": "flux-dev-tiny", "size": "72x64"}, "size", "invalid_size"),
    ({"model": "flux-dev-tiny", "scheduler": "ays"}, "scheduler", "unsupported_scheduler"),
    ({"model": "flux-dev-tiny", "guidance": -1}, "guidance", "out_of_range"),
    ({"model": "flux-dev-tiny", "control_image": png_data_url()}, "control_image", "controlnet_unavailable"),
])
def test_what_a_model_cannot_do_is_a_400(server, fields, param, code):
    reply = post(server, prompt="a cat", steps=1, **fields)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
