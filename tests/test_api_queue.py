"""The worker seen through HTTP: disconnects cancel jobs, a full queue answers 429, failures are clean."""

import json
import logging
import socket
import threading
import time

import pytest

from api_server import FakePipeline, FakeRegistry, live_server, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.registry import ModelLoadError
from mlx_sd_server.store import FileStore

JSON = {"Content-Type": "application/json"}


def post(url: str, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(), JSON)


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def running(url):
    return request(url, "GET", "/health").json()["queue"]["running"]


def test_disconnect_cancels_the_job_and_leaves_no_files(tmp_path, caplog):
    """The real tiny engine: a long job whose client hangs up is stopped between steps."""
    caplog.set_level(logging.INFO)
    store = FileStore(tmp_path / "files")
    app = create_app(tiny_registry(tmp_path / "models"), store)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "a long job", "size": "128x128", "steps": 150}).encode()
        client = socket.create_connection((host, int(port)))
        client.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: (running(url) or {}).get("steps_done", 0) >= 1)
        client.close()
        wait_for(lambda: running(url) is None)
        assert store.list() == []
        job_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
        assert len(job_lines) == 1 and " cancelled " in job_lines[0], job_lines
        steps_done = int(job_lines[0].split("steps=")[1].split("/")[0])
        assert 1 <= steps_done < 150
        assert "engine=DiffusionPipeline" in job_lines[0]
        # and the server goes on serving
        reply = post(url, prompt="a short job", size="64x64", steps=1)
        assert reply.status == 200 and len(store.list()) == 1


def test_full_queue_answers_429(tmp_path):
    pipeline = FakePipeline()
    pipeline.gate.clear()  # the first job blocks on its first step
    app = create_app(FakeRegistry(pipeline), FileStore(tmp_path), Settings(max_queue=1))
    with live_server(app) as url:
        replies = {}

        def send(name):
            replies[name] = post(url, prompt=name, size="64x64", steps=2)

        first = threading.Thread(target=send, args=("first",))
        first.start()
        assert pipeline.started.wait(30)
        second = threading.Thread(target=send, args=("second",))
        second.start()
        wait_for(lambda: request(url, "GET", "/health").json()["queue"]["waiting"] == 1)

        rejected = post(url, prompt="third", size="64x64", steps=2)
        assert rejected.status == 429
        assert rejected.json()["error"]["code"] == "queue_full"

        pipeline.gate.set()
        first.join(30)
        second.join(30)
        assert replies["first"].status == replies["second"].status == 200
        assert [job.prompt for job in pipeline.jobs] == ["first", "second"]


@pytest.mark.parametrize("failure, status, code", [
    (RuntimeError("secret detail at /home/user/x.py"), 500, "internal_error"),
    (ModelLoadError("could not load fake-model: out of memory"), 503, "model_unavailable"),
])
def test_engine_failures_are_clean_json_without_tracebacks(tmp_path, caplog, failure, status, code):
    app = create_app(FakeRegistry(FakePipeline(fail=failure)), FileStore(tmp_path))
    with live_server(app) as url:
        reply = post(url, prompt="x", size="64x64", steps=1)
        assert reply.status == status
        assert reply.json()["error"]["code"] == code
        assert b"Traceback" not in reply.body and b"secret" not in reply.body
        assert request(url, "GET", "/health").status == 200
    if status == 500:  # the operator gets the traceback, in the log
        assert any(record.exc_info for record in caplog.records)
