"""Requests as the reference's (sd-api-server's) users and OpenAI clients send them: model names that no
model has, the reference's extra fields, OpenAI's hints, `size: "auto"`, and `--task`."""

from __future__ import annotations

import json
import shutil

import pytest

from api_server import live_server, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import TINY_MODEL_NAME, ModelNotFoundError, ModelRegistry
from mlx_sd_server.store import FileStore

FAST = {"size": "64x64", "steps": 1, "response_format": "b64_json"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("dropin-models")


def serve(models, tmp_path, **settings):
    app = create_app(tiny_registry(models, model_name="sd-v1.4"), FileStore(tmp_path / "files"), Settings(**settings))
    return live_server(app)


def post(url: str, path: str = "/v1/images/generations", **fields):
    return request(url, "POST", path, json.dumps(fields).encode(), {"Content-Type": "application/json"})


def test_any_model_name_reaches_the_only_model(models, tmp_path, caplog):
    caplog.set_level("INFO", logger="mlx_sd_server.registry")
    with serve(models, tmp_path) as url:
        for name in ("sd-v1.4", "sd", "dall-e-3", "gpt-image-1"):
            reply = post(url, model=name, prompt="A cute baby sea otter", **FAST)
            assert reply.status == 200, reply.body
            assert reply.json()["model"] == "sd-v1.4"  # which model served
    assert "model 'sd' is not served here" in caplog.text


def test_with_several_models_only_openai_names_fall_back(models, tmp_path):
    shutil.copytree(ModelRegistry([TINY_MODEL_NAME], models).info().folder, tmp_path / "copy")  # a second model
    registry = ModelRegistry([TINY_MODEL_NAME, str(tmp_path / "copy")], models, model_name="first")
    assert sorted(registry.names()) == ["first", TINY_MODEL_NAME]
    assert registry.resolve("dall-e-2").name == "first"
    with pytest.raises(ModelNotFoundError):
        registry.resolve("sd")
    strict = ModelRegistry([TINY_MODEL_NAME], models, strict_model_names=True)
    with pytest.raises(ModelNotFoundError):
        strict.resolve("dall-e-3")


def test_reference_and_openai_fields(models, tmp_path):
    with serve(models, tmp_path) as url:
        reply = post(url, prompt="a cat", quality="hd", style="natural", user="user-1234", background="opaque",
                     moderation="low", **FAST)
        assert reply.status == 200, reply.body
        reply = post(url, prompt="a cat", background="transparent", **FAST)
        assert (reply.status, reply.json()["error"]["param"]) == (400, "background")
        reply = post(url, prompt="a cat", apply_canny_preprocessor=False, **FAST)
        assert reply.status == 200, reply.body
        reply = post(url, prompt="a cat", size="auto", steps=1, response_format="b64_json")
        assert reply.status == 200, reply.body  # the model's own size (the tiny model's: 512x512)
        reply = post(url, prompt="a cat", apply_canny_preprocessor=True, control_preprocess="none", **FAST)
        assert (reply.status, reply.json()["error"]["param"]) == (400, "apply_canny_preprocessor")
        reply = post(url, prompt="a <lora:add_detail:0.8> cat", **FAST)  # (test_api_lora.py: with the LoRA)
        assert (reply.status, reply.json()["error"]["code"]) == (400, "lora_not_found")
        assert "add_detail" in reply.json()["error"]["message"]


@pytest.mark.parametrize("task, allowed, refused", [("text2image", "/v1/images/generations", "/v1/images/edits"),
                                                    ("image2image", "/v1/images/edits", "/v1/images/generations")])
def test_task_turns_the_other_endpoint_off(models, tmp_path, task, allowed, refused):
    with serve(models, tmp_path, task=task) as url:
        reply = post(url, refused, prompt="a cat", **FAST)
        assert reply.status == 403 and reply.json()["error"]["code"] == "task_disabled"
        assert task in reply.json()["error"]["message"]
        reply = post(url, allowed, prompt="a cat", **FAST)  # (edits: 400 for the missing image, not 403)
        assert reply.status in (200, 400) and reply.json().get("error", {}).get("code") != "task_disabled"


def test_apply_canny_preprocessor_is_control_preprocess_canny():
    from mlx_sd_server.job import build_job

    assert build_job({"prompt": "x", "apply_canny_preprocessor": "true"}).control_preprocess == "canny"
    assert build_job({"prompt": "x", "apply_canny_preprocessor": True, "control_preprocess": "canny"}).control_preprocess == "canny"
    assert build_job({"prompt": "x", "apply_canny_preprocessor": False}).control_preprocess == "none"


def test_the_reference_flags_parse_and_do_what_they_say(caplog):
    import subprocess
    import sys

    from mlx_sd_server.api.server import bind_address, log_reference_flags
    from mlx_sd_server.cli import build_parser

    args = build_parser().parse_args(["serve", "--model-name", "sd-v1.4", "--model", "x.gguf", "--socket-addr",
                                      "[::1]:9090", "--threads", "1", "--clip-on-cpu", "--vae-on-cpu",
                                      "--control-net-cpu", "--lora-model-dir", "loras", "--context-type", "text2image"])
    assert bind_address(args) == ("::1", 9090) and args.task == "text2image" and args.model_name == "sd-v1.4"
    assert bind_address(build_parser().parse_args(["serve", "--port", "8081"])) == ("127.0.0.1", 8081)
    with pytest.raises(SystemExit):
        bind_address(build_parser().parse_args(["serve", "--socket-addr", "localhost"]))
    caplog.set_level("INFO", logger="mlx_sd_server.server")
    log_reference_flags(args)
    assert caplog.text.count("has no effect") == 3 and args.lora_model_dir == "loras"
    # --threads N: the process runs on N cores (which bounds BLAS, MLX and the numpy kernels alike)
    probe = "from mlx_sd_server.cli import limit_threads; import os; limit_threads(1); print(len(os.sched_getaffinity(0)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "1"
