"""ControlNets per request (`control_net`) against ControlNets attached at start (`--control-net`), over HTTP on
live servers with real tiny SD 1.x and SDXL models (MLX, float32): a ControlNet named by a request draws the
very image (byte for byte) that the same ControlNet attached at start draws; it is detached after its job; two
of one family are told apart by name; the wrong family, an unknown name, a control_net without a control_image
and a control_image with no ControlNet are refused; a named ControlNet is loaded on demand under the memory
budget, evicted and reloaded when the budget holds one."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tiny_diffusers
from api_server import Reply, live_server, multipart, request
from PIL import Image

from convert.model import convert_model
from mlx_sd_server.api import create_app
from mlx_sd_server.paths import CONTROLNET_FOLDER
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.residency import CONTROLNET, MODEL
from mlx_sd_server.store import FileStore

BASE = {"sd1": "sd1-base", "sdxl": "sdxl-base"}  # model name by family
CONTROLNETS = {"sd1-edges": ("sd1", 1), "sd1-depth": ("sd1", 2), "sdxl-edges": ("sdxl", 1)}  # -> (family, seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A model directory with a tiny SD 1.x and SDXL model, and ControlNets for them in `controlnets/`."""
    models = tmp_path_factory.mktemp("models")
    src = tmp_path_factory.mktemp("src")
    unets = {}
    for family, name in BASE.items():
        unets[family] = tiny_diffusers.make_pipeline(src / name, family).unet
        convert_model(src / name, models / name, dtype="float32", progress=False)
    for name, (family, seed) in CONTROLNETS.items():
        tiny_diffusers.controlnet(unets[family], seed=seed).save_pretrained(str(src / name))
        convert_model(src / name, models / CONTROLNET_FOLDER / name, dtype="float32", progress=False)
    return models


@contextmanager
def serve(models: Path, files: Path, **options) -> Iterator[tuple[ModelRegistry, str]]:
    default = options.pop("default", BASE["sd1"])
    registry = ModelRegistry([default], models, dtype="float32", **options)
    with live_server(create_app(registry, FileStore(files))) as url:
        yield registry, url


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory) -> Iterator[tuple[ModelRegistry, str]]:
    """Server B: no --control-net; requests name their ControlNet."""
    with serve(models, tmp_path_factory.mktemp("files")) as served:
        yield served


def control_png(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def generate(url: str, model: str, control: bool = True, **fields: str) -> Reply:
    form: dict[str, str | bytes | tuple[str, bytes]] = {
        "prompt": "a ring",
        "model": model,
        "size": "64x64",
        "steps": "2",
        "seed": "42",
        "sample_method": "euler",
        "response_format": "b64_json",
        **fields,
    }
    if control:
        form["control_image"] = ("control.png", control_png())
    body, content_type = multipart(form)
    return request(url, "POST", "/v1/images/generations", body, {"Content-Type": content_type})


def image(reply: Reply) -> str:
    assert reply.status == 200, reply.body
    [item] = reply.json()["data"]
    return item["b64_json"]


def error(reply: Reply) -> tuple[int, str, str]:
    body = reply.json()["error"]
    return reply.status, body["code"], body["param"]


@pytest.fixture(scope="module")
def attached(models, tmp_path_factory):
    """ControlNet name -> the image its model draws with it attached at start (server A), made once."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            model = BASE[CONTROLNETS[name][0]]
            with serve(models, tmp_path_factory.mktemp("files"), default=model, control_net=name) as (_, url):
                cache[name] = image(generate(url, model))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["sd1-edges", "sdxl-edges"])
def test_a_named_controlnet_draws_what_the_attached_one_draws(plain, attached, name):
    _, url = plain
    model = BASE[CONTROLNETS[name][0]]
    named = image(generate(url, model, control_net=name))
    assert named == attached(name)
    unguided = image(generate(url, model, control_net=name, control_strength="0"))
    assert unguided != named  # (the ControlNet is no bystander: the two above agree on what it does)


def test_the_controlnet_is_detached_after_its_job(plain, models, tmp_path):
    registry, url = plain
    model = BASE["sd1"]
    with serve(models, tmp_path / "files") as (_, fresh):
        expected = image(generate(fresh, model, control=False))
    image(generate(url, model, control_net="sd1-edges"))
    assert image(generate(url, model, control=False)) == expected
    resident = registry.residency.get((MODEL, model))
    assert resident is not None and resident.value.model.controlnet is None
    reply = generate(url, model)  # a control_image, no control_net: this model has none of its own
    assert error(reply) == (400, "controlnet_unavailable", "control_image")


def test_two_controlnets_of_one_family_are_picked_by_name(plain, attached):
    _, url = plain
    model = BASE["sd1"]
    edges = image(generate(url, model, control_net="sd1-edges"))
    depth = image(generate(url, model, control_net="sd1-depth"))
    assert edges != depth
    assert edges == attached("sd1-edges") and depth == attached("sd1-depth")
    assert image(generate(url, model, control_net="sd1-edges")) == edges  # and back


def test_controlnets_that_do_not_fit_or_do_not_exist_are_refused(plain):
    _, url = plain
    assert error(generate(url, BASE["sd1"], control_net="sdxl-edges")) == (400, "controlnet_mismatch", "control_net")
    assert error(generate(url, BASE["sdxl"], control_net="sd1-edges")) == (400, "controlnet_mismatch", "control_net")
    assert error(generate(url, BASE["sd1"], control_net="nope")) == (404, "controlnet_not_found", "control_net")
    reply = generate(url, BASE["sd1"], control=False, control_net="sd1-edges")
    assert error(reply)[0::2] == (400, "control_net")
    assert error(generate(url, BASE["sdxl"])) == (400, "controlnet_unavailable", "control_image")


def test_named_controlnets_are_loaded_on_demand_and_evicted_under_the_budget(plain, models, tmp_path, caplog):
    registry, url = plain
    model = BASE["sd1"]
    expected = {name: image(generate(url, model, control_net=name)) for name in ("sd1-edges", "sd1-depth")}
    sizes = {}
    for key in [(MODEL, model), (CONTROLNET, "sd1-edges"), (CONTROLNET, "sd1-depth")]:
        resident = registry.residency.get(key)
        assert resident is not None and resident.memory_bytes > 0, key
        sizes[key[1]] = resident.memory_bytes
    budget = sizes[model] + max(sizes["sd1-edges"], sizes["sd1-depth"])  # the model and one ControlNet
    assert budget < sum(sizes.values())
    caplog.set_level(logging.INFO, logger="mlx_sd_server.models")
    caplog.clear()
    with serve(models, tmp_path / "files", max_memory=budget) as (small, small_url):
        for name in ("sd1-edges", "sd1-depth", "sd1-edges"):
            assert image(generate(small_url, model, control_net=name)) == expected[name]
            loaded = [resident.key[1] for resident in small.residency.loaded(CONTROLNET)]
            assert loaded == [name] and small.residency.used_bytes() <= budget
    assert "unloaded controlnet sd1-edges" in caplog.text and "to make room for ControlNet sd1-depth" in caplog.text
    assert "unloaded controlnet sd1-depth" in caplog.text and "to make room for ControlNet sd1-edges" in caplog.text
    assert caplog.text.count("loaded controlnet sd1-edges") - caplog.text.count("unloaded controlnet sd1-edges") == 2
