"""Task ids and the task API (/v1/images/tasks), over HTTP, with the fake engine holding jobs at will."""

import json
import logging
import threading
import time

import pytest

from api_server import FakePipeline, FakeRegistry, live_server, request
from mlx_sd_server.api import create_app
from mlx_sd_server.store import FileStore

JSON = {"Content-Type": "application/json"}


def post(url, headers=None, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(), {**JSON, **(headers or {})})


def header(reply, name):
    return {key.lower(): value for key, value in reply.headers.items()}.get(name.lower())


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def tasks(url):
    return request(url, "GET", "/v1/images/tasks").json()["data"]


@pytest.fixture
def held(tmp_path):
    """A live server whose fake engine waits at each step until `pipeline.gate` opens."""
    pipeline = FakePipeline()
    pipeline.gate.clear()
    store = FileStore(tmp_path / "files")
    app = create_app(FakeRegistry(pipeline), store)
    with live_server(app) as url:
        yield url, pipeline, store
        pipeline.gate.set()


def send_in_background(url, replies, name, **headers):
    thread = threading.Thread(target=lambda: replies.__setitem__(
        name, post(url, headers, prompt=name, size="64x64", steps=3)))
    thread.start()
    return thread


def test_list_get_and_cancel_queued_and_running_tasks(held, caplog):
    caplog.set_level(logging.INFO)
    url, pipeline, store = held
    replies = {}
    first = send_in_background(url, replies, "first", **{"X-Request-Id": "job-first"})
    assert pipeline.started.wait(30)
    second = send_in_background(url, replies, "second", **{"X-Request-Id": "job-second"})
    wait_for(lambda: len(tasks(url)) == 2)

    listed = tasks(url)
    assert [(t["id"], t["state"]) for t in listed] == [("job-first", "running"), ("job-second", "queued")]
    assert listed[0]["step"] == 0 and listed[0]["total_steps"] == 3 and "eta_seconds" in listed[0]
    assert listed[1]["position"] == 1 and listed[1]["size"] == "64x64" and listed[1]["n"] == 1
    got = request(url, "GET", "/v1/images/tasks/job-second").json()
    assert got["state"] == "queued" and got["position"] == 1

    # a client-chosen id is unique among live tasks
    duplicate = post(url, {"X-Request-Id": "job-second"}, prompt="x", size="64x64", steps=1)
    assert duplicate.status == 400 and duplicate.json()["error"]["code"] == "duplicate_request_id"

    # cancel the queued one (DELETE): its client gets a 409 at once
    cancelled = request(url, "DELETE", "/v1/images/tasks/job-second")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    second.join(30)
    assert replies["second"].status == 409
    assert replies["second"].json()["error"]["code"] == "task_cancelled"
    assert [t["id"] for t in tasks(url)] == ["job-first"]

    # cancel the running one (POST .../cancel): its client gets a 409 at once, the job stops after its step
    cancelled = request(url, "POST", "/v1/images/tasks/job-first/cancel")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    first.join(30)
    assert replies["first"].status == 409 and replies["first"].json()["error"]["code"] == "task_cancelled"
    assert tasks(url) == []
    pipeline.gate.set()
    wait_for(lambda: any(r.getMessage().startswith("job job-first cancelled ") for r in caplog.records))

    # the worker moves on; the queued job never ran; nothing was kept
    reply = post(url, prompt="third", size="64x64", steps=1, response_format="url")
    assert reply.status == 200
    assert [job.prompt for job in pipeline.jobs] == ["first", "third"]
    assert len(store.list()) == 1  # only the third job's image
    assert request(url, "GET", "/v1/images/tasks/job-first").json()["state"] == "cancelled"
    assert request(url, "GET", "/v1/images/tasks/job-second").json()["state"] == "cancelled"
    assert any("task job-second cancelled" in r.getMessage() for r in caplog.records)

    # a finished task cannot be cancelled; a cancelled one stays cancelled (idempotent)
    done_id = reply.json()["task_id"]
    assert request(url, "GET", f"/v1/images/tasks/{done_id}").json()["state"] == "done"
    finished = request(url, "DELETE", f"/v1/images/tasks/{done_id}")
    assert finished.status == 409 and finished.json()["error"]["code"] == "task_finished"
    assert request(url, "DELETE", "/v1/images/tasks/job-first").status == 200


def test_every_job_has_a_task_id(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    app = create_app(FakeRegistry(), FileStore(tmp_path))
    with live_server(app) as url:
        reply = post(url, prompt="x", size="64x64", steps=1)
        assert reply.status == 200
        task_id = reply.json()["task_id"]
        assert header(reply, "X-Task-Id") == task_id and task_id.startswith("task_")
        chosen = post(url, {"X-Request-Id": "client.chosen:id-1"}, prompt="x", size="64x64", steps=1,
                      response_format="b64_json")
        assert chosen.json()["task_id"] == header(chosen, "X-Task-Id") == "client.chosen:id-1"
        # a finished id may be chosen again
        again = post(url, {"X-Request-Id": "client.chosen:id-1"}, prompt="x", size="64x64", steps=1)
        assert again.status == 200
        info = request(url, "GET", f"/v1/images/tasks/{task_id}").json()
        assert info["state"] == "done" and info["step"] == info["total_steps"] == 1
        assert info["finished_at"] >= info["started_at"] >= info["created_at"] - 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
    assert lines[0].startswith(f"job {task_id} done ") and lines[1].startswith("job client.chosen:id-1 done ")


@pytest.mark.parametrize("value", ["", "-starts-with-dash", "has space", "x" * 65, "slash/inside", "ü"])
def test_bad_request_ids_are_400(tmp_path, value):
    app = create_app(FakeRegistry(), FileStore(tmp_path))
    with live_server(app) as url:
        reply = post(url, {"X-Request-Id": value.encode("utf-8").decode("latin-1")}, prompt="x", size="64x64",
                     steps=1)
        assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_request_id"


def test_unknown_task_is_404(tmp_path):
    app = create_app(FakeRegistry(), FileStore(tmp_path))
    with live_server(app) as url:
        for method, path in [("GET", "/v1/images/tasks/nope"), ("DELETE", "/v1/images/tasks/nope"),
                             ("POST", "/v1/images/tasks/nope/cancel")]:
            reply = request(url, method, path)
            assert reply.status == 404 and reply.json()["error"]["code"] == "task_not_found", (method, path)
        assert request(url, "GET", "/v1/images/tasks").json() == {"object": "list", "data": []}


def test_finished_tasks_kept_are_bounded(tmp_path):
    from mlx_sd_server.worker import Worker

    app = create_app(FakeRegistry(), FileStore(tmp_path))
    with live_server(app) as url:
        ids = [post(url, prompt="x", size="64x64", steps=1, response_format="b64_json").json()["task_id"]
               for _ in range(3)]
        worker = app.extensions["mlx_sd_server"].worker
        worker.FINISHED_KEPT = 2
        post(url, prompt="x", size="64x64", steps=1, response_format="b64_json")
        assert request(url, "GET", f"/v1/images/tasks/{ids[0]}").status == 404
        assert request(url, "GET", f"/v1/images/tasks/{ids[2]}").status == 200
        assert Worker.FINISHED_KEPT == 100


def test_a_task_can_be_followed_as_server_sent_events(held):
    """progress events while it runs (each a change of state), then one event named by how it ended."""
    url, pipeline, _ = held
    replies = {}
    sender = send_in_background(url, replies, "followed", **{"X-Request-Id": "job-followed"})
    assert pipeline.started.wait(30)
    events = []

    def follow():
        stream = request(url, "GET", "/v1/images/tasks/job-followed/events")
        events.append((stream.status, stream.body.decode()))

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.3)  # the follower sees the task held at its first step
    pipeline.gate.set()
    sender.join(30)
    follower.join(30)
    assert replies["followed"].status == 200
    status, body = events[0]
    names = [line.removeprefix("event: ") for line in body.splitlines() if line.startswith("event: ")]
    assert status == 200 and names[0] == "progress" and names[-1] == "done" and names.count("done") == 1
    last = json.loads([line for line in body.splitlines() if line.startswith("data: ")][-1].removeprefix("data: "))
    assert last["state"] == "done" and last["id"] == "job-followed"
    assert request(url, "GET", "/v1/images/tasks/no-such-task/events").status == 404
