"""AUTOMATIC1111's API (/sdapi/v1) over HTTP on the real tiny model: txt2img batches (batch_size x n_iter) are
our generations seed by seed, img2img with a mask is our edit, enable_hr is our hires fix, a model switch
through options (two models), progress with a preview during a job, interrupt and skip, png-info reading our
own images back, SillyTavern's and Open WebUI's request bodies as they send them, what is refused (400 naming
the field, with A1111's `detail`), and the API key (Bearer, and Basic as A1111's clients send it)."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from api_server import live_server, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import TINY_MODEL_NAME, ModelRegistry
from mlx_sd_server.store import FileStore

JSON = {"Content-Type": "application/json"}
SMALL = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 5}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The tiny model, and a second one beside it (`tiny-b`: its weights scaled, so its images differ)."""
    root = tmp_path_factory.mktemp("sdapi")
    tiny_registry(root / "models")  # builds the tiny model
    other = root / "tiny-b"
    shutil.copytree(root / "models" / TINY_MODEL_NAME, other)
    manifest = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**manifest, "name": "tiny-b"}))
    weights = mx.load(str(other / "unet.safetensors"))
    mx.save_safetensors(str(other / "unet.safetensors"), {k: v * 0.9 for k, v in weights.items()})
    return root


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    registry = ModelRegistry([TINY_MODEL_NAME, str(models / "tiny-b")], models / "models")
    with live_server(create_app(registry, FileStore(tmp_path_factory.mktemp("files")))) as url:
        yield url, registry


@pytest.fixture
def server(served):
    url, registry = served
    registry.start_default = TINY_MODEL_NAME  # (a test may have switched it)
    return url


def post(url: str, path: str, body: dict, headers: dict | None = None):
    return request(url, "POST", path, json.dumps(body).encode(), {**JSON, **(headers or {})})


def pixels(data: str | bytes) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def ours(url: str, path: str, **fields) -> list[np.ndarray]:
    reply = post(url, path, {"response_format": "b64_json", **fields})
    assert reply.status == 200, reply.body
    return [pixels(item["b64_json"]) for item in reply.json()["data"]]


def source_image(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (200, 120, 40))
    image.paste((30, 60, 220), (8, 8, size[0] // 2, size[1] // 2))
    return image


def test_txt2img_batches_are_our_generations_seed_by_seed(server):
    reply = post(
        server,
        "/sdapi/v1/txt2img",
        {
            "prompt": "a lighthouse",
            "negative_prompt": "fog",
            "seed": 11,
            "batch_size": 2,
            "n_iter": 2,
            "sampler_name": "DPM++ 2M Karras",
            **SMALL,
        },
    )
    assert reply.status == 200, reply.body
    body = reply.json()
    assert len(body["images"]) == 4
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert (info["batch_size"], info["n_iter"], info["sampler_name"], info["scheduler"]) == (2, 2, "DPM++ 2M", "Karras")
    assert info["sd_model_name"] == TINY_MODEL_NAME and info["width"] == 64
    fields = {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "size": "64x64",
        "steps": 4,
        "cfg_scale": 5,
        "sample_method": "dpm++2m",
        "scheduler": "karras",
    }
    # each n_iter batch is our generation of its first seed with n = batch_size (the same bytes: the same
    # batch shape; image i of a batch is seed + i alone up to BLAS rounding, tests/test_pipeline.py)
    expected = [
        *ours(server, "/v1/images/generations", seed=11, n=2, **fields),
        *ours(server, "/v1/images/generations", seed=13, n=2, **fields),
    ]
    for index, image in enumerate(body["images"]):
        assert np.array_equal(pixels(image), expected[index]), index
        text = Image.open(io.BytesIO(base64.b64decode(image))).info["parameters"]
        assert text == info["infotexts"][index] and f"Seed: {11 + index}," in text
    assert body["parameters"]["seed"] == 11 and body["parameters"]["n_iter"] == 2
    assert body["parameters"]["restore_faces"] is None  # A1111's echo: its defaults for what was not sent


def test_the_models_defaults_fill_what_the_request_leaves_out(server):
    body = post(server, "/sdapi/v1/txt2img", {"prompt": "", "width": 64, "height": 64, "steps": 2}).json()
    info = json.loads(body["info"])
    assert (info["sampler_name"], info["scheduler"], info["cfg_scale"]) == ("Euler a", "Uniform", 7.0)
    assert body["parameters"]["sampler_name"] == "Euler a"  # the echo says what was used
    assert body["parameters"]["seed"] == -1 and info["seed"] >= 0  # A1111's: the echo as sent, info as made


def test_send_images_false_and_scripts_ignored_with_a_log_line(server, caplog):
    caplog.set_level(logging.INFO, logger="mlx_sd_server.api")
    body = {"prompt": "x", "send_images": False, "alwayson_scripts": {"ADetailer": {"args": []}}, **SMALL}
    reply = post(server, "/sdapi/v1/txt2img", body)
    assert reply.status == 200 and reply.json()["images"] == []
    assert len(json.loads(reply.json()["info"])["infotexts"]) == 1
    assert any("alwayson_scripts ignored" in r.getMessage() and "ADetailer" in r.getMessage() for r in caplog.records)


def test_img2img_with_a_mask_is_our_edit(server):
    image, mask = source_image(), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    reply = post(
        server,
        "/sdapi/v1/img2img",
        {
            "init_images": [png_b64(image)],
            "mask": png_b64(mask),
            "denoising_strength": 0.6,
            "prompt": "a cat",
            "seed": 3,
            "sampler_name": "Euler",
            "scheduler": "Karras",
            "resize_mode": 1,
            "inpainting_fill": 1,
            "inpaint_full_res": False,
            "mask_blur": 4,
            **SMALL,
        },
    )
    assert reply.status == 200, reply.body
    made = pixels(reply.json()["images"][0])
    edit = post(
        server,
        "/v1/images/edits",
        {
            "image": png_b64(image),
            "mask": png_b64(mask),
            "strength": 0.6,
            "prompt": "a cat",
            "seed": 3,
            "sample_method": "euler",
            "scheduler": "karras",
            "size": "64x64",
            "steps": 4,
            "cfg_scale": 5,
            "response_format": "b64_json",
        },
    )
    assert np.array_equal(made, pixels(edit.json()["data"][0]["b64_json"]))
    assert np.array_equal(made[:4, :4], np.asarray(image)[:4, :4])  # outside the mask: the original
    info = json.loads(reply.json()["info"])
    assert info["denoising_strength"] == 0.6 and "Denoising strength: 0.6" in info["infotexts"][0]
    # A1111's RGBA mask (opaque: repaint), inverted where asked, is the same mask
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (16, 16, 48, 48))
    again = post(
        server,
        "/sdapi/v1/img2img",
        {
            "init_images": [png_b64(image)],
            "mask": png_b64(rgba),
            "inpainting_mask_invert": 1,
            "denoising_strength": 0.6,
            "prompt": "a cat",
            "seed": 3,
            "sampler_name": "Euler",
            "scheduler": "Karras",
            "resize_mode": 1,
            **SMALL,
        },
    )
    assert np.array_equal(pixels(again.json()["images"][0]), made)


def test_resize_mode_0_stretches_the_image(server):
    wide = source_image((96, 64))
    fields = {"denoising_strength": 0.5, "prompt": "x", "seed": 1, "sampler_name": "Euler a", **SMALL}
    stretched = post(server, "/sdapi/v1/img2img", {"init_images": [png_b64(wide)], **fields})  # resize_mode 0
    assert stretched.status == 200, stretched.body
    edit = ours(
        server,
        "/v1/images/edits",
        image=png_b64(wide.resize((64, 64), Image.Resampling.LANCZOS)),
        strength=0.5,
        prompt="x",
        seed=1,
        size="64x64",
        steps=4,
        cfg_scale=5,
        sample_method="euler_a",
    )
    assert np.array_equal(pixels(stretched.json()["images"][0]), edit[0])
    assert post(server, "/sdapi/v1/img2img", {"init_images": [png_b64(wide)], "resize_mode": 2, **fields}).status == 400


def test_enable_hr_is_our_hires_fix(server):
    fields = {"prompt": "a bridge", "seed": 21, "sampler_name": "Euler a", **SMALL}
    reply = post(
        server,
        "/sdapi/v1/txt2img",
        {
            **fields,
            "enable_hr": True,
            "hr_scale": 2,
            "hr_upscaler": "Latent",
            "denoising_strength": 0.5,
            "hr_second_pass_steps": 2,
        },
    )
    assert reply.status == 200, reply.body
    made = pixels(reply.json()["images"][0])
    assert made.shape == (128, 128, 3)
    expected = ours(
        server,
        "/v1/images/generations",
        prompt="a bridge",
        seed=21,
        size="64x64",
        steps=4,
        cfg_scale=5,
        sample_method="euler_a",
        hr_scale=2,
        hr_upscaler="latent",
        hr_strength=0.5,
        hr_steps=2,
    )
    assert np.array_equal(made, expected[0])
    info = json.loads(reply.json()["info"])
    assert "Hires upscale: 2" in info["infotexts"][0] and info["denoising_strength"] == 0.5
    by_size = post(
        server,
        "/sdapi/v1/txt2img",
        {
            **fields,
            "enable_hr": True,
            "hr_resize_x": 128,
            "hr_resize_y": 128,
            "hr_upscaler": "Latent",
            "denoising_strength": 0.5,
            "hr_second_pass_steps": 2,
        },
    )
    assert np.array_equal(pixels(by_size.json()["images"][0]), made)
    other_aspect = post(
        server, "/sdapi/v1/txt2img", {**fields, "enable_hr": True, "hr_resize_x": 128, "hr_resize_y": 96}
    )
    assert other_aspect.status == 400 and other_aspect.json()["error"]["param"] == "hr_resize_x"
    lanczos = post(
        server, "/sdapi/v1/txt2img", {**fields, "enable_hr": True, "hr_upscaler": "Lanczos", "hr_scale": 1.5}
    )
    assert lanczos.status == 200 and pixels(lanczos.json()["images"][0]).shape == (96, 96, 3)


def test_a_model_switch_through_options(server, served):
    _, registry = served
    options = request(server, "GET", "/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == TINY_MODEL_NAME
    titles = [model["title"] for model in request(server, "GET", "/sdapi/v1/sd-models").json()]
    assert titles == [TINY_MODEL_NAME, "tiny-b"]
    fields = {"prompt": "a fox", "seed": 5, **SMALL}
    first = post(server, "/sdapi/v1/txt2img", fields).json()
    # Open WebUI's switch: the options read, sd_model_checkpoint changed, all of them posted back
    assert post(server, "/sdapi/v1/options", {**options, "sd_model_checkpoint": "tiny-b"}).status == 200
    assert request(server, "GET", "/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-b"
    assert registry.default_name == "tiny-b"  # the server's default: /v1 requests without a model too
    second = post(server, "/sdapi/v1/txt2img", fields).json()
    assert json.loads(second["info"])["sd_model_name"] == "tiny-b"
    assert not np.array_equal(pixels(first["images"][0]), pixels(second["images"][0]))
    # a request's own model, the default kept; a title with A1111's hash suffix names the model too
    back = post(
        server,
        "/sdapi/v1/txt2img",
        {**fields, "override_settings": {"sd_model_checkpoint": f"{TINY_MODEL_NAME} [0123abcd]"}},
    )
    assert np.array_equal(pixels(back.json()["images"][0]), pixels(first["images"][0]))
    assert registry.default_name == "tiny-b"
    kept = {"sd_model_checkpoint": TINY_MODEL_NAME}  # A1111's override kept: the default from then on
    post(
        server,
        "/sdapi/v1/txt2img",
        {**fields, "override_settings": kept, "override_settings_restore_afterwards": False},
    )
    assert registry.default_name == TINY_MODEL_NAME
    missing = post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "nope"})
    assert missing.status == 404 and "nope" in missing.json()["detail"]
    changed = post(server, "/sdapi/v1/options", {"samples_format": "jpg"})
    assert changed.status == 400 and changed.json()["error"]["param"] == "samples_format"


def run_in_background(url: str, path: str, body: dict) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        result["reply"] = post(url, path, body)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def wait_for(url: str, condition, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = request(url, "GET", "/sdapi/v1/progress").json()
        if condition(progress):
            return progress
        time.sleep(0.02)
    raise AssertionError("progress never showed it")


SLOW = {"prompt": "slow", "width": 64, "height": 64, "steps": 150, "seed": 9, "sampler_name": "Euler"}


def test_progress_shows_the_running_job_with_a_preview_and_skip_ends_a_batch(server):
    thread, result = run_in_background(server, "/sdapi/v1/txt2img", {**SLOW, "n_iter": 2})
    progress = wait_for(server, lambda p: p["state"]["sampling_step"] > 0 and p["current_image"])
    state = progress["state"]
    assert state["job_count"] == 2 and state["sampling_steps"] == 150 and 0 < progress["progress"] < 1
    assert pixels(progress["current_image"]).shape == (64, 64, 3)
    assert progress["eta_relative"] > 0
    thread.join()
    assert result["reply"].status == 200
    full = [pixels(image) for image in result["reply"].json()["images"]]
    assert len(full) == 2
    idle = request(server, "GET", "/sdapi/v1/progress").json()
    assert (idle["progress"], idle["state"]["job_count"], idle["current_image"]) == (0, 0, None)

    thread, result = run_in_background(server, "/sdapi/v1/txt2img", {**SLOW, "n_iter": 2})
    wait_for(server, lambda p: p["state"]["sampling_step"] >= 3 and p["state"]["job_no"] == 0)
    assert request(server, "POST", "/sdapi/v1/skip").status == 200
    thread.join()
    skipped = [pixels(image) for image in result["reply"].json()["images"]]
    assert len(skipped) == 2  # the skipped batch as it was (its current step decoded), then the next in full
    assert not np.array_equal(skipped[0], full[0]) and np.array_equal(skipped[1], full[1])


def test_interrupt_answers_with_what_there_is(server):
    thread, result = run_in_background(server, "/sdapi/v1/txt2img", {**SLOW, "n_iter": 3})
    wait_for(server, lambda p: p["state"]["sampling_step"] >= 3)
    assert post(server, "/sdapi/v1/interrupt", {}).json() == {}
    thread.join()
    reply = result["reply"]
    assert reply.status == 200, reply.body
    assert len(reply.json()["images"]) == 1  # the batch it stopped in, decoded; the later ones not run
    task = request(server, "GET", f"/v1/images/tasks/{reply.headers['x-task-id']}").json()
    assert task["state"] == "done" and task["step"] < 150
    assert post(server, "/sdapi/v1/interrupt", {}).json() == {}  # nothing running: nothing to do


def test_png_info_reads_our_images_back(server):
    body = post(
        server,
        "/sdapi/v1/txt2img",
        {"prompt": "a red fox, snow", "negative_prompt": "blurry", "seed": 77, "sampler_name": "Euler a", **SMALL},
    ).json()
    read = post(server, "/sdapi/v1/png-info", {"image": body["images"][0]})
    assert read.status == 200, read.body
    result = read.json()
    assert result["info"] == json.loads(body["info"])["infotexts"][0]
    parameters = result["parameters"]
    assert (parameters["Prompt"], parameters["Negative prompt"], parameters["Seed"]) == (
        "a red fox, snow",
        "blurry",
        "77",
    )
    assert (parameters["Size-1"], parameters["Size-2"], parameters["Sampler"]) == ("64", "64", "Euler a")
    assert parameters["Model"] == TINY_MODEL_NAME and parameters["Clip skip"] == "1"  # A1111's fill-ins too
    assert result["items"] == {}
    jpeg = post(
        server,
        "/v1/images/generations",
        {
            "prompt": "a jpeg",
            "size": "64x64",
            "steps": 2,
            "seed": 4,
            "output_format": "jpeg",
            "response_format": "b64_json",
        },
    )
    data_url = "data:image/jpeg;base64," + jpeg.json()["data"][0]["b64_json"]
    exif = post(server, "/sdapi/v1/png-info", {"image": data_url}).json()
    assert exif["parameters"]["Prompt"] == "a jpeg" and exif["parameters"]["Seed"] == "4"


def test_sillytaverns_body_as_its_server_forwards_it(server):
    """SillyTavern (src/endpoints/stable-diffusion.js) posts its client's body on: with its own url and auth,
    SD.Next's clip_skip, and its defaults (scheduler 'normal', hires off but its fields sent)."""
    body = {
        "url": server,
        "auth": "",
        "prompt": "a knight, castle",
        "negative_prompt": "lowres",
        "sampler_name": "Euler a",
        "scheduler": "normal",
        "steps": 4,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }
    reply = post(server, "/sdapi/v1/txt2img", body, {"Authorization": "Basic " + base64.b64encode(b"").decode()})
    assert reply.status == 200, reply.body
    assert len(reply.json()["images"]) == 1
    info = json.loads(reply.json()["info"])
    assert info["scheduler"] == "Uniform"  # A1111's Normal is its Uniform: our discrete
    saved = info["saved_images"]  # save_images: kept in our store as well
    download = request(server, "GET", saved[0].split(server, 1)[1])
    assert download.status == 200 and download.body == base64.b64decode(reply.json()["images"][0])
    assert "url" not in reply.json()["parameters"] and "auth" not in reply.json()["parameters"]
    for path in ("options", "sd-models", "samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-vae"):
        assert request(server, "GET", f"/sdapi/v1/{path}").status == 200, path


def test_open_webuis_body(server):
    """Open WebUI (backend/open_webui/routers/images.py): its automatic1111 engine's txt2img body."""
    data = {"prompt": "a teapot", "batch_size": 2, "width": 64, "height": 64, "steps": 4, "negative_prompt": "ugly"}
    reply = post(server, "/sdapi/v1/txt2img", data, {"authorization": ""})
    assert reply.status == 200, reply.body
    assert len(reply.json()["images"]) == 2 and "info" in reply.json()


def test_what_is_refused_names_its_field(server):
    cases = [
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": "x", "restore_faces": True}, "restore_faces"),
        ({"prompt": "x", "tiling": True}, "tiling"),
        ({"prompt": "x", "styles": ["Cinematic"]}, "styles"),
        ({"prompt": "x", "sampler_name": "UniPC"}, "sampler_name"),
        ({"prompt": "x", "scheduler": "Beta"}, "scheduler"),
        ({"prompt": "x", "subseed_strength": 0.5}, "subseed_strength"),
        ({"prompt": "x", "override_settings": {"sd_vae": "vae-ft-mse.safetensors"}}, "override_settings"),
        ({"prompt": "x", "enable_hr": True, "hr_upscaler": "Latent (bicubic antialiased)"}, "hr_upscaler"),
        ({"prompt": "x", "enable_hr": True, "hr_upscaler": "4x-NoSuch"}, "hr_upscaler"),
        ({"prompt": "x", "width": 65}, "width"),
        ({"prompt": "x", "mask": ""}, "mask"),  # an img2img field
    ]
    for body, param in cases:
        reply = post(server, "/sdapi/v1/txt2img", {**body, "steps": 1})
        assert reply.status == 400, (body, reply.body)
        assert reply.json()["error"]["param"] == param and reply.json()["detail"] == reply.json()["error"]["message"]
    no_image = post(server, "/sdapi/v1/img2img", {"prompt": "x", "steps": 1})
    assert no_image.status == 400 and no_image.json()["error"]["param"] == "init_images"
    masked = post(
        server,
        "/sdapi/v1/img2img",
        {
            "prompt": "x",
            "init_images": [png_b64(source_image())],
            "mask": png_b64(Image.new("L", (64, 64), 255)),
            "inpaint_full_res": True,
            **SMALL,
        },
    )
    assert masked.status == 400 and masked.json()["error"]["param"] == "inpaint_full_res"
    assert request(server, "GET", "/sdapi/v1/nothing").json()["detail"]  # a 404 has the detail too


def test_the_api_key_applies(models, tmp_path):
    registry = tiny_registry(models / "models")
    app = create_app(registry, FileStore(tmp_path / "files"), Settings(api_key="s3cret"))
    with live_server(app) as url:
        refused = request(url, "GET", "/sdapi/v1/options")
        assert refused.status == 401 and refused.json()["detail"]
        assert request(url, "GET", "/sdapi/v1/options", headers={"Authorization": "Bearer s3cret"}).status == 200
        basic = "Basic " + base64.b64encode(b"user:s3cret").decode()  # SillyTavern's, Open WebUI's
        assert request(url, "GET", "/sdapi/v1/options", headers={"Authorization": basic}).status == 200
        wrong = "Basic " + base64.b64encode(b"user:guess").decode()
        assert request(url, "GET", "/sdapi/v1/options", headers={"Authorization": wrong}).status == 401
        assert request(url, "POST", "/sdapi/v1/txt2img", b"{}", JSON).status == 401
        assert request(url, "GET", "/v1/models", headers={"Authorization": basic}).status == 401  # Bearer there
