"""A tiny Qwen-Image served over HTTP: the README's curl request, a PNG with its defaults in the metadata, an edit
with a mask, what it refuses (400 before queueing), and a Lightning-style LoRA (named as lightx2v's, in ComfyUI's
layout) that changes the image and brings its own steps and no CFG."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess

import numpy as np
import openai
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import lora_files
import tiny_qwenimage
from api_server import live_server, multipart, request
from convert.model import convert_model
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore

MODEL = "qwen-image-tiny"
LIGHTNING = "Qwen-Image-Lightning-4steps-V1.0"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_qwenimage")
    pipe = tiny_qwenimage.make_pipeline(root / "src")
    convert_model(root / "src", root / "models" / MODEL, dtype="float32", progress=False)
    loras = root / "loras"
    loras.mkdir()
    kohya = root / "kohya.safetensors"
    lora_files.write_lora(kohya, "kohya", {"transformer": pipe.transformer}, alpha=4.0)
    flat = {n.replace(".", "_"): n for n, m in pipe.transformer.named_modules() if hasattr(m, "weight")}
    longest_first = sorted(flat, key=len, reverse=True)

    def comfy(key: str) -> str:  # lora_unet_<flattened>.lora_down.weight -> diffusion_model.<dotted>.lora_down.weight
        stem, suffix = key.removeprefix("lora_unet_").split(".", 1)
        name = next(n for n in longest_first if stem == n)
        return f"diffusion_model.{flat[name]}.{suffix}"

    save_file({comfy(k): v for k, v in load_file(str(kohya)).items()}, str(loras / f"{LIGHTNING}.safetensors"))
    registry = ModelRegistry([MODEL], root / "models", lora_dir=loras)
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def post(url: str, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(),
                   {"Content-Type": "application/json"})


def image_of(reply) -> Image.Image:
    assert reply.status == 200, reply.body
    return Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_qwenimage_answers_the_readme_curl_request(server, tmp_path):
    """README's request as is (the served model is the default), at a tiny size and step count."""
    body = json.loads(subprocess.run(
        ["curl", "-sS", "--fail-with-body", f"{server}/v1/images/generations", "-H", "Content-Type: application/json",
         "-d", '{"prompt": "a lovely cat", "size": "64x64", "steps": 2}'],
        check=True, capture_output=True, timeout=120).stdout)
    [item] = body["data"]
    subprocess.run(["curl", "-sS", "--fail-with-body", "-o", str(tmp_path / "cat.png"), item["url"]], check=True,
                   timeout=120)
    assert Image.open(tmp_path / "cat.png").size == (64, 64)


def test_qwenimage_generates_with_true_cfg_by_default(server):
    image = image_of(post(server, model=MODEL, prompt="a cat", size="80x64", steps=2, response_format="b64_json"))
    assert image.size == (80, 64)
    assert "CFG scale: 4" in image.text["parameters"] and "Steps: 2" in image.text["parameters"]


def test_qwenimage_edits_with_a_mask(server):
    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image, "PNG")
    Image.new("L", (64, 64), 255).save(mask, "PNG")
    body, content_type = multipart({"model": MODEL, "prompt": "a cat", "steps": "2", "size": "64x64",
                                    "image": ("i.png", image.getvalue()), "mask": ("m.png", mask.getvalue())})
    reply = request(server, "POST", "/v1/images/edits", body, {"Content-Type": content_type})
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("fields, param, says", [
    ({"size": "72x64"}, "size", "16"),
    ({"guidance": 2.0}, "guidance", "guidance"),
    ({"max_sequence_length": 128}, "max_sequence_length", "max_sequence_length"),
])
def test_what_qwenimage_cannot_do_is_a_400(server, fields, param, says):
    reply = post(server, model=MODEL, prompt="a cat", steps=1, **fields)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_a_lightning_lora_changes_the_image_and_brings_its_defaults(server):
    fields = {"model": MODEL, "size": "64x64", "response_format": "b64_json", "seed": 3}
    with_lora = image_of(post(server, prompt=f"a cat <lora:{LIGHTNING}:1>", **fields))
    parameters = with_lora.text["parameters"]
    assert "Steps: 4" in parameters and "CFG scale: 1" in parameters and f'"{LIGHTNING}: ' in parameters
    without = image_of(post(server, prompt="a cat", steps=4, cfg_scale=1.0, **fields))
    assert with_lora.tobytes() != without.tobytes()
    listed = {item["id"]: item["family"] for item in request(server, "GET", "/v1/loras").json()["data"]}
    assert listed == {LIGHTNING: "qwenimage"}


EDIT_MODEL = "qwen-image-edit-2511-tiny"


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_qwenimage_edit")
    tiny_qwenimage.make_edit_pipeline(root / "src", plus=True)
    convert_model(root / "src", root / "models" / EDIT_MODEL, dtype="float32", progress=False)
    registry = ModelRegistry([EDIT_MODEL], root / "models")
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def test_qwenimage_edit_reads_two_images_through_the_openai_sdk(edit_server, tmp_path):
    """An instruction edit from two input images; another second image gives another result (it is read)."""
    client = openai.OpenAI(base_url=f"{edit_server}/v1", api_key="unused", max_retries=0, timeout=300)

    def edit(second_seed: int) -> Image.Image:
        paths = []
        for i, (size, seed) in enumerate((((64, 48), 0), ((48, 64), second_seed))):
            paths.append(tmp_path / f"{i}.png")
            noisy(size, seed).save(paths[-1])
        files = [path.open("rb") for path in paths]
        try:
            result = client.images.edit(model=EDIT_MODEL, image=files, prompt="put the two together", size="64x64",
                                        response_format="b64_json", extra_body={"steps": 1, "seed": 2})
        finally:
            for file in files:
                file.close()
        return Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))

    first, other = edit(1), edit(2)
    assert first.size == (64, 64) and first.tobytes() != other.tobytes()
    with pytest.raises(openai.BadRequestError, match="image"):  # four images: over the model's three
        files = [io.BytesIO(png) for png in [_png()] * 4]
        client.images.edit(model=EDIT_MODEL, image=[("i.png", f) for f in files], prompt="x", size="64x64",
                           extra_body={"steps": 1})


def noisy(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()
