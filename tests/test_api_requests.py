"""What a request turns into: the Job the engine receives (via a recording fake engine), for both
encodings, the OpenAI mask convention, and each of the reference's quirks that we fix."""

import base64
import io
import json

import pytest
from PIL import Image

from api_server import FakeRegistry, live_server, multipart, request
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.store import FileStore


@pytest.fixture(scope="module")
def engine():
    return FakeRegistry()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    with live_server(create_app(engine, FileStore(tmp_path_factory.mktemp("files")))) as url:
        yield url


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def last_job(engine):
    return engine.pipeline_.jobs[-1]


def post_json(url, path, **fields):
    return request(url, "POST", path, json.dumps(fields).encode(), {"Content-Type": "application/json"})


def post_form(url, path, **fields):
    body, content_type = multipart(fields)
    return request(url, "POST", path, body, {"Content-Type": content_type})


def test_size_is_width_by_height_and_all_n_are_returned(server, engine):
    reply = post_json(server, "/v1/images/generations", prompt="p", size="128x64", n=3, steps=1)
    assert reply.status == 200 and len(reply.json()["data"]) == 3
    job = last_job(engine)
    assert (job.width, job.height, job.n, job.model) == (128, 64, 3, "fake-model")


def test_form_negative_prompt_does_not_overwrite_prompt(server, engine):
    reply = post_form(server, "/v1/images/generations", prompt="a cat", negative_prompt="dogs", steps="1", size="64x64")
    assert reply.status == 200
    job = last_job(engine)
    assert (job.prompt, job.negative_prompt, job.steps) == ("a cat", "dogs", 1)


def test_openai_fields_are_accepted_and_null_means_absent(server, engine):
    reply = post_json(server, "/v1/images/generations", prompt="p", size="64x64", steps=1, user="u", quality="hd",
                      style="vivid", background="auto", moderation="low", negative_prompt=None)
    assert reply.status == 200 and last_job(engine).negative_prompt == ""


def test_negative_seed_is_random_and_echoed(server):
    seeds = {post_json(server, "/v1/images/generations", prompt="p", size="64x64", steps=1, seed=-1).json()["data"][0]["seed"]
             for _ in range(3)}
    assert len(seeds) > 1 and all(seed >= 0 for seed in seeds)


def test_edit_mask_alpha_zero_is_repaint(server, engine):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    reply = post_form(server, "/v1/images/edits", prompt="p", steps="1", size="64x64", negative_prompt="n",
                      image=("i.png", png(Image.new("RGB", (64, 64), "red"))), mask=("m.png", png(mask)))
    assert reply.status == 200
    job = last_job(engine)
    assert job.init_image.mode == "RGB" and job.mask.mode == "L" and job.negative_prompt == "n"
    assert job.mask.getpixel((0, 0)) == 255 and job.mask.getpixel((63, 0)) == 0


def test_edit_white_mask_without_alpha_is_repaint(server, engine):
    mask = Image.new("RGB", (64, 64), "black")
    mask.paste((255, 255, 255), (32, 0, 64, 64))
    post_form(server, "/v1/images/edits", prompt="p", steps="1", size="64x64",
              image=("i.png", png(Image.new("RGB", (64, 64)))), mask=("m.png", png(mask)))
    job = last_job(engine)
    assert job.mask.getpixel((0, 0)) == 0 and job.mask.getpixel((63, 0)) == 255


def test_edit_without_mask_uses_the_images_transparency(server, engine):
    image = Image.new("RGBA", (64, 64), (200, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 16, 16))
    post_form(server, "/v1/images/edits", prompt="p", steps="1", size="64x64", **{"image[]": ("i.png", png(image))})
    job = last_job(engine)
    assert job.mask.getpixel((0, 0)) == 255 and job.mask.getpixel((40, 40)) == 0
    assert job.init_image.getpixel((40, 40)) == (200, 0, 0)


def test_edit_opaque_image_is_plain_img2img(server, engine):
    post_form(server, "/v1/images/edits", prompt="p", steps="1", size="64x64", strength="0.3",
              image=("i.png", png(Image.new("RGB", (64, 64)))))
    job = last_job(engine)
    assert job.mask is None and job.strength == 0.3


def test_edit_json_with_data_url(server, engine):
    data_url = "data:image/png;base64," + base64.b64encode(png(Image.new("RGB", (80, 48), "blue"))).decode()
    reply = post_json(server, "/v1/images/edits", prompt="p", steps=1, size="64x64", image=data_url,
                      response_format="b64_json", output_format="webp")
    assert reply.status == 200
    assert Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"]))).format == "WEBP"
    assert last_job(engine).init_image.size == (80, 48)  # the pipeline fits it to the job's size


def test_cors_preflight_and_headers_for_a_granted_origin(engine, tmp_path):
    app = create_app(engine, FileStore(tmp_path), Settings(api_key="secret", cors_origins=("http://app.example",)))
    with live_server(app) as url:
        preflight = request(url, "OPTIONS", "/v1/images/generations",
                            headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status == 204  # answered before the API key check: browsers send none here
        headers = {k.lower(): v for k, v in preflight.headers.items()}
        assert headers["access-control-allow-origin"] == "http://app.example"
        assert "Authorization" in headers["access-control-allow-headers"]
        refused = request(url, "GET", "/v1/models", headers={"Origin": "http://app.example"})
        assert refused.status == 401
        assert {k.lower(): v for k, v in refused.headers.items()}["access-control-allow-origin"] == "http://app.example"
