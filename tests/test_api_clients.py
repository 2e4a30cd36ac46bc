"""Real clients against a live server running the real tiny random-weight model: the official `openai`
SDK, and the reference's documented curl commands run with real curl.

The reference's examples ask for 512x512 and 20 steps; here they ask for 64x64 and 2 steps so that a
CPU test stays within seconds. Everything else in the commands is as documented."""

import base64
import io
import json
import shutil
import subprocess

import openai
import pytest
from PIL import Image

from api_server import live_server, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import TINY_MODEL_NAME
from mlx_sd_server.store import FileStore

KEY = "sk-local-test"
FAST = {"steps": 2}  # extra (non-OpenAI) fields ride along in extra_body


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """With an API key, as an OpenAI-SDK user would run it."""
    app = create_app(tiny_registry(models), FileStore(tmp_path_factory.mktemp("files")), Settings(api_key=KEY))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def open_server(models, tmp_path_factory):
    """Without an API key, as the reference's curl examples assume."""
    app = create_app(tiny_registry(models), FileStore(tmp_path_factory.mktemp("files")))
    with live_server(app) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def png_file(tmp_path, name="input.png", mode="RGB", colour=(200, 100, 50)):
    path = tmp_path / name
    Image.new(mode, (96, 80), colour).save(path)
    return path


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def download(client: openai.OpenAI, url: str) -> bytes:
    response = client._client.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    return response.content


def test_sdk_generate_b64_n2(client):
    result = client.images.generate(prompt="a lighthouse", n=2, size="64x64", response_format="b64_json",
                                    extra_body={**FAST, "seed": 5})
    assert len(result.data) == 2
    images = [decode(base64.b64decode(item.b64_json)) for item in result.data]
    assert all(image.size == (64, 64) and image.format == "PNG" for image in images)
    assert [item.model_extra["seed"] for item in result.data] == [5, 6]
    assert "Seed: 5" in images[0].info["parameters"] and "Seed: 6" in images[1].info["parameters"]
    assert images[0].tobytes() != images[1].tobytes()


def test_sdk_generate_url_downloads(client, server):
    result = client.images.generate(prompt="a lighthouse", n=2, size="64x64", extra_body=FAST)
    assert len(result.data) == 2 and all(item.url.startswith(f"{server}/v1/files/download/file_") for item in result.data)
    for item in result.data:
        assert decode(download(client, item.url)).size == (64, 64)


def test_sdk_generate_is_reproducible_per_seed(client):
    def image(**extra):
        item = client.images.generate(prompt="a lighthouse", size="64x64", response_format="b64_json",
                                      extra_body={**FAST, **extra}).data[0]
        return base64.b64decode(item.b64_json)
    assert image(seed=11) == image(seed=11)


def test_sdk_edit_with_mask(client, tmp_path):
    mask = Image.new("RGBA", (96, 80), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 48, 80))  # transparent left half: repaint it
    mask.save(tmp_path / "mask.png")
    with open(png_file(tmp_path), "rb") as image, open(tmp_path / "mask.png", "rb") as mask_file:
        result = client.images.edit(image=image, mask=mask_file, prompt="a red door", n=2, size="64x64",
                                    response_format="b64_json", extra_body=FAST)
    assert len(result.data) == 2
    edited = decode(base64.b64decode(result.data[0].b64_json))
    assert edited.size == (64, 64)
    assert "Denoising strength: 0.75" in edited.info["parameters"]


def test_sdk_edit_url_and_output_format(client, tmp_path):
    with open(png_file(tmp_path), "rb") as image:
        result = client.images.edit(image=image, prompt="a red door", size="64x64", output_format="jpeg",
                                    extra_body={**FAST, "strength": 0.5})
    assert result.data[0].url.endswith(".jpeg")
    assert decode(download(client, result.data[0].url)).format == "JPEG"


def test_sdk_models_and_files(client):
    assert [model.id for model in client.models.list()] == [TINY_MODEL_NAME]
    item = client.images.generate(prompt="x", size="64x64", extra_body=FAST).data[0]
    file_id = item.url.split("/")[-2]
    assert client.files.retrieve(file_id).filename == item.url.split("/")[-1]
    assert file_id in [f.id for f in client.files.list()]
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_sdk_sees_errors_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="51x")
    assert caught.value.body["param"] == "size" and caught.value.body["code"] == "invalid_size"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


# --- the reference's curl examples, with real curl ----------------------------------------------------

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def curl(*args: str) -> bytes:
    return subprocess.run(["curl", "-sS", "--fail-with-body", *args], check=True, capture_output=True, timeout=120).stdout


@needs_curl
def test_curl_readme_generation(open_server, tmp_path):
    reply = json.loads(curl(
        "-X", "POST", f"{open_server}/v1/images/generations",
        "--header", "Content-Type: application/json",
        "--data", json.dumps({"model": TINY_MODEL_NAME, "prompt": "A cute baby sea otter", "size": "64x64", "steps": 2}),
    ))
    [item] = reply["data"]
    assert item["prompt"] == "A cute baby sea otter" and item["seed"] == 42
    curl("-o", str(tmp_path / "otter.png"), item["url"])
    assert Image.open(tmp_path / "otter.png").size == (64, 64)


@needs_curl
def test_curl_endpoints_generation_with_all_fields(open_server):
    reply = json.loads(curl(
        "-X", "POST", f"{open_server}/v1/images/generations",
        "--header", "Content-Type: application/json",
        "--data", """{
            "model": "%s",
            "prompt": "A painting of a beautiful sunset over a calm lake.",
            "negative_prompt": "No people or animals in the image.",
            "n": 1,
            "cfg_scale": 7.0,
            "sample_method": "euler_a",
            "steps": 2,
            "size": "64x64",
            "seed": 42
        }""" % TINY_MODEL_NAME,
    ))
    assert len(reply["data"]) == 1 and reply["data"][0]["url"]


@needs_curl
def test_curl_endpoints_edit_multipart(open_server, tmp_path):
    image = png_file(tmp_path, "image.png")
    reply = json.loads(curl(
        "--location", f"{open_server}/v1/images/edits",
        "--form", f'image=@"{image}"',
        "--form", 'prompt="modern disney style"',
        "--form", 'negative_prompt="no animals"',
        "--form", 'n="1"',
        "--form", "height=64",
        "--form", "width=64",
        "--form", "cfg_scale=7.0",
        "--form", 'sample_method="euler_a"',
        "--form", 'steps="2"',
        "--form", 'control_strength="0.9"',
        "--form", 'seed="42"',
        "--form", 'strength="0.75"',
        "--form", 'response_format="url"',
    ))
    [item] = reply["data"]
    assert item["prompt"] == "modern disney style"
    curl("-o", str(tmp_path / "edited.png"), item["url"])
    edited = Image.open(tmp_path / "edited.png")
    assert edited.size == (64, 64)
    assert "Negative prompt: no animals" in edited.info["parameters"]


@needs_curl
def test_curl_readme_edit_with_b64(open_server, tmp_path):
    image = png_file(tmp_path, "otter.png")
    reply = json.loads(curl(
        "--location", f"{open_server}/v1/images/edits",
        "--form", f'image=@"{image}"',
        "--form", 'prompt="A cute baby sea otter with blue eyes"',
        "--form", "size=64x64", "--form", "steps=2", "--form", "response_format=b64_json",
    ))
    assert decode(base64.b64decode(reply["data"][0]["b64_json"])).size == (64, 64)


@needs_curl
def test_curl_controlnet_example_without_a_controlnet_is_a_clear_400(open_server, tmp_path):
    control = png_file(tmp_path, "control_image.png")
    result = subprocess.run(
        ["curl", "-sS", "--location", f"{open_server}/v1/images/generations",
         "--form", f'control_image=@"{control}"', "--form", 'prompt="a person"', "--form", 'cfg_scale="7.0"',
         "--form", 'sample_method="euler_a"', "--form", 'steps="2"', "--form", 'size="64x64"',
         "--form", 'control_strength="0.9"', "--form", 'seed="42"', "-w", "%{http_code}"],
        check=True, capture_output=True, timeout=60,
    ).stdout
    body, status = result[:-3], result[-3:]
    assert status == b"400"
    assert json.loads(body)["error"]["param"] == "control_image"
