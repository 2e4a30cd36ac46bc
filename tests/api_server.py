"""Helpers for the API tests: a real Hypercorn server on a free local port, a raw HTTP client, and a
fake registry/pipeline for the cases a real engine cannot provoke on demand (slow jobs, failures)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hypercorn.asyncio import serve
from PIL import Image

from mlx_sd_server.api.server import hypercorn_config
from mlx_sd_server.engine.sampling.samplers import Step
from mlx_sd_server.job import Capabilities, JobError, ModelDefaults
from mlx_sd_server.lora.library import LoRALibrary
from mlx_sd_server.upscale.library import UpscalerLibrary
from mlx_sd_server.registry import ModelInfo, ModelNotFoundError, ModelStatus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` with Hypercorn on 127.0.0.1 in a background thread; yields the base url."""
    port = free_port()
    loop = asyncio.new_event_loop()
    stopped = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(app, hypercorn_config("127.0.0.1", port), shutdown_trigger=stopped.wait))
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=30)


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(base_url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> Reply:
    """One raw HTTP request; the path is sent exactly as given (no normalisation of `..`)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def multipart(fields: dict[str, str | bytes | tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode form fields (str) and files ((filename, bytes)) as multipart/form-data."""
    boundary = "testboundary7MA4YWxkTrZu0gW"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
        else:
            data = value.encode() if isinstance(value, str) else value
            head = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# --- a fake engine ---------------------------------------------------------------------------------


class FakePipeline:
    """Yields one step at a time, each waiting for `gate` to be open, and returns solid images coloured by
    seed; or raises `fail`."""

    def __init__(self, fail: Exception | None = None):
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail
        self.started = threading.Event()
        self.steps_run = 0
        self.finished = 0
        self.jobs = []

    def total_steps(self, job) -> int:
        return job.steps

    def generate(self, job):
        self.jobs.append(job)
        self.started.set()
        if self.fail is not None:
            raise self.fail
        for step in range(job.steps):
            self.gate.wait()
            self.steps_run += 1
            yield Step(step, 1.0 - step / job.steps, None, None)
        self.finished += 1
        return [Image.new("RGB", (job.width, job.height), (seed % 256, 0, 0)) for seed in job.seeds()]


@dataclass
class FakeRegistry:
    pipeline_: FakePipeline = field(default_factory=FakePipeline)
    has_controlnet: bool = False
    default_name: str = "fake-model"
    loras: LoRALibrary = field(default_factory=lambda: LoRALibrary(None))  # none
    upscalers: UpscalerLibrary = field(default_factory=lambda: UpscalerLibrary(Path("no-upscalers")))  # built-ins

    def names(self) -> list[str]:
        return [self.default_name]

    def info(self, name: str | None = None) -> ModelInfo:
        if name not in (None, self.default_name):
            raise ModelNotFoundError(f"model {name!r} not found")
        return ModelInfo(name=self.default_name, family="sd1", created=1700000000, defaults=ModelDefaults(),
                         has_controlnet=self.has_controlnet, folder=Path("."),
                         capabilities=Capabilities("sd1", controlnet=self.has_controlnet))

    resolve = info  # strict: one model, and only its own name

    def pipeline(self, name: str | None = None) -> FakePipeline:
        self.info(name)
        return self.pipeline_

    def acquire(self, job) -> FakePipeline:
        return self.pipeline(job.model)

    def release(self, job) -> None:
        pass

    def loaded(self) -> list[str]:
        return [self.default_name]

    def status(self, name: str) -> ModelStatus:
        return ModelStatus(True, 0, None, False, 300.0)

    def size_bytes(self, name: str) -> int:
        return 0

    def memory(self) -> dict[str, int]:
        return {"budget_bytes": 2**30, "used_bytes": 0}

    def controlnets(self) -> list:
        return []

    def controlnet_for(self, info: ModelInfo, requested: str | None) -> str | None:
        if requested is None:
            return None
        raise JobError("ControlNet not found (this server has none)", "control_net", "controlnet_not_found", 404)

    def load(self, name: str, keep_alive: float | None = None) -> ModelStatus:
        return self.status(name)

    def unload(self, name: str) -> bool:
        return False


def tiny_registry(models: Path, **options):
    """The real registry serving the built-in random-weight model (the end-to-end engine)."""
    from mlx_sd_server.registry import TINY_MODEL_NAME, ModelRegistry

    return ModelRegistry([TINY_MODEL_NAME], models, **options)
