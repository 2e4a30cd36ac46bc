"""Models that come and go, over HTTP, on a running server with real tiny models: converted into its model
directory and served at once, removed and gone (404), a conversion in progress (409), two models under a
budget that holds one (evicted and reloaded, both answer), keep_alive 0 / an idle timeout / -1, a model
larger than the budget (507), and the load and unload endpoints."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
import pytest
from PIL import Image

import tiny_diffusers
from api_server import Reply, live_server, multipart, request
from convert.model import SplitFiles, convert_model
from mlx_sd_server.api import create_app
from mlx_sd_server.engine.model_io import CONVERTING
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.residency import gigabytes
from mlx_sd_server.store import FileStore

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two tiny SD 1.x diffusers folders, made once."""
    root = tmp_path_factory.mktemp("sources")
    for name in ("alpha", "beta"):
        tiny_diffusers.make_pipeline(root / name, "sd1")
    return root


def install(sources: Path, models: Path, name: str, source: str = "alpha") -> Path:
    return convert_model(sources / source, models / name, dtype="float32", progress=False)


def generate(url: str, model: str, **fields) -> Reply:
    body = {"prompt": "a cat", "model": model, "size": "64x64", "steps": 1, "response_format": "b64_json", **fields}
    return request(url, "POST", "/v1/images/generations", json.dumps(body).encode(), JSON)


def listing(url: str) -> dict[str, dict]:
    reply = request(url, "GET", "/v1/models")
    assert reply.status == 200, reply.body
    return {model["id"]: model for model in reply.json()["data"]}


def until(condition, polls: int = 400) -> bool:
    """Poll for something the worker does between its 0.25 s idle polls (bounded, no timing asserted)."""
    for _ in range(polls):
        if condition():
            return True
        time.sleep(0.05)
    return False


def serve(models: Path, tmp_path: Path, specs: list[str | SplitFiles], **options):
    registry = ModelRegistry(specs, models, **options)
    return registry, live_server(create_app(registry, FileStore(tmp_path / "files")))


def test_a_model_converted_while_serving_is_served_and_one_removed_is_gone(sources, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlx_sd_server.models")
    models = tmp_path / "models"
    install(sources, models, "first")
    install(sources, models, "other")  # (with one model left, an unknown name would be served by it)
    registry, server = serve(models, tmp_path, ["first"])
    with server as url:
        assert set(listing(url)) == {"first", "other"}
        install(sources, models, "second", "beta")  # as `convert` does, into the running server's directory
        assert set(listing(url)) == {"first", "other", "second"}
        reply = generate(url, "second")
        assert reply.status == 200 and reply.json()["model"] == "second", reply.body
        assert listing(url)["second"]["loaded"] is True
        shutil.rmtree(models / "second")  # as `rm` does
        assert "second" not in listing(url)
        reply = generate(url, "second")
        assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"
        assert until(lambda: "unloaded model second" in caplog.text)
        assert "its files were removed" in caplog.text and registry.loaded() == []
        assert generate(url, "first").status == 200


def test_a_model_being_converted_is_a_409_and_a_crashed_conversion_a_404(sources, tmp_path):
    models = tmp_path / "models"
    install(sources, models, "first")
    install(sources, models, "other")
    work = models / ".coming.partial-abc"
    work.mkdir()
    (work / CONVERTING).write_text(str(os.getpid()))  # a live process is converting it
    _, server = serve(models, tmp_path, [])
    with server as url:
        reply = generate(url, "coming")
        assert reply.status == 409 and reply.json()["error"]["code"] == "model_converting", reply.body
        assert request(url, "GET", "/v1/models/coming").status == 409
        (work / CONVERTING).write_text("999999999")  # no such process: leftovers of a crashed conversion
        assert generate(url, "coming").status == 404


def test_two_models_under_a_budget_for_one_take_turns(sources, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlx_sd_server.models")
    models = tmp_path / "models"
    install(sources, models, "alpha")
    install(sources, models, "beta", "beta")
    measure = ModelRegistry(["alpha"], models)
    sizes = {name: measure.pipeline(name).memory_bytes() for name in ("alpha", "beta")}
    caplog.clear()
    registry, server = serve(models, tmp_path, ["alpha"], max_memory=max(sizes.values()) + 1)
    with server as url:
        for name in ("alpha", "beta", "alpha"):
            reply = generate(url, name)
            assert reply.status == 200 and reply.json()["model"] == name, reply.body
            loaded = [model for model, entry in listing(url).items() if entry["loaded"]]
            assert loaded == [name]
        assert "unloaded model alpha" in caplog.text and "to make room for beta" in caplog.text
        assert "unloaded model beta" in caplog.text and "to make room for alpha" in caplog.text
        assert caplog.text.count("loaded model alpha") - caplog.text.count("unloaded model alpha") == 2  # reloaded
        entry = listing(url)["alpha"]
        assert entry["memory_bytes"] == sizes["alpha"] and entry["size_bytes"] > 0
        assert entry["capabilities"]["family"] == "sd1" and entry["defaults"]["steps"] > 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_keep_alive_zero_idle_timeout_and_minus_one(sources, tmp_path, capsys):
    models = tmp_path / "models"
    install(sources, models, "alpha")
    registry, server = serve(models, tmp_path, [], keep_alive=3600)
    with server as url:
        assert generate(url, "alpha", keep_alive=0).status == 200
        assert listing(url)["alpha"]["loaded"] is False  # unloaded as the job ended
        assert generate(url, "alpha", keep_alive=-1).status == 200
        entry = listing(url)["alpha"]
        assert entry["loaded"] is True and entry["expires_at"] is None and entry["keep_alive"] == -1
        assert generate(url, "alpha").status == 200  # no keep_alive: the server's (an hour)
        entry = listing(url)["alpha"]
        assert entry["keep_alive"] == 3600 and time.time() + 3500 < entry["expires_at"] <= time.time() + 3601
        active, rss = mx.get_active_memory(), rss_bytes()
        assert generate(url, "alpha", keep_alive="1s").status == 200
        assert until(lambda: not listing(url)["alpha"]["loaded"])  # idle past its keep-alive
        after_active, after_rss = mx.get_active_memory(), rss_bytes()
        with capsys.disabled():
            print(
                f"\nidle unload of a tiny SD 1.x: MLX active memory {active} -> {after_active} bytes, "
                f"RSS {rss / 2**20:.1f} -> {after_rss / 2**20:.1f} MB"
            )
        assert after_active < active
        reply = generate(url, "alpha", keep_alive="soon")
        assert reply.status == 400 and reply.json()["error"]["param"] == "keep_alive"


def test_a_model_larger_than_the_budget_is_a_507_and_the_server_keeps_serving(sources, tmp_path):
    models = tmp_path / "models"
    install(sources, models, "alpha")
    convert_model(sources / "beta", models / "small", dtype="float32", quantize=8, progress=False)
    measure = ModelRegistry(["alpha"], models)
    size, small = (measure.pipeline(name).memory_bytes() for name in ("alpha", "small"))
    budget = (size + small) // 2  # holds the 8-bit model, not the float32 one
    assert small <= budget < size
    _, server = serve(models, tmp_path, ["alpha"], max_memory=budget)
    with server as url:
        reply = generate(url, "alpha")
        error = reply.json()["error"]
        assert reply.status == 507 and error["code"] == "model_too_large", reply.body
        assert gigabytes(size) != gigabytes(budget)
        assert f"needs {gigabytes(size)}" in error["message"] and f"budget of {gigabytes(budget)}" in error["message"]
        assert "--max-memory" in error["message"]
        reply = request(url, "POST", "/v1/models/alpha/load")
        assert reply.status == 507 and reply.json()["error"]["code"] == "model_too_large"
        reply = generate(url, "small")  # the refusal left the server serving what fits
        assert reply.status == 200 and reply.json()["model"] == "small", reply.body
        assert [name for name, entry in listing(url).items() if entry["loaded"]] == ["small"]
        assert generate(url, "alpha").status == 507


def test_load_and_unload_endpoints(sources, tmp_path):
    models = tmp_path / "models"
    install(sources, models, "alpha")
    _, server = serve(models, tmp_path, [])
    with server as url:
        assert listing(url)["alpha"]["loaded"] is False
        reply = request(url, "POST", "/v1/models/alpha/load", json.dumps({"keep_alive": "10m"}).encode(), JSON)
        model = reply.json()
        assert reply.status == 200 and model["loaded"] is True and model["memory_bytes"] > 0, reply.body
        assert model["keep_alive"] == 600 and model["expires_at"] > time.time() + 500
        assert request(url, "GET", "/v1/models/alpha").json() == listing(url)["alpha"]
        assert listing(url)["alpha"]["expires_at"] == model["expires_at"]
        reply = request(url, "GET", "/v1/models/nope")
        assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"
        health = request(url, "GET", "/health").json()
        assert health["loaded_models"] == ["alpha"] and health["memory"]["used_bytes"] == model["memory_bytes"]
        reply = request(url, "POST", "/v1/models/alpha/unload")
        assert reply.status == 200 and reply.json()["unloaded"] is True and reply.json()["loaded"] is False
        assert request(url, "POST", "/v1/models/alpha/unload").json()["unloaded"] is False
        reply = request(url, "POST", "/v1/models/nope/load")
        assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"
        for body in (b'{"keep_alive": "later"}', b'{"keep_alive": 1, "extra": 2}', b"[1]", b'{"keep_alive": 5'):
            reply = request(url, "POST", "/v1/models/alpha/load", body, JSON)
            assert reply.status == 400, (body, reply.body)
        assert listing(url)["alpha"]["loaded"] is False  # (no bad body loaded it)
        reply = request(url, "POST", "/v1/models/alpha/load", b'{"keep_alive": null}', JSON)
        assert reply.status == 200 and reply.json()["keep_alive"] == 300  # null: the server's (default 5m)
        reply = request(url, "POST", "/v1/models/alpha/load", json.dumps({"keep_alive": -1}).encode(), JSON)
        assert reply.json()["keep_alive"] == -1 and reply.json()["expires_at"] is None


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(out, "PNG")
    return out.getvalue()


def test_controlnets_are_listed_with_the_family_they_fit(tmp_path):
    models = tmp_path / "models"
    src = tmp_path / "src"
    pipe = tiny_diffusers.make_pipeline(src / "sd", "sd1")
    tiny_diffusers.controlnet(pipe.unet).save_pretrained(str(src / "cn"))
    convert_model(src / "sd", models / "base", dtype="float32", progress=False)
    convert_model(src / "cn", models / "controlnets" / "edges", dtype="float32", progress=False)
    _, server = serve(models, tmp_path, [])
    with server as url:
        reply = request(url, "GET", "/v1/controlnets")
        [entry] = reply.json()["data"]
        assert entry["id"] == "edges" and entry["family"] == "sd1" and entry["loaded"] is False
        assert entry["object"] == "controlnet" and entry["memory_bytes"] is None
        assert entry["size_bytes"] > 0 and entry["default_for"] == []
        assert list(listing(url)) == ["base"]  # a ControlNet is no model
    # the default model's by --control-net; loaded by a request under the same budget as the models
    _, server = serve(models, tmp_path, [], control_net="edges")
    with server as url:
        [entry] = request(url, "GET", "/v1/controlnets").json()["data"]
        assert entry["default_for"] == ["base"] and entry["loaded"] is False
        fields = {"prompt": "a square", "size": "64x64", "steps": "1", "response_format": "b64_json"}
        body, content_type = multipart({**fields, "control_image": ("control.png", png_bytes())})
        reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": content_type})
        assert reply.status == 200, reply.body
        [entry] = request(url, "GET", "/v1/controlnets").json()["data"]
        assert entry["loaded"] is True and entry["memory_bytes"] > 0
        models_list = request(url, "GET", "/v1/models").json()
        used = models_list["data"][0]["memory_bytes"] + entry["memory_bytes"]
        assert models_list["memory"]["used_bytes"] == used
