"""LoRAs over HTTP: the reference's FLUX LoRA example (`--lora-model-dir lora-models`, an XLabs LoRA converted
by ComfyUI, `<lora:realism_lora_comfy_converted:1>` at the end of the prompt), `GET /v1/loras`, the `loras`
field, and the 400s."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

import lora_files
import tiny_diffusers
import tiny_flux
from api_server import live_server, request
from convert.model import convert_model
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore

LORA = "realism_lora_comfy_converted"
# The reference's request (docs: FLUX.1-dev with LoRA), at a tiny model's size and step count.
REFERENCE_REQUEST = {"model": "flux1-dev", "prompt": f"4 marbles on a table, hyper realistic<lora:{LORA}:1>",
                     "cfg_scale": 1.0, "sample_method": "euler", "steps": 2, "size": "64x64",
                     "response_format": "b64_json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_lora")
    pipe = tiny_flux.make_pipeline(root / "src", "dev")
    convert_model(root / "src", root / "models" / "flux-dev-tiny", dtype="float32", progress=False)
    loras = root / "lora-models"
    loras.mkdir()
    lora_files.write_lora(loras / f"{LORA}.safetensors", "flux_comfy", {"transformer": pipe.transformer}, alpha=8.0)
    (loras / "styles").mkdir()
    lora_files.write_lora(loras / "styles" / "ink.safetensors", "peft", {"transformer": pipe.transformer}, seed=1)
    lora_files.write_lora(loras / "sd-detail.safetensors", "kohya", {"unet": tiny_diffusers.unet("sd1")})
    lora_files.write_lora(loras / "loha.safetensors", "loha", {"transformer": pipe.transformer})
    registry = ModelRegistry(["flux-dev-tiny"], root / "models", model_name="flux1-dev", lora_dir=loras)
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def post(url: str, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(),
                   {"Content-Type": "application/json"})


def image_of(reply) -> Image.Image:
    assert reply.status == 200, reply.body
    return Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))


def test_the_reference_flux_lora_example(server):
    with_lora = image_of(post(server, **REFERENCE_REQUEST))
    without = image_of(post(server, **{**REFERENCE_REQUEST, "prompt": "4 marbles on a table, hyper realistic"}))
    assert with_lora.tobytes() != without.tobytes()
    parameters = with_lora.text["parameters"]
    assert parameters.startswith(f"4 marbles on a table, hyper realistic <lora:{LORA}:1>\n")
    assert f'Lora hashes: "{LORA}: ' in parameters and "Lora hashes" not in without.text["parameters"]
    # the same LoRA from the structured field: the same image
    by_field = image_of(post(server, **{**REFERENCE_REQUEST, "prompt": "4 marbles on a table, hyper realistic",
                                        "loras": [{"name": LORA, "scale": 1}]}))
    assert by_field.tobytes() == with_lora.tobytes()


def test_get_loras_lists_the_usable_ones_with_their_family(server):
    reply = request(server, "GET", "/v1/loras")
    assert reply.status == 200
    listed = {item["id"]: item for item in reply.json()["data"]}
    assert set(listed) == {LORA, "styles/ink", "sd-detail"}  # the LoHa is not a LoRA this server applies
    assert listed[LORA]["family"] == "flux" and listed["sd-detail"]["family"] == "sd1"
    assert listed[LORA]["object"] == "lora" and listed[LORA]["bytes"] > 0


def test_two_loras_and_a_negative_weight(server):
    reply = post(server, **{**REFERENCE_REQUEST, "prompt": f"a cat <lora:{LORA}:0.7>",
                            "loras": [{"name": "styles/ink", "scale": -0.5}]})
    assert 'Lora hashes: "realism_lora_comfy_converted: ' in image_of(reply).text["parameters"]


@pytest.mark.parametrize("fields, param, code, named", [
    ({"prompt": "a cat <lora:nothing:1>"}, "prompt", "lora_not_found", "nothing"),
    ({"prompt": "a cat <lora:sd-detail:1>"}, "prompt", "lora_family_mismatch", "sd-detail"),
    ({"prompt": "a cat", "loras": [{"name": "loha"}]}, "loras", "invalid_lora", "LoHa"),
    ({"prompt": "a cat", "loras": [{"name": LORA, "scale": 99}]}, "loras", "out_of_range", LORA),
])
def test_loras_that_cannot_be_used_are_400s_naming_them(server, fields, param, code, named):
    reply = post(server, **{**REFERENCE_REQUEST, **fields})
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and named in error["message"], error
