"""OpenAI image streaming (`stream: true`, `partial_images`), driven by the official `openai` SDK against a
live server running the real tiny random-weight model."""

import base64
import io
import json
import logging
import time

import httpx
import openai
import pytest
from PIL import Image

from api_server import FakePipeline, FakeRegistry, live_server, multipart, request, tiny_registry
from mlx_sd_server.api import create_app
from mlx_sd_server.api.images import partial_steps
from mlx_sd_server.store import FileStore

STEPS = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return FileStore(tmp_path_factory.mktemp("files"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, store):
    app = create_app(tiny_registry(tmp_path_factory.mktemp("models")), store)
    with live_server(app) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_file(tmp_path):
    path = tmp_path / "input.png"
    Image.new("RGB", (96, 80), (200, 100, 50)).save(path)
    return path


def header(reply, name: str) -> str:
    return {key.lower(): value for key, value in reply.headers.items()}[name.lower()]


def collect(stream):
    """(event, arrival time.time()) for each event the SDK yields."""
    return [(event, time.time()) for event in stream]


def job_end(caplog, task_id: str) -> float:
    """When the worker logged the job's end (its `job <id> done ...` line, written just after it finished)."""
    deadline = time.monotonic() + 30
    while True:
        ends = [r.created for r in caplog.records if r.getMessage().startswith(f"job {task_id} done ")]
        if ends:
            return ends[0]
        assert time.monotonic() < deadline, "no log line for the job"
        time.sleep(0.01)


def check_events(events, kind: str, n: int, partials: int, size=(64, 64), end: float | None = None):
    partial = [(e, t) for e, t in events if e.type == f"{kind}.partial_image"]
    completed = [(e, t) for e, t in events if e.type == f"{kind}.completed"]
    assert len(partial) + len(completed) == len(events)
    assert [e.type for e, _ in events] == [f"{kind}.partial_image"] * len(partial) + [f"{kind}.completed"] * n
    assert len(partial) == partials * n
    assert [(e.partial_image_index, e.model_extra["image_index"]) for e, _ in partial] == [
        (index, image) for index in range(partials) for image in range(n)]
    assert [e.model_extra["image_index"] for e, _ in completed] == list(range(n))
    for event, _ in events:
        assert event.size == f"{size[0]}x{size[1]}" and event.quality == "auto" and event.background == "opaque"
        assert event.output_format == "png" and event.created_at > 0
        image = decode(event.b64_json)
        assert image.size == size and image.format == "PNG"
    for event, _ in completed:
        assert event.usage.total_tokens == 0 and event.usage.input_tokens_details.image_tokens == 0
    if partial:  # they arrive while the job runs: before the completed events, and before the job ended
        assert max(t for _, t in partial) <= min(t for _, t in completed)
        assert end is not None and max(t for _, t in partial) < end
    return [e for e, _ in completed]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("partials", [0, 2])
def test_stream_generate(client, caplog, n, partials):
    caplog.set_level(logging.INFO)
    events = collect(client.images.generate(prompt="a lighthouse", size="64x64", n=n, stream=True,
                                            partial_images=partials, extra_body={"steps": STEPS, "seed": 11}))
    end = job_end(caplog, events[-1][0].model_extra["task_id"])
    completed = check_events(events, "image_generation", n, partials, end=end)
    plain = client.images.generate(prompt="a lighthouse", size="64x64", n=n, response_format="b64_json",
                                   extra_body={"steps": STEPS, "seed": 11})
    assert [base64.b64decode(e.b64_json) for e in completed] == [base64.b64decode(d.b64_json) for d in plain.data]
    assert [e.model_extra["seed"] for e in completed] == [11 + i for i in range(n)]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("partials", [0, 2])
def test_stream_edit(client, caplog, tmp_path, n, partials):
    caplog.set_level(logging.INFO)
    with open(png_file(tmp_path), "rb") as image:
        events = collect(client.images.edit(image=image, prompt="make it blue", size="64x64", n=n, stream=True,
                                            partial_images=partials,
                                            extra_body={"steps": STEPS, "seed": 21, "strength": 1.0}))
    end = job_end(caplog, events[-1][0].model_extra["task_id"])
    completed = check_events(events, "image_edit", n, partials, end=end)
    with open(png_file(tmp_path), "rb") as image:
        plain = client.images.edit(image=image, prompt="make it blue", size="64x64", n=n, response_format="b64_json",
                                   extra_body={"steps": STEPS, "seed": 21, "strength": 1.0})
    assert [base64.b64decode(e.b64_json) for e in completed] == [base64.b64decode(d.b64_json) for d in plain.data]


def test_stream_raw_format_and_task_header(server):
    """The wire format itself: text/event-stream, `event:` names, `data:` JSON, a chosen task id."""
    body = json.dumps({"prompt": "x", "size": "64x64", "steps": 2, "stream": True, "partial_images": 1}).encode()
    reply = request(server, "POST", "/v1/images/generations", body,
                    {"Content-Type": "application/json", "X-Request-Id": "my-stream-1"})
    assert reply.status == 200
    assert header(reply, "Content-Type").startswith("text/event-stream")
    assert header(reply, "X-Task-Id") == "my-stream-1"
    blocks = [block for block in reply.body.decode().split("\n\n") if block]
    names = [block.split("\n")[0] for block in blocks]
    assert names == ["event: image_generation.partial_image", "event: image_generation.completed"]
    data = [json.loads(block.split("\n")[1].removeprefix("data: ")) for block in blocks]
    assert data[0]["partial_image_index"] == 0 and data[1]["task_id"] == "my-stream-1"


def test_stream_multipart_form_fields(server, tmp_path):
    """A hand-made form (curl -F stream=true -F partial_images=1)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, "PNG")
    body, content_type = multipart({"image": ("in.png", buffer.getvalue()), "prompt": "x", "size": "64x64",
                                    "steps": "3", "stream": "true", "partial_images": "1"})
    reply = request(server, "POST", "/v1/images/edits", body, {"Content-Type": content_type})
    assert reply.status == 200
    assert [line for line in reply.body.decode().split("\n") if line.startswith("event:")] == [
        "event: image_edit.partial_image", "event: image_edit.completed"]


@pytest.mark.parametrize("fields, param", [
    ({"partial_images": 2}, "partial_images"),  # without stream
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": True, "partial_images": -1}, "partial_images"),
    ({"stream": True, "partial_images": 1.5}, "partial_images"),
    ({"stream": True, "partial_images": "two"}, "partial_images"),
    ({"stream": True, "partial_images": True}, "partial_images"),
    ({"stream": "maybe"}, "stream"),
])
def test_bad_stream_options_are_400_before_streaming(server, fields, param):
    body = json.dumps({"prompt": "x", "size": "64x64", "steps": 1, **fields}).encode()
    reply = request(server, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
    assert reply.status == 400 and header(reply, "Content-Type").startswith("application/json")
    assert reply.json()["error"]["param"] == param


def test_errors_before_the_stream_are_json(server):
    body = json.dumps({"prompt": "x", "size": "64x64", "steps": 0, "stream": True}).encode()
    reply = request(server, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
    assert reply.status == 400 and reply.json()["error"]["param"] == "steps"


def test_errors_after_the_stream_started_are_an_error_event(tmp_path):
    """The engine fails once the stream is open: an `error` event in OpenAI's envelope, which the SDK raises."""
    app = create_app(FakeRegistry(FakePipeline(fail=RuntimeError("secret detail"))), FileStore(tmp_path))
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIError) as caught:
            list(client.images.generate(prompt="x", size="64x64", stream=True, extra_body={"steps": 1}))
        assert caught.value.body["code"] == "internal_error" and "secret" not in str(caught.value)
        body = json.dumps({"prompt": "x", "size": "64x64", "steps": 1, "stream": True}).encode()
        reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        assert reply.status == 200
        assert reply.body.decode().startswith('event: error\ndata: {"error":{"message":')


def test_dropped_stream_cancels_the_job(server, store, caplog):
    caplog.set_level(logging.INFO)
    files_before = len(store.list())
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server}/v1/images/generations",
                         json={"prompt": "long", "size": "64x64", "steps": 150, "stream": True, "partial_images": 1}
                         ) as response:
            assert response.status_code == 200
            task_id = response.headers["X-Task-Id"]
            deadline = time.monotonic() + 60
            while True:  # the running task, with an ETA from its measured steps
                info = request(server, "GET", f"/v1/images/tasks/{task_id}").json()
                if info["state"] == "running" and info["step"] >= 3:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert info["total_steps"] == 150 and info["eta_seconds"] > 0 and info["seconds_per_step"] > 0
    deadline = time.monotonic() + 60
    while request(server, "GET", f"/v1/images/tasks/{task_id}").json()["state"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    while not any(r.getMessage().startswith(f"job {task_id} ") for r in caplog.records):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {task_id} "))
    assert " cancelled " in line and int(line.split("steps=")[1].split("/")[0]) < 150
    assert len(store.list()) == files_before
    assert request(server, "GET", "/v1/images/tasks").json()["data"] == []


def test_partial_steps_are_evenly_spaced():
    assert partial_steps(20, 3) == [5, 10, 15]
    assert partial_steps(6, 2) == [2, 4]
    assert partial_steps(10, 1) == [5]
    assert partial_steps(2, 3) == [1, 2]  # fewer than asked when the job is too short
    assert partial_steps(1, 1) == [1]
    assert partial_steps(0, 2) == []
