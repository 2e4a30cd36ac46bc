"""POST /v1/images/upscale and A1111's /sdapi/v1/extra-single-image over HTTP, with the built-in resamplers:
exact sizes and pixels, OpenAI's envelope (b64_json and url), JSON and multipart bodies, the upscaler's own
scale by default, the output bound, a full queue (429: an upscale is a task of the queue), and the source's
A1111 parameters carried over."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from api_server import FakePipeline, FakeRegistry, live_server, multipart, request
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.store import FileStore

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(create_app(FakeRegistry(), FileStore(tmp_path_factory.mktemp("files")))) as url:
        yield url


def png(image: Image.Image, parameters: str | None = None) -> bytes:
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info)
    return out.getvalue()


def source() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))


def post(url: str, path: str, body: dict):
    return request(url, "POST", path, json.dumps(body).encode(), JSON)


def decoded(data: str | bytes) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))


def test_lanczos_makes_the_exact_size_in_openais_envelope(server):
    image = source()
    reply = post(
        server,
        "/v1/images/upscale",
        {
            "image": base64.b64encode(png(image)).decode(),
            "upscaler": "lanczos",
            "scale": 2.5,
            "response_format": "b64_json",
        },
    )
    assert reply.status == 200, reply.body
    body = reply.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 1
    item = body["data"][0]
    made = decoded(item["b64_json"])
    assert made.size == (125, 75) and item["size"] == "125x75" and item["scale"] == 2.5
    assert np.array_equal(np.asarray(made), np.asarray(image.resize((125, 75), Image.Resampling.LANCZOS)))


def test_a_form_a_url_jpeg_and_the_default_scale(server):
    body, content_type = multipart({"image": ("in.png", png(source())), "upscaler": "nearest", "output_format": "jpeg"})
    reply = request(server, "POST", "/v1/images/upscale", body, {"Content-Type": content_type})
    assert reply.status == 200, reply.body
    item = reply.json()["data"][0]
    download = request(server, "GET", item["url"].split(server, 1)[1])
    assert download.status == 200 and download.body[:2] == b"\xff\xd8"
    assert decoded(download.body).size == (100, 60)  # a resampler has no scale of its own: 2


def test_the_sources_parameters_are_carried_over(server):
    text = "a fox\nSteps: 4, Sampler: Euler a, Seed: 3, Size: 50x30, Model: m"
    reply = post(
        server,
        "/v1/images/upscale",
        {
            "image": base64.b64encode(png(source(), text)).decode(),
            "upscaler": "lanczos",
            "response_format": "b64_json",
        },
    )
    assert decoded(reply.json()["data"][0]["b64_json"]).info["parameters"] == text


def test_what_is_refused(server):
    image = base64.b64encode(png(source())).decode()
    cases = [
        ({"image": image, "upscaler": "4x-NoSuch"}, 404, "upscaler"),
        ({"upscaler": "lanczos"}, 400, "image"),
        ({"image": image}, 400, "upscaler"),
        ({"image": image, "upscaler": "lanczos", "scale": 100}, 400, "scale"),  # 5000 px wide: over max_side
        ({"image": image, "upscaler": "lanczos", "scale": 0}, 400, "scale"),
        ({"image": image, "upscaler": "lanczos", "stream": True}, 400, "stream"),
        ({"image": image, "upscaler": "lanczos", "prompt": "x"}, 400, "prompt"),
    ]
    for fields, status, param in cases:
        reply = post(server, "/v1/images/upscale", fields)
        assert (reply.status, reply.json()["error"]["param"]) == (status, param), (fields, reply.body)


def test_a_full_queue_is_a_429(tmp_path):
    pipeline = FakePipeline()
    pipeline.gate.clear()  # the first job holds the worker
    app = create_app(FakeRegistry(pipeline), FileStore(tmp_path / "files"), Settings(max_queue=1))
    job = {"prompt": "x", "steps": 1, "size": "64x64", "response_format": "b64_json"}
    with live_server(app) as url:
        replies: list = []
        threads = [threading.Thread(target=lambda: replies.append(post(url, "/v1/images/generations", job)))]
        threads[0].start()
        assert pipeline.started.wait(30)
        threads.append(threading.Thread(target=lambda: replies.append(post(url, "/v1/images/generations", job))))
        threads[1].start()
        deadline = time.monotonic() + 30
        while len(request(url, "GET", "/v1/images/tasks").json()["data"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        full = post(
            url, "/v1/images/upscale", {"image": base64.b64encode(png(source())).decode(), "upscaler": "lanczos"}
        )
        assert full.status == 429 and full.headers.get("retry-after")
        pipeline.gate.set()
        for thread in threads:
            thread.join()
        assert [reply.status for reply in replies] == [200, 200]


def test_extra_single_image_as_a1111s_extras(server):
    image = source()
    text = "a fox\nSteps: 4, Sampler: Euler a, Seed: 3, Size: 50x30, Model: m"
    by_factor = post(
        server,
        "/sdapi/v1/extra-single-image",
        {
            "image": base64.b64encode(png(image, text)).decode(),
            "upscaler_1": "Lanczos",
            "upscaling_resize": 2,
        },
    )
    assert by_factor.status == 200, by_factor.body
    made = decoded(by_factor.json()["image"])
    assert made.size == (100, 60) and made.info["parameters"] == text
    assert np.array_equal(np.asarray(made), np.asarray(image.resize((100, 60), Image.Resampling.LANCZOS)))
    assert by_factor.json()["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"
    to_size = post(
        server,
        "/sdapi/v1/extra-single-image",
        {
            "image": "data:image/png;base64," + base64.b64encode(png(image)).decode(),
            "resize_mode": 1,
            "upscaling_resize_w": 120,
            "upscaling_resize_h": 120,
            "upscaler_1": "None",  # A1111's None: a resize
        },
    )
    assert decoded(to_size.json()["image"]).size == (120, 120)  # covered (200x120), then cropped
    refused = post(
        server,
        "/sdapi/v1/extra-single-image",
        {
            "image": base64.b64encode(png(image)).decode(),
            "upscaler_1": "Lanczos",
            "gfpgan_visibility": 0.5,
        },
    )
    assert (
        refused.status == 400 and refused.json()["detail"] and refused.json()["error"]["param"] == "gfpgan_visibility"
    )
