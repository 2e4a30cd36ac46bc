"""The reference's ControlNet curl example against a live server with a ControlNet attached (`--control-net`)."""

import json

import pytest
from PIL import Image

import tiny_diffusers
from api_server import live_server
from convert.model import convert_model
from mlx_sd_server.api import create_app
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore
from test_api_clients import curl, needs_curl


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny SD1 model and a tiny ControlNet for it, converted into a model directory and served by name."""
    models = tmp_path_factory.mktemp("models")
    src = tmp_path_factory.mktemp("src")
    pipe = tiny_diffusers.make_pipeline(src / "sd", "sd1")
    tiny_diffusers.controlnet(pipe.unet).save_pretrained(str(src / "cn"))
    convert_model(src / "sd", models / "tiny-sd", dtype="float32", progress=False)
    convert_model(src / "cn", models / "tiny-cn", dtype="float32", progress=False)
    registry = ModelRegistry(["tiny-sd"], models, control_net="tiny-cn")
    with live_server(create_app(registry, FileStore(tmp_path_factory.mktemp("files")))) as url:
        yield url


def control_image(path, size=64):
    image = Image.new("RGB", (size, size))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    image.save(path)
    return path


def generate(server, control, strength: str) -> Image.Image:
    """The reference's documented ControlNet request (64x64 and 2 steps, for a CPU test)."""
    reply = json.loads(curl(
        "--location", f"{server}/v1/images/generations",
        "--form", f'control_image=@"{control}"',
        "--form", 'prompt="a person waving"',
        "--form", 'negative_prompt="blurry"',
        "--form", 'cfg_scale="7.0"',
        "--form", 'sample_method="euler_a"',
        "--form", 'steps="2"',
        "--form", 'size="64x64"',
        "--form", f'control_strength="{strength}"',
        "--form", 'seed="42"',
        "--form", 'response_format="url"',
    ))
    [item] = reply["data"]
    out = control.parent / f"out-{strength}.png"
    curl("-o", str(out), item["url"])
    return Image.open(out)


@needs_curl
def test_curl_controlnet_example(server, tmp_path):
    control = control_image(tmp_path / "control_2.png")
    guided = generate(server, control, "0.9")
    unguided = generate(server, control, "0")
    assert guided.size == (64, 64) and "ControlNet strength: 0.9" in guided.info["parameters"]
    assert guided.tobytes() != unguided.tobytes()  # the control image was honoured
