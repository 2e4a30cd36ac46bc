"""/v1/images/edits with several input images (issue 23): what an edit is depends on the model.

An instruction-edit model (`Capabilities.references` > 0: FLUX.2 klein, Kontext) reads its inputs as references
beside the prompt (`Job.reference_images`), or with a mask inpaints the first; any other model edits one image
(img2img, inpainting) and refuses a second. Tested at three levels: `build_job` with such capabilities directly;
the HTTP layer with a recording fake engine that declares them (every request shape: multipart `image[]` /
`image` / `image[0]`, JSON arrays of data URLs, bare base64 and OpenAI's objects, OpenAI's JSON `images`, the
`openai` SDK's `images.edit(image=[a, b])`), streaming and n > 1, metadata, limits and leaks; and the real
engine through the SDK: the tiny SD model refusing several images, a tiny FLUX.2 klein editing from two references
(and another image from another second reference: the inputs are read), and a tiny FLUX.1 Kontext editing from one
(another image from another input) and refusing a second image and `strength`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
import openai
import pytest
from PIL import Image

from api_server import FakePipeline, FakeRegistry, live_server, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.engine.sampling.samplers import Step
from mlx_sd_server.images import a1111_parameters, input_labels
from mlx_sd_server.job import Capabilities, JobError, Limits, ModelDefaults, build_job
from mlx_sd_server.store import FileStore
from test_metadata import parse_generation_parameters
from test_pipeline import sample_image

EDIT = "/v1/images/edits"
# An instruction-edit model as FLUX.2 klein's spec would declare it: references, inpainting, no img2img, 16-px sides
KLEIN = Capabilities("flux2", img2img=False, inpainting=True, controlnet=False, lora=False, size_multiple=16,
                     references=4)
NATIVE = ModelDefaults(steps=2, cfg_scale=1.0, sample_method="euler", width=1024, height=1024)


def png(size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:10]


def job_error(fields, images=None, **options) -> JobError:
    with pytest.raises(JobError) as caught:
        build_job({"prompt": "p", **fields}, images, **options)
    return caught.value


# --- build_job: the validation layer ---------------------------------------------------------------------

A, B, C = (Image.new("RGB", size) for size in ((300, 200), (64, 64), (48, 80)))


def test_an_instruction_edit_reads_every_input_as_a_reference():
    job = build_job({"prompt": "put the cat on the sofa"}, {"image": [A, B]}, capabilities=KLEIN, defaults=NATIVE)
    assert job.reference_images == (A, B) and job.init_image is None and job.mask is None
    single = build_job({"prompt": "p"}, {"image": A}, capabilities=KLEIN, defaults=NATIVE)  # one, as today
    assert single.reference_images == (A,) and single.init_image is None


def test_an_instruction_edit_with_a_mask_inpaints_the_first_and_reads_the_rest():
    mask = Image.new("L", A.size, 255)
    job = build_job({"prompt": "p", "strength": 0.8}, {"image": [A, B, C], "mask": mask}, capabilities=KLEIN,
                    defaults=NATIVE)
    assert job.init_image is A and job.mask is mask and job.reference_images == (B, C) and job.strength == 0.8
    error = job_error({}, {"image": [A, B], "mask": mask}, capabilities=dataclasses.replace(KLEIN, inpainting=False))
    assert (error.param, error.code) == ("mask", "unsupported_parameter") and "inpainting" in error.message
    error = job_error({}, {"image": [B, A], "mask": mask}, capabilities=KLEIN)  # the mask is the first image's size
    assert (error.param, error.code) == ("mask", "invalid_image_dimensions")


def test_strength_on_an_instruction_edit_without_a_mask_is_refused():
    error = job_error({"strength": 0.5}, {"image": [A]}, capabilities=KLEIN, defaults=NATIVE, model_name="klein")
    assert (error.param, error.code) == ("strength", "unsupported_parameter")
    assert "klein (flux2) edits by instruction" in error.message and "mask" in error.message


def test_more_images_than_the_model_or_the_server_takes_is_a_400_naming_the_limit():
    error = job_error({}, {"image": [B] * 5}, capabilities=KLEIN, model_name="klein")
    assert (error.param, error.code) == ("image", "invalid_value")
    assert error.message == "5 input images, and klein (flux2) takes at most 4"
    many = dataclasses.replace(KLEIN, references=40)
    assert len(build_job({"prompt": "p"}, {"image": [B] * 16}, capabilities=many).reference_images) == 16
    error = job_error({}, {"image": [B] * 17}, capabilities=many)
    assert (error.param, error.code) == ("image", "invalid_value") and "limit of 16" in error.message
    assert job_error({}, {"image": [B] * 3}, capabilities=many, limits=Limits(max_images=2)).param == "image"
    one = dataclasses.replace(KLEIN, references=1)  # Kontext's: one input image
    assert "takes at most 1" in job_error({}, {"image": [A, B]}, capabilities=one).message


def test_a_model_without_references_edits_one_image():
    sd = Capabilities("sd1")
    job = build_job({"prompt": "p", "strength": 0.4}, {"image": [A]}, capabilities=sd)
    assert job.init_image is A and job.reference_images == () and job.strength == 0.4
    error = job_error({}, {"image": [A, B]}, capabilities=sd, model_name="tiny")
    assert (error.param, error.code) == ("image", "invalid_value")
    assert error.message.startswith("2 input images, and tiny (sd1) takes 1: its edits are img2img")
    no_img2img = Capabilities("flux2", img2img=False, inpainting=False)  # FLUX.2 klein before its references
    assert job_error({}, {"image": A}, capabilities=no_img2img).code == "unsupported_parameter"


@pytest.mark.parametrize("source, defaults, multiple, expected", [
    ((300, 200), NATIVE, 16, (1248, 832)),  # 3:2 at 1024x1024's area
    ((64, 64), NATIVE, 16, (1024, 1024)),
    ((48, 80), ModelDefaults(), 8, (400, 664)),  # SD's 512x512
    ((1000, 50), NATIVE, 16, (4096, 208)),  # 20:1 at the area would be 4579 wide: the largest side bounds it
    ((50, 1000), ModelDefaults(width=64, height=64), 8, (64, 1280)),  # and the smallest side widens a thin one
])
def test_size_auto_and_an_absent_size_keep_the_first_inputs_aspect_at_the_native_area(source, defaults,
                                                                                      multiple, expected):
    caps = dataclasses.replace(KLEIN, size_multiple=multiple)
    for fields in ({}, {"size": "auto"}, {"size": " AUTO "}):
        job = build_job({"prompt": "p", **fields}, {"image": [Image.new("RGB", source), B]}, capabilities=caps,
                        defaults=defaults)
        assert (job.width, job.height) == expected, fields
        assert job.width % multiple == 0 and job.height % multiple == 0
    assert build_job({"prompt": "p", "size": "256x128"}, {"image": [A]}, capabilities=KLEIN).width == 256
    assert build_job({"prompt": "p", "width": 320}, {"image": [A]}, capabilities=KLEIN).height == 512  # as given
    plain = build_job({"prompt": "p", "size": "auto"}, defaults=NATIVE)  # no input: the model's size
    assert (plain.width, plain.height) == (1024, 1024)


def test_auto_size_stays_within_the_pixel_budget_and_the_networks_largest_side():
    tight = Limits(max_pixels=1024 * 1024)  # 924x1000 at that area rounds to 992x1072, over it
    job = build_job({"prompt": "p"}, {"image": [Image.new("RGB", (924, 1000))]}, capabilities=KLEIN,
                    defaults=NATIVE, limits=tight)
    assert (job.width, job.height) == (992, 1056)
    sd3 = dataclasses.replace(KLEIN, largest_side=1536)
    job = build_job({"prompt": "p"}, {"image": [Image.new("RGB", (400, 100))]}, capabilities=sd3, defaults=NATIVE)
    assert job.width == 1536 and job.height == 384


def test_references_are_checked_for_aspect_not_for_a_cover_fit():
    """A reference is scaled by the engine to its own area, never to cover the output: only the first input of
    an img2img edit (and a mask) is bounded by what covering the output would cost."""
    thin = Image.new("RGB", (2, 41))
    tall = Image.new("RGB", (10, 190))
    limits = Limits(max_fit_pixels=4096 * 4096)
    job = build_job({"prompt": "p", "size": "2048x2048"}, {"image": [B, tall]}, capabilities=KLEIN, limits=limits)
    assert job.reference_images[1] is tall  # covering 2048x2048 it would be 2048x38912
    error = job_error({"size": "2048x2048"}, {"image": [tall]}, limits=limits)  # img2img: fitted, refused
    assert (error.param, error.code) == ("image", "image_too_large")
    error = job_error({}, {"image": [B, Image.new("RGB", (2, 50))]}, capabilities=KLEIN)
    assert (error.param, error.code) == ("image", "invalid_image_dimensions") and error.message.startswith("image 2 ")
    assert job_error({}, {"image": [thin, B, B]}, capabilities=KLEIN, defaults=NATIVE).code == "invalid_image_dimensions"


def test_input_fidelity_is_accepted_on_edits_and_checked():
    job = build_job({"prompt": "p", "input_fidelity": "HIGH"}, {"image": [A]}, capabilities=KLEIN)
    assert job.reference_images == (A,)
    assert job_error({"input_fidelity": "max"}, {"image": [A]}, capabilities=KLEIN).param == "input_fidelity"
    error = job_error({"input_fidelity": "low"})
    assert (error.param, error.code) == ("input_fidelity", "unsupported_parameter")


def test_metadata_names_the_inputs_hashes_and_reads_back():
    hashes = (("image", "0123456789"), ("image", "abcdefabcd"), ("mask", "ffffffffff"))
    job = build_job({"prompt": "p"}, {"image": [A, A], "mask": Image.new("L", A.size)}, capabilities=KLEIN,
                    defaults=NATIVE, input_hashes=hashes)
    assert job.input_hashes == hashes
    text = a1111_parameters(job, 42, "klein")
    assert parse_generation_parameters(text)["Input hashes"] == \
        "image 1: 0123456789, image 2: abcdefabcd, mask: ffffffffff"
    assert input_labels((("image", "0123456789"),)) == ["image: 0123456789"]
    assert "Input hashes" not in a1111_parameters(build_job({"prompt": "p"}), 1, "m")


# --- HTTP, with a recording fake engine that declares references ---------------------------------------------


class DecodingPipeline(FakePipeline):
    """The fake engine, with latents that decode (so streamed partial images are made) to solid grey images."""

    def generate(self, job):
        self.jobs.append(job)
        for step in range(job.steps):
            yield Step(step, 1.0 - step / job.steps, None, [(job.width, job.height)] * job.n)
        return [Image.new("RGB", (job.width, job.height), (seed % 256, 0, 0)) for seed in job.seeds()]

    def decode_latents(self, denoised):
        return [Image.new("RGB", size, (128, 128, 128)) for size in denoised]


@dataclass
class EditRegistry(FakeRegistry):
    """A fake registry whose one model is an instruction-edit model (`capabilities`, `defaults`)."""

    pipeline_: FakePipeline = field(default_factory=DecodingPipeline)
    capabilities: Capabilities = KLEIN
    defaults: ModelDefaults = NATIVE

    def info(self, name: str | None = None):
        return dataclasses.replace(super().info(name), family=self.capabilities.family, defaults=self.defaults,
                                   capabilities=self.capabilities)

    resolve = info


@pytest.fixture(scope="module")
def engine():
    return EditRegistry()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    with live_server(create_app(engine, FileStore(tmp_path_factory.mktemp("files")))) as url:
        yield url


def post_parts(url: str, parts: list[tuple[str, str | tuple[str, bytes]]], path: str = EDIT):
    """A form whose part names may repeat (api_server.multipart takes a dict)."""
    boundary = "multiedit7MA4YWxkTrZu0gW"
    body = b""
    for name, value in parts:
        if isinstance(value, tuple):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    "Content-Type: image/png\r\n\r\n").encode()
            data = value[1]
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode(), value.encode()
        body += f"--{boundary}\r\n".encode() + head + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return request(url, "POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def post_json(url: str, path: str = EDIT, **fields):
    return request(url, "POST", path, json.dumps(fields).encode(), {"Content-Type": "application/json"})


SMALL = {"size": "64x64", "steps": "1"}
INPUTS = [png((64, 48), (200, 0, 0)), png((32, 32), (0, 200, 0)), png((48, 64), (0, 0, 200))]


def sizes(job) -> list[tuple[int, int]]:
    return [image.size for image in job.reference_images]


@pytest.mark.parametrize("names", [["image[]"] * 3, ["image"] * 3, ["image[0]", "image[1]", "image[2]"],
                                   ["image", "image[]", "image"]])
def test_multipart_repeated_image_parts_are_the_inputs_in_order(server, engine, names):
    reply = post_parts(server, [("prompt", "swap them"), *SMALL.items(),
                                *((name, (f"{i}.png", data)) for i, (name, data) in enumerate(zip(names, INPUTS)))])
    assert reply.status == 200, reply.body
    job = engine.pipeline_.jobs[-1]
    assert sizes(job) == [(64, 48), (32, 32), (48, 64)] and job.init_image is None
    assert [image.getpixel((0, 0)) for image in job.reference_images] == [(200, 0, 0), (0, 200, 0), (0, 0, 200)]


def test_json_takes_a_list_of_data_urls_bare_base64_and_openais_objects(server, engine):
    items = [data_url(INPUTS[0]), base64.b64encode(INPUTS[1]).decode(), {"b64_json": base64.b64encode(INPUTS[2]).decode()},
             {"image_url": data_url(INPUTS[0])}]
    reply = post_json(server, prompt="p", size="64x64", steps=1, image=items, response_format="b64_json")
    assert reply.status == 200, reply.body
    assert sizes(engine.pipeline_.jobs[-1]) == [(64, 48), (32, 32), (48, 64), (64, 48)]
    reply = post_json(server, prompt="p", size="64x64", steps=1, images=[{"image_url": data_url(INPUTS[2])}])
    assert reply.status == 200, reply.body  # OpenAI's JSON form
    assert sizes(engine.pipeline_.jobs[-1]) == [(48, 64)]
    reply = post_json(server, prompt="p", size="64x64", steps=1, image=data_url(INPUTS[1]))  # one, as today
    assert reply.status == 200 and sizes(engine.pipeline_.jobs[-1]) == [(32, 32)]


def test_a_large_json_list_is_read_without_a_text_copy(server, engine):
    """Images of over 64 KiB of base64 are set aside as bytes while the body is parsed, in a list too."""
    noisy = [Image.effect_noise((200, 160), 60 + i).convert("RGB") for i in range(2)]
    encoded = []
    for image in noisy:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    assert min(len(base64.b64encode(data)) for data in encoded) > 64 * 1024
    reply = post_json(server, prompt="p", size="64x64", steps=1,
                      image=[data_url(encoded[0]), {"b64_json": base64.b64encode(encoded[1]).decode()}])
    assert reply.status == 200, reply.body
    sent = engine.pipeline_.jobs[-1].reference_images
    assert [image.tobytes() for image in sent] == [image.tobytes() for image in noisy]


@pytest.mark.parametrize("body, param, code, words", [
    ({"image": [data_url(INPUTS[0])] * 5}, "image", "invalid_value", "takes at most 4"),
    ({"image": [data_url(INPUTS[0])] * 17}, "image", "invalid_value", "more than 16 input images"),
    ({"image": [data_url(INPUTS[0])], "images": [data_url(INPUTS[0])]}, "images", "invalid_value", "not both"),
    ({"image": [[data_url(INPUTS[0])]]}, "image", "invalid_type", "one image, not an array"),
    ({"image": [{"image_url": "https://example.com/cat.png"}]}, "image", "invalid_image", "fetches no urls"),
    ({"image": [{"file_id": "file-abc"}]}, "image", "unsupported_parameter", "Files API"),
    ({"image": [{"url": data_url(INPUTS[0])}]}, "image", "unknown_field", "'url'"),
    ({"image": [{"image_url": data_url(INPUTS[0]), "b64_json": "x"}]}, "image", "invalid_value", "one of"),
    ({"image": [{"image_url": {"url": "x"}}]}, "image", "invalid_type", "must be a string"),
    ({"image": [data_url(INPUTS[0]), 5]}, "image", "invalid_type", "image 2 must be"),
    ({"image": [data_url(INPUTS[0]), "%%%"]}, "image", "invalid_image", "image 2 must be a base64"),
    ({"image": [data_url(INPUTS[0]), data_url(png((2, 50)))]}, "image", "invalid_image_dimensions", "image 2 is 2x50"),
    ({"image": [], "size": "64x64"}, "image", "missing_required_parameter", "image is required"),
    ({"image": [data_url(INPUTS[0])], "strength": 0.5}, "strength", "unsupported_parameter", "no strength"),
    ({"image": [data_url(INPUTS[0])], "input_fidelity": "medium"}, "input_fidelity", "invalid_value", "high, low"),
    ({"images": [data_url(INPUTS[0])], "mask": {"image_url": data_url(png((10, 10)))}}, "mask",
     "invalid_image_dimensions", "same size"),
])
def test_what_an_edit_cannot_take_is_a_clear_400(server, body, param, code, words):
    reply = post_json(server, **{"prompt": "p", "steps": 1, **body})
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and words in error["message"], error


def test_images_is_openais_json_name_on_edits_only(server):
    reply = post_json(server, "/v1/images/generations", prompt="p", images=data_url(INPUTS[0]))
    assert reply.status == 400 and reply.json()["error"]["code"] == "unknown_field"
    reply = post_json(server, "/v1/images/generations", prompt="p", images=[data_url(INPUTS[0])])
    assert reply.status == 400 and reply.json()["error"]["param"] == "images"  # (an array: refused unread)
    reply = post_parts(server, [("prompt", "p"), ("images", ("a.png", INPUTS[0]))])  # a form says image[]
    assert reply.status == 400 and reply.json()["error"]["param"] == "images"


def test_a_mask_makes_it_inpainting_with_the_other_inputs_as_references(server, engine):
    mask = png((64, 48), (255, 255, 255))
    reply = post_parts(server, [("prompt", "p"), *SMALL.items(), ("strength", "0.9"),
                                *(("image[]", (f"{i}.png", data)) for i, data in enumerate(INPUTS)),
                                ("mask", ("m.png", mask))])
    assert reply.status == 200, reply.body
    job = engine.pipeline_.jobs[-1]
    assert job.init_image.size == (64, 48) and job.mask.getpixel((0, 0)) == 255 and job.strength == 0.9
    assert sizes(job) == [(32, 32), (48, 64)]


def test_a_transparent_input_is_a_reference_not_a_mask(server, engine):
    """OpenAI's 'no mask: the image's transparency' is img2img's convention; a cut-out is a reference."""
    cutout = png((64, 48), (10, 200, 10, 0), "RGBA")
    reply = post_parts(server, [("prompt", "p"), *SMALL.items(), ("image", ("cut.png", cutout))])
    assert reply.status == 200, reply.body
    job = engine.pipeline_.jobs[-1]
    assert job.mask is None and job.init_image is None and job.reference_images[0].mode == "RGB"


def test_absent_size_follows_the_first_input(server, engine):
    reply = post_parts(server, [("prompt", "p"), ("steps", "1"), ("image[]", ("a.png", png((300, 200)))),
                                ("image[]", ("b.png", INPUTS[1]))])
    assert reply.status == 200, reply.body
    job = engine.pipeline_.jobs[-1]
    assert (job.width, job.height) == (1248, 832)


def test_the_metadata_names_the_uploads_hashes(server):
    mask = png((64, 48), (255, 255, 255))
    reply = post_parts(server, [("prompt", "p"), *SMALL.items(), ("response_format", "b64_json"),
                                ("image[]", ("a.png", INPUTS[0])), ("image[]", ("b.png", INPUTS[1])),
                                ("mask", ("m.png", mask))])
    assert reply.status == 200, reply.body
    image = Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
    settings = parse_generation_parameters(image.text["parameters"])
    assert settings["Input hashes"] == (f"image 1: {short_hash(INPUTS[0])}, image 2: {short_hash(INPUTS[1])}, "
                                        f"mask: {short_hash(mask)}")
    reply = post_json(server, prompt="p", size="64x64", steps=1, output_format="jpeg", response_format="b64_json",
                      image=data_url(INPUTS[2]))
    jpeg = Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
    assert f'Input hashes: "image: {short_hash(INPUTS[2])}"' in jpeg.getexif().get_ifd(0x8769)[0x9286].decode(
        "utf_16_be", "ignore")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_sdk_sends_a_list_of_images(client, engine, tmp_path):
    paths = []
    for i, data in enumerate(INPUTS):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    files = [path.open("rb") for path in paths]
    try:
        result = client.images.edit(image=files, prompt="the three together", size="64x64", n=2,
                                    input_fidelity="high", response_format="b64_json", extra_body={"steps": 1})
    finally:
        for file in files:
            file.close()
    assert len(result.data) == 2 and [item.model_extra["seed"] for item in result.data] == [42, 43]
    job = engine.pipeline_.jobs[-1]
    assert sizes(job) == [(64, 48), (32, 32), (48, 64)] and job.n == 2 and job.prompt == "the three together"
    task = request(str(client.base_url).removesuffix("/v1/"), "GET",
                   f"/v1/images/tasks/{result.model_extra['task_id']}").json()  # a task, as a generation is
    assert task["state"] == "done"


@pytest.mark.parametrize("n", [1, 2])
def test_an_instruction_edit_streams_partial_images_and_n_images(client, engine, tmp_path, n):
    (tmp_path / "a.png").write_bytes(INPUTS[0])
    (tmp_path / "b.png").write_bytes(INPUTS[1])
    with (tmp_path / "a.png").open("rb") as a, (tmp_path / "b.png").open("rb") as b:
        events = list(client.images.edit(image=[a, b], prompt="p", size="64x64", n=n, stream=True, partial_images=2,
                                         extra_body={"steps": 4}))
    assert [event.type for event in events] == ["image_edit.partial_image"] * (2 * n) + ["image_edit.completed"] * n
    assert [(e.partial_image_index, e.model_extra["image_index"]) for e in events[:2 * n]] == [
        (index, image) for index in range(2) for image in range(n)]
    assert all(Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (64, 64) for e in events)
    assert len(engine.pipeline_.jobs[-1].reference_images) == 2


def test_models_publish_what_an_edit_is(server):
    (model,) = request(server, "GET", "/v1/models").json()["data"]
    assert (model["references"], model["inpainting"], model["img2img"]) == (4, True, False)
    assert (model["defaults"]["width"], model["defaults"]["height"]) == (1024, 1024)


def test_openapi_describes_the_image_lists(server):
    body = request(server, "GET", "/openapi.json").json()["paths"][EDIT]["post"]["requestBody"]["content"]
    as_json, as_form = body["application/json"]["schema"], body["multipart/form-data"]["schema"]
    assert as_json["properties"]["images"]["maxItems"] == 16 and "image" not in as_json["required"]
    assert as_json["anyOf"] == [{"required": ["image"]}, {"required": ["images"]}]
    item_shapes = as_json["properties"]["image"]["anyOf"]
    assert item_shapes[1]["type"] == "array" and item_shapes[1]["maxItems"] == 16
    assert as_form["properties"]["image[]"]["items"]["format"] == "binary"
    assert as_form["properties"]["input_fidelity"]["enum"] == ["high", "low"]


# --- limits, and nothing kept after a refusal ------------------------------------------------------------------


@pytest.fixture
def spooled(monkeypatch):
    """Every spooled upload the parsers make, to check that each is closed once the request is answered."""
    import mlx_sd_server.api.parsing as parsing
    import mlx_sd_server.images as images

    made = []
    original = images.spooled_upload

    def tracked():
        made.append(original())
        return made[-1]

    monkeypatch.setattr(parsing, "spooled_upload", tracked)
    monkeypatch.setattr(images, "spooled_upload", tracked)
    return made


def test_a_17th_image_part_is_refused_as_it_starts_and_nothing_is_kept(server, spooled):
    big = png((64, 48))
    reply = post_parts(server, [("prompt", "p"), *(("image[]", (f"{i}.png", big)) for i in range(17))])
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["param"] == "image" and "more than 16 image parts" in error["message"]
    assert len(spooled) == 16 and all(upload.closed for upload in spooled)


def test_refused_lists_close_their_uploads(server, spooled):
    large = base64.b64encode(png((200, 160)) + b"\0" * 70_000).decode()  # set aside, then spooled
    for body in ({"image": [large, large, "%%%"]}, {"image": [large] * 5}, {"image": [large, data_url(png((2, 50)))]}):
        spooled.clear()
        assert post_json(server, prompt="p", steps=1, **body).status == 400
        assert spooled and all(upload.closed for upload in spooled), body
    spooled.clear()
    reply = post_parts(server, [("prompt", "p"), ("image[]", ("a.png", INPUTS[0])), ("image[]", ("b.png", b"nope"))])
    assert reply.status == 400 and reply.json()["error"]["message"].startswith("image 2 is not a readable image")
    assert all(upload.closed for upload in spooled)


def test_a_requests_images_share_one_pixel_budget(engine, tmp_path):
    app = create_app(engine, FileStore(tmp_path), Settings(max_upload_pixels_total=2 * 64 * 48))
    with live_server(app) as url:
        two = [("image[]", (f"{i}.png", INPUTS[0])) for i in range(2)]
        assert post_parts(url, [("prompt", "p"), *SMALL.items(), *two]).status == 200
        reply = post_parts(url, [("prompt", "p"), *SMALL.items(), *two, ("image[]", ("c.png", INPUTS[1]))])
    assert reply.status == 400
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == ("image", "image_too_large")
    assert error["message"].startswith("image 3 (32x32) takes the request's images over this server's limit of 6144")


# --- the real engine ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_server(tmp_path_factory):
    app = create_app(tiny_registry(tmp_path_factory.mktemp("models")), FileStore(tmp_path_factory.mktemp("files")))
    with live_server(app) as url:
        yield url


def test_several_images_on_an_sd_model_are_a_400(sd_server, tmp_path):
    client = openai.OpenAI(base_url=f"{sd_server}/v1", api_key="unused", max_retries=0, timeout=60)
    (tmp_path / "a.png").write_bytes(INPUTS[0])
    with (tmp_path / "a.png").open("rb") as a, (tmp_path / "a.png").open("rb") as b:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(image=[a, b], prompt="p", size="64x64", extra_body={"steps": 1})
    error = caught.value.body
    assert error["param"] == "image" and "tiny-random-sd (sd1) takes 1" in error["message"]
    reply = post_json(sd_server, prompt="p", size="64x64", steps=1, image=[data_url(INPUTS[0])] * 2)
    assert reply.status == 400 and reply.json()["error"]["message"].startswith("2 input images")
    reply = post_json(sd_server, prompt="p", size="64x64", steps=1, image=[data_url(INPUTS[0])])  # a list of one
    assert reply.status == 200, reply.body


def test_an_sd_edit_without_a_size_keeps_its_images_aspect(sd_server):
    reply = post_json(sd_server, prompt="p", steps=1, image=data_url(png((96, 64))), response_format="b64_json")
    assert reply.status == 200, reply.body
    image = Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
    assert image.size == (624, 416)  # 3:2 at the tiny model's 512x512, in multiples of 8
    assert f'Input hashes: "image: {short_hash(png((96, 64)))}"' in image.text["parameters"]  # (quoted: a colon)


@pytest.fixture(scope="module")
def klein_server(tmp_path_factory):
    """A tiny FLUX.2 klein, served, and its capabilities (references: 4)."""
    import tiny_flux2
    from convert.model import convert_model
    from mlx_sd_server.registry import ModelRegistry

    root = tmp_path_factory.mktemp("klein")
    tiny_flux2.make_pipeline(root / "src")
    convert_model(root / "src", root / "models" / "klein-tiny", dtype="float32", progress=False)
    registry = ModelRegistry(["klein-tiny"], root / "models")
    with live_server(create_app(registry, FileStore(root / "files"))) as url:
        yield url, registry.info("klein-tiny").capabilities


def test_openai_sdk_instruction_edit_on_a_served_flux2_klein(klein_server, tmp_path):
    url, capabilities = klein_server
    assert capabilities.references == 4
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    count = min(2, capabilities.references)
    for i, data in enumerate(INPUTS[:count]):
        (tmp_path / f"{i}.png").write_bytes(data)
    files = [(tmp_path / f"{i}.png").open("rb") for i in range(count)]
    try:
        result = client.images.edit(image=files, prompt="a cat on a sofa", size="64x64", n=2,
                                    response_format="b64_json", extra_body={"steps": 2, "seed": 3})
        for file in files:
            file.seek(0)
        events = list(client.images.edit(image=files, prompt="a cat on a sofa", size="64x64", stream=True,
                                         partial_images=1, extra_body={"steps": 2, "seed": 3}))
    finally:
        for file in files:
            file.close()
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [image.size for image in images] == [(64, 64)] * 2
    expected = ", ".join(f"image {i + 1}: {short_hash(data)}" if count > 1 else f"image: {short_hash(data)}"
                         for i, data in enumerate(INPUTS[:count]))
    assert parse_generation_parameters(images[0].text["parameters"])["Input hashes"] == expected
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert base64.b64decode(events[-1].b64_json) == base64.b64decode(result.data[0].b64_json)  # seed 3, as above
    error = client.images.edit  # and what klein's instruction edit refuses
    with (tmp_path / "0.png").open("rb") as file, pytest.raises(openai.BadRequestError) as caught:
        error(image=file, prompt="p", size="64x64", extra_body={"steps": 1, "strength": 0.5})
    assert caught.value.body["param"] == "strength"


def sdk_edit(url: str, tmp_path, image: bytes | list[bytes], **extra_body) -> np.ndarray:
    """One `images.edit` through the `openai` SDK, 64x64 at seed 3, uploading `image` (a list: several files);
    the image as floats in [0, 1]."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    inputs = image if isinstance(image, list) else [image]
    for i, data in enumerate(inputs):
        (tmp_path / f"input{i}.png").write_bytes(data)
    files = [(tmp_path / f"input{i}.png").open("rb") for i in range(len(inputs))]
    try:
        result = client.images.edit(image=files if isinstance(image, list) else files[0], prompt="a cat on a sofa",
                                    size="64x64", response_format="b64_json", extra_body={"seed": 3, **extra_body})
    finally:
        for file in files:
            file.close()
    output = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert output.size == (64, 64)
    return np.asarray(output.convert("RGB"), np.float32) / 255


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


CHANGED = 0.05 / 255  # the least mean change another input must make (see the tests below)
# Two inputs of the same size that differ only in content (so in what a model reads, not in how many tokens it
# reads or at which resolution): a picture and its mirror image, colours swapped
PICTURE = png_of(sample_image(3).resize((64, 64)))
OTHER_PICTURE = png_of(Image.merge("RGB", sample_image(3).resize((64, 64)).split()[::-1]).transpose(
    Image.Transpose.FLIP_LEFT_RIGHT))


def test_a_served_klein_reads_every_reference(klein_server, tmp_path):
    """The same seed and prompt with reference b replaced by another image: another image. The same inputs again
    give the same bytes, so any change is the reference's; the tiny random model's is small (measured 0.24/255 on
    average: a pixel channel in four moves a level), hence the bound, well above nothing and under the change."""
    url, _ = klein_server
    a = INPUTS[0]
    first = sdk_edit(url, tmp_path, [a, PICTURE], steps=2)
    assert np.array_equal(sdk_edit(url, tmp_path, [a, PICTURE], steps=2), first)
    changed = float(np.abs(sdk_edit(url, tmp_path, [a, OTHER_PICTURE], steps=2) - first).mean())
    print(f"klein, reference b replaced: mean abs change {changed * 255:.2f}/255")
    assert changed > CHANGED


@pytest.fixture(scope="module")
def kontext_server(tmp_path_factory):
    """A tiny FLUX.1 Kontext (test_flux_kontext's: FluxKontextPipeline over tiny FLUX.1 dev), converted into a
    model folder whose name says Kontext, served."""
    from test_flux_kontext import kontext_pipeline

    from convert.model import convert_model
    from mlx_sd_server.registry import ModelRegistry

    root = tmp_path_factory.mktemp("kontext")
    kontext_pipeline(root / "src")
    convert_model(root / "src", root / "models" / "kontext-tiny", dtype="float32", progress=False)
    registry = ModelRegistry(["kontext-tiny"], root / "models")
    with live_server(create_app(registry, FileStore(root / "files"))) as url:
        yield url


def test_openai_sdk_instruction_edit_on_a_served_kontext(kontext_server, tmp_path):
    """One input image, read whole (resized to Kontext's 1024x1024 here): another input, another image (the
    same input again: the same bytes; measured 0.33/255 on average, bounded as the klein test's)."""
    (model,) = request(kontext_server, "GET", "/v1/models").json()["data"]
    assert (model["id"], model["references"], model["img2img"], model["inpainting"]) == ("kontext-tiny", 1, False,
                                                                                          False)
    first = sdk_edit(kontext_server, tmp_path, PICTURE, steps=2)
    assert np.array_equal(sdk_edit(kontext_server, tmp_path, PICTURE, steps=2), first)
    changed = float(np.abs(sdk_edit(kontext_server, tmp_path, OTHER_PICTURE, steps=2) - first).mean())
    print(f"Kontext, input replaced: mean abs change {changed * 255:.2f}/255")
    assert changed > CHANGED


@pytest.mark.parametrize("image, extra, param, words", [
    ([PICTURE, OTHER_PICTURE], {}, "image", "2 input images, and kontext-tiny (flux) takes at most 1"),
    (PICTURE, {"strength": 0.5}, "strength", "kontext-tiny (flux) edits by instruction"),
])
def test_what_a_served_kontext_refuses_is_a_400(kontext_server, tmp_path, image, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk_edit(kontext_server, tmp_path, image, steps=1, **extra)
    error = caught.value.body
    assert error["param"] == param and words in error["message"], error
