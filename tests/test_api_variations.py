"""POST /v1/images/variations: OpenAI's `images.create_variation` and the reference's multipart form, on the
real tiny model (an img2img of the image at VARIATION_STRENGTH, the prompt "" by default: the same bytes as
that edit), JSON bodies, what is refused, and on an instruction-edit model an instruction."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import openai
import pytest
from PIL import Image

from api_server import FakeRegistry, live_server, multipart, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.images import VARIATION_INSTRUCTION, VARIATION_STRENGTH
from mlx_sd_server.store import FileStore

FAST = {"steps": 4, "seed": 7}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    registry = tiny_registry(tmp_path_factory.mktemp("models"))
    with live_server(create_app(registry, FileStore(tmp_path_factory.mktemp("files")))) as url:
        yield url


def png(size=(64, 64), colour=(200, 100, 50)) -> bytes:
    image = Image.new("RGB", size, colour)
    image.paste((20, 40, 220), (16, 16, 48, 48))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def post_form(url: str, path: str, fields: dict) -> object:
    body, content_type = multipart(fields)
    return request(url, "POST", path, body, {"Content-Type": content_type})


def test_sdk_create_variation_is_the_edit_it_stands_for(server, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes(png())
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    with open(source, "rb") as image:
        result = client.images.create_variation(
            image=image, n=2, size="64x64", response_format="b64_json", extra_body=FAST
        )
    assert len(result.data) == 2
    varied = [base64.b64decode(item.b64_json) for item in result.data]
    assert varied[0] != varied[1]  # seeds 7 and 8
    assert [item.model_extra["seed"] for item in result.data] == [7, 8]
    edit = post_form(server, "/v1/images/edits", {
        "image": ("in.png", png()), "prompt": "", "n": "2", "size": "64x64", "response_format": "b64_json",
        "strength": str(VARIATION_STRENGTH), "steps": "4", "seed": "7",
    })
    assert edit.status == 400  # an edit needs a prompt; a variation takes "" as that edit's prompt:
    same = post_form(server, "/v1/images/variations", {
        "image": ("in.png", png()), "n": "2", "size": "64x64", "response_format": "b64_json",
        "strength": str(VARIATION_STRENGTH), "prompt": "", "steps": "4", "seed": "7",
    })
    assert [base64.b64decode(item["b64_json"]) for item in same.json()["data"]] == varied
    text = Image.open(io.BytesIO(varied[0])).info["parameters"]
    assert "Denoising strength: 0.6" in text  # (random weights draw noise: closeness to the source means nothing)


def test_with_a_prompt_it_is_exactly_the_edit(server):
    fields = {"size": "64x64", "response_format": "b64_json", "prompt": "a red fox", "steps": "4", "seed": "3"}
    variation = post_form(server, "/v1/images/variations", {"image": ("a.png", png()), **fields})
    edit = post_form(server, "/v1/images/edits",
                     {"image": ("a.png", png()), "strength": str(VARIATION_STRENGTH), **fields})
    assert variation.status == edit.status == 200, variation.body
    assert variation.json()["data"][0]["b64_json"] == edit.json()["data"][0]["b64_json"]
    assert variation.json()["data"][0]["prompt"] == "a red fox"


def test_the_references_multipart_form_and_a_json_body(server):
    reply = post_form(server, "/v1/images/variations", {
        "image": ("otter.png", png()), "model": "sd", "n": "1", "size": "64x64", "response_format": "url",
        "user": "me", "steps": "2",
    })
    assert reply.status == 200, reply.body
    assert reply.json()["data"][0]["url"].startswith("http://127.0.0.1:")
    body = {"image": base64.b64encode(png()).decode(), "size": "64x64", "steps": 2, "response_format": "b64_json"}
    reply = request(server, "POST", "/v1/images/variations", json.dumps(body).encode(),
                    {"Content-Type": "application/json"})
    assert reply.status == 200 and len(reply.json()["data"]) == 1, reply.body


@pytest.mark.parametrize("fields, param, code", [
    ({"size": "64x64"}, "image", "missing_required_parameter"),
    ({"image": ("a.png", png()), "mask": ("m.png", png())}, "mask", "unknown_field"),
    ({"image": ("a.png", png()), "image[]": ("b.png", png())}, "image", "invalid_value"),
    ({"image": ("a.png", png()), "sampler": "euler"}, "sampler", "unknown_field"),
    ({"image": ("a.png", png()), "strength": "2"}, "strength", None),
])
def test_what_a_variation_refuses(server, fields, param, code):
    reply = post_form(server, "/v1/images/variations", {"steps": "1", **fields})
    error = reply.json()["error"]
    assert reply.status == 400 and error["param"] == param, reply.body
    assert code is None or error["code"] == code


class EditModelRegistry(FakeRegistry):
    """A fake model with instruction edits (as FLUX.2 klein), or one that only inpaints (as FLUX.1 Fill)."""

    def __init__(self, **capabilities):
        super().__init__()
        self.capabilities = capabilities

    def info(self, name=None):
        info = super().info(name)
        return dataclasses.replace(info, capabilities=dataclasses.replace(info.capabilities, **self.capabilities))

    resolve = info


def test_on_an_instruction_edit_model_a_variation_is_an_instruction(tmp_path):
    registry = EditModelRegistry(references=4, img2img=False)
    with live_server(create_app(registry, FileStore(tmp_path / "files"), Settings())) as url:
        reply = post_form(url, "/v1/images/variations", {"image": ("a.png", png()), "steps": "1", "size": "64x64"})
        assert reply.status == 200, reply.body
        [job] = registry.pipeline_.jobs
        assert job.prompt == VARIATION_INSTRUCTION and len(job.reference_images) == 1 and job.init_image is None
        reply = post_form(url, "/v1/images/variations", {"image": ("a.png", png()), "prompt": "as a watercolour",
                                                        "steps": "1", "size": "64x64"})
        assert registry.pipeline_.jobs[-1].prompt == "as a watercolour"
        reply = post_form(url, "/v1/images/variations", {"image": ("a.png", png()), "strength": "0.5"})
        assert reply.status == 400 and reply.json()["error"]["param"] == "strength"


def test_a_model_that_only_inpaints_makes_no_variations(tmp_path):
    registry = EditModelRegistry(mask_required=True)
    with live_server(create_app(registry, FileStore(tmp_path / "files"), Settings())) as url:
        reply = post_form(url, "/v1/images/variations", {"image": ("a.png", png())})
        assert reply.status == 400 and "only inpaints" in reply.json()["error"]["message"]
        settings = Settings(task="text2image")
    with live_server(create_app(FakeRegistry(), FileStore(tmp_path / "files2"), settings)) as url:
        reply = post_form(url, "/v1/images/variations", {"image": ("a.png", png())})
        assert reply.status == 403
