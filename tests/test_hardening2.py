"""Hardening, second pass (issue 21): Host headers that are no host name, HTTP/1.0 without Host, no server
path in any answer, Retry-After on a fresh server, what a refused upload costs, clients that stop reading,
the store's reply gap, and the pinned versions a fresh clone installs.

Nothing here is timed: waits have generous limits only so that a broken server fails the test instead of
hanging it."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from api_server import FakePipeline, FakeRegistry, free_port, live_server, multipart, request
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.cors import host_problem
from mlx_sd_server.api.writes import WriteTimeoutGuard
from mlx_sd_server.job import build_job
from mlx_sd_server.lora.library import LoRALibrary
from mlx_sd_server.paths import without_paths
from mlx_sd_server.registry import ModelLoadError
from mlx_sd_server.store import FileStore
from mlx_sd_server.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-hardening"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
BAD_HOSTS = ["a" * 64, "a..b", ".", ".a", "localhost..", "a" * 60_000, "[::1", "[nonsense]:80", "localhost:http"]


def raw_http(url: str, data: bytes) -> tuple[int, dict, bytes]:
    """Send `data` as it is on a fresh connection and read the answer until the server closes it."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- 1. a Host header that is no host name -----------------------------------------------------------


def test_host_problem_names_what_werkzeug_cannot_route():
    for host in BAD_HOSTS:
        assert host_problem(host) is not None, host
    for host in ("localhost", "localhost:8080", "LOCALHOST.", "127.0.0.1:80", "[::1]", "[::1]:8080", "a" * 63,
                 "img.example", "xn--9ca.com", "", ":8080"):
        assert host_problem(host) is None, host


async def asgi(app, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """One request through the app's ASGI callable, with a scope as a server makes it (headers as sent)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(name.lower().encode(), value.encode("latin-1")) for name, value in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080), "extensions": {}}
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # no disconnect: the app answers first

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_bad_host_header_is_a_400_envelope_before_anything_else_through_the_asgi_app(tmp_path, caplog):
    app = create_app(FakeRegistry(), FileStore(tmp_path), Settings(api_key=KEY))

    async def run():
        replies = []
        for host in BAD_HOSTS:
            for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/images/generations")):
                status, body = await asgi(app, method, path, {"Host": host, "Content-Type": "application/json"},
                                          b'{"prompt": "x"}' if method == "POST" else b"")
                replies.append((host, path, status, json.loads(body)))
        good = await asgi(app, "GET", "/v1/models", {"Host": "localhost:8080"})
        return replies, good[0]

    replies, good = asyncio.run(run())
    for host, path, status, body in replies:
        assert status == 400, (host[:20], path, status)
        assert body["error"]["code"] == "invalid_host_header" and body["error"]["type"] == "invalid_request_error"
        assert len(body["error"]["message"]) < 200  # a 60 KB host is not echoed
    assert good == 401  # a good name still meets the API key
    assert errors_logged(caplog) == [] and "Traceback" not in caplog.text


def test_a_bad_host_header_over_a_socket_is_a_400_and_a_foreign_name_still_403(tmp_path, caplog):
    app = create_app(FakeRegistry(), FileStore(tmp_path), Settings(api_key=KEY, allowed_hosts=LOOPBACK))
    with live_server(app) as url:
        for host in BAD_HOSTS:
            status, _, body = raw_http(url, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert status == 400 and json.loads(body)["error"]["code"] == "invalid_host_header", host[:20]
        status, _, body = raw_http(url, b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
        status, _, _ = raw_http(url, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert status == 401
    assert errors_logged(caplog) == [] and "Traceback" not in caplog.text


# --- 2. HTTP/1.0 without Host ----------------------------------------------------------------------------


def test_http_1_0_without_a_host_is_answered_on_a_loopback_server(tmp_path):
    app = create_app(FakeRegistry(), FileStore(tmp_path), Settings(allowed_hosts=LOOPBACK))
    with live_server(app) as url:
        for path in ("/health", "/v1/models", "/v1/files"):
            status, _, body = raw_http(url, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            assert status == 200, (path, body)
        status, _, body = raw_http(url, b"GET /health HTTP/1.0\r\nHost: evil.example\r\n\r\n")
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"  # a Host sent is checked


# --- 3. no server path in an answer ----------------------------------------------------------------------


def lora_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "private" / "loras"
    (folder / "styles").mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    (folder / "styles" / "ink.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}  ")
    return folder


def test_lora_errors_name_the_lora_not_the_folder(tmp_path):
    folder = lora_folder(tmp_path)
    library = LoRALibrary(folder)
    messages = {}
    for name in ("missing", "broken", "styles/ink"):
        with pytest.raises(Exception) as raised:
            library.info(name)
        messages[name] = (raised.value.code, raised.value.message)
    assert messages["missing"][0] == "lora_not_found" and "'missing'" in messages["missing"][1]
    assert "LoRA folder" in messages["missing"][1]
    assert messages["broken"][0] == "invalid_lora" and "broken.safetensors" in messages["broken"][1]
    assert messages["styles/ink"][0] == "invalid_lora" and "styles/ink.safetensors" in messages["styles/ink"][1]
    for code, message in messages.values():
        assert str(tmp_path) not in message and "/private" not in message, message


def test_no_answer_carries_a_server_path(tmp_path):
    """The LoRA folder's path in a 400, and a model's files in a 503 (an OSError's text), stay in the log."""
    class Unloadable(FakeRegistry):
        def pipeline(self, name=None):
            raise ModelLoadError(f"could not load fake-model: [Errno 2] No such file or directory: "
                                 f"'{tmp_path}/Application Support/models/fake-model/unet.safetensors'")

    for registry, fields, status, code in (
            (FakeRegistry(loras=LoRALibrary(lora_folder(tmp_path))), {"prompt": "x <lora:missing:1>"}, 400,
             "lora_not_found"),
            (FakeRegistry(loras=LoRALibrary(lora_folder(tmp_path))), {"prompt": "x <lora:broken:1>"}, 400,
             "invalid_lora"),
            (Unloadable(), {"prompt": "x"}, 503, "model_unavailable")):
        app = create_app(registry, FileStore(tmp_path / "files"), Settings())
        with live_server(app) as url:
            reply = request(url, "POST", "/v1/images/generations",
                            json.dumps({**fields, "size": "64x64", "steps": 1}).encode(),
                            {"Content-Type": "application/json"})
        assert reply.status == status and reply.json()["error"]["code"] == code, reply.body
        assert str(tmp_path).encode() not in reply.body and b"Application Support" not in reply.body, reply.body


def test_without_paths_keeps_the_last_part_and_the_rest_of_the_text():
    assert without_paths("could not load m: [Errno 2] No such file or directory: "
                         "'/Users/me/Library/Application Support/mlx-sd-server/models/m/unet.safetensors'") == (
        "could not load m: [Errno 2] No such file or directory: 'unet.safetensors'")
    assert without_paths("/srv/loras/x.safetensors: key a.b [4, 8] is odd") == "x.safetensors: key a.b [4, 8] is odd"
    assert without_paths("see ~/models/m, then (/tmp/y).") == "see m, then (y)."
    assert without_paths("DELETE /v1/files/{id} or 1/2 or a/b") == "DELETE /v1/files/{id} or 1/2 or a/b"


# --- 4. Retry-After on a fresh server ---------------------------------------------------------------------


def job(steps: int = 4):
    return build_job({"prompt": "x", "size": "64x64", "steps": steps}, model_name="fake-model")


def test_retry_after_on_a_fresh_server_is_a_small_guess():
    """Nothing measured yet (the first job has not finished a step): it was 10 s per job, 90 s for a full
    queue of 8 that emptied in well under a second."""
    pipeline = FakePipeline()
    pipeline.gate.clear()
    worker = Worker(FakeRegistry(pipeline), max_queue=8)
    worker.start()
    try:
        worker.submit(job())
        assert pipeline.started.wait(60)
        for _ in range(8):
            worker.submit(job())
        assert worker.estimated_wait() <= Worker.FIRST_GUESS_CAP
    finally:
        pipeline.gate.set()
        worker.stop(timeout=60)


def test_retry_after_uses_the_measured_step_time_once_there_is_one_and_is_capped():
    worker = Worker(FakeRegistry(), max_queue=8)
    now = time.monotonic()
    running = worker.submit(job(steps=10))
    worker._queue.get_nowait()
    running.started = running.ready = now - 0.4
    running.first_step_at, running.last_step_at, running.steps_done, running.total_steps = now - 0.3, now, 4, 10
    worker._running = running  # 0.1 s a step, 6 steps left
    for _ in range(8):
        worker.submit(job(steps=10))
    assert worker.estimated_wait() == 9  # 0.6 s + 8 x 1 s (10 steps of 0.1 s), rounded up
    running.first_step_at = now - 3 * 3600  # an hour a step
    assert worker.estimated_wait() == Worker.MAX_RETRY_AFTER


# --- 5. what a refused upload costs -----------------------------------------------------------------------


GARBAGE = 19 * 2**20


@pytest.mark.parametrize("encoding", ["multipart", "json"])
@pytest.mark.parametrize("start", [b"", b"\x89PNG\r\n\x1a\n"], ids=["random", "png-signature"])
def test_a_19_mb_garbage_upload_is_refused_within_50_mb(tmp_path, encoding, start):
    """The process's Python allocations while the server reads and refuses it: +96 MB (multipart) and
    +104 MB (base64 in JSON) before; the body is now read as it arrives and judged by its first bytes."""
    garbage = start + os.urandom(GARBAGE - len(start))
    if encoding == "multipart":
        body, content_type = multipart({"prompt": "x", "image": ("a.png", garbage)})
    else:
        body, content_type = json.dumps({"prompt": "x", "image": base64.b64encode(garbage).decode()}).encode(), \
            "application/json"
    del garbage
    app = create_app(FakeRegistry(), FileStore(tmp_path), Settings(max_upload_bytes=32 * 2**20))
    with live_server(app) as url:
        request(url, "POST", "/v1/images/edits", b'{"prompt": "x"}', {"Content-Type": "application/json"})  # warm
        tracemalloc.start()
        try:
            reply = request(url, "POST", "/v1/images/edits", body, {"Content-Type": content_type})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_image", reply.body
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.1f} MB"


def test_a_good_upload_still_arrives_whole(tmp_path):
    """Spooled to a temporary file past 1 MB, a large real image decodes as before (multipart and JSON)."""
    image = Image.frombytes("RGB", (1024, 768), os.urandom(1024 * 768 * 3))
    path = tmp_path / "big.png"
    image.save(path)
    data = path.read_bytes()
    assert len(data) > 2 * 2**20
    pipeline = FakePipeline()
    app = create_app(FakeRegistry(pipeline), FileStore(tmp_path / "files"), Settings())
    with live_server(app) as url:
        body, content_type = multipart({"prompt": "x", "size": "64x64", "steps": "1", "image": ("a.png", data)})
        assert request(url, "POST", "/v1/images/edits", body, {"Content-Type": content_type}).status == 200
        body = json.dumps({"prompt": "x", "size": "64x64", "steps": 1,
                           "image": "data:image/png;base64," + base64.b64encode(data).decode()}).encode()
        assert request(url, "POST", "/v1/images/edits", body, {"Content-Type": "application/json"}).status == 200
    for sent in pipeline.jobs:
        assert sent.init_image.size == (1024, 768) and sent.init_image.tobytes() == image.tobytes()


# --- 6. clients that stop reading ------------------------------------------------------------------------


class NoisyPipeline(FakePipeline):
    """Images of noise: their PNGs do not compress, so a stream of them fills any socket buffer."""

    def generate(self, job):
        images = yield from super().generate(job)
        return [Image.frombytes("RGB", image.size, os.urandom(image.width * image.height * 3)) for image in images]


class Flag(logging.Handler):
    """Set once `needed` records containing `text` have been logged."""

    def __init__(self, text: str, needed: int = 1):
        super().__init__()
        self.text, self.needed, self.count, self.seen = text, needed, 0, threading.Event()

    def emit(self, record):
        if self.text in record.getMessage():
            self.count += 1
            if self.count >= self.needed:
                self.seen.set()


def test_a_stream_nobody_reads_is_closed_after_the_write_timeout(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlx_sd_server.api")
    flag = Flag("read nothing for", needed=2)
    logging.getLogger("mlx_sd_server.api").addHandler(flag)
    app = create_app(FakeRegistry(NoisyPipeline()), FileStore(tmp_path), Settings(write_timeout=0.5))
    body = json.dumps({"prompt": "x", "size": "1024x1024", "n": 4, "steps": 1, "stream": True}).encode()
    try:
        with live_server(app) as url:
            port = int(url.rsplit(":", 1)[1])
            stalled = []
            for _ in range(2):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                stalled.append(sock)  # and never read
            assert flag.seen.wait(120), "the server kept connections nobody reads"
            for sock in stalled:
                sock.settimeout(60)
                received = b""
                try:
                    while chunk := sock.recv(65536):
                        received += chunk
                except ConnectionResetError:  # aborted: what was buffered for it is dropped
                    pass
                sock.close()
                assert received.count(b"event: image_generation.completed") < 4
            assert request(url, "GET", "/health").status == 200
    finally:
        logging.getLogger("mlx_sd_server.api").removeHandler(flag)


class FakeTransport:
    """Its write buffer shrinks through `sizes` as the watchdog looks (the client reads), then the write
    completes; or, with one size, never shrinks (a client that reads nothing). Aborting ends the write,
    as aborting a real transport does."""

    def __init__(self, sizes, release: asyncio.Event):
        self.sizes, self.release, self.polls, self.aborted = list(sizes), release, 0, False

    def get_write_buffer_size(self) -> int:
        self.polls += 1
        if len(self.sizes) > 1 and self.polls >= len(self.sizes):
            self.release.set()  # the client took the rest
        return self.sizes[min(self.polls, len(self.sizes)) - 1]

    def abort(self) -> None:
        self.aborted = True
        self.release.set()


class FakeServerSide:
    """What Hypercorn's `send` is bound to, as far as the guard looks: an object with a writer."""

    def __init__(self, transport):
        self.writer = SimpleNamespace(transport=transport)
        self.release = transport.release

    async def send(self, message) -> None:
        if message["type"] == "http.response.body":
            await self.release.wait()


def run_guard(sizes) -> tuple[FakeTransport, list]:
    async def run():
        transport = FakeTransport(sizes, asyncio.Event())
        server = FakeServerSide(transport)
        seen = []

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            try:
                await send({"type": "http.response.body", "body": b"x" * 100, "more_body": False})
                seen.append("sent")
            except Exception as error:
                seen.append(type(error).__name__)
                raise

        await WriteTimeoutGuard(app, timeout=0.02)({"type": "http", "method": "GET", "path": "/"}, None, server.send)
        return transport, seen

    return asyncio.run(run())


def test_a_slow_client_that_keeps_reading_is_not_cut_off():
    transport, seen = run_guard([100_000, 90_000, 80_000, 70_000, 60_000, 50_000, 40_000, 30_000, 20_000, 0])
    assert seen == ["sent"] and not transport.aborted
    assert transport.polls >= 10  # well past the timeout (4 looks a timeout), it was never given up on


def test_a_client_that_reads_nothing_is_aborted_quietly():
    transport, seen = run_guard([100_000])
    assert seen == ["ClientStalled"] and transport.aborted


# --- 7. the reply gap ---------------------------------------------------------------------------------


DIES_AFTER_COMMIT = """
import asyncio, os, signal, sys
sys.path.insert(0, {tests!r})
from hypercorn.asyncio import serve
from api_server import FakeRegistry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.server import hypercorn_config
from mlx_sd_server.store import FileStore

class DiesAfterCommit(FileStore):
    def save_batch(self, items):
        stored = super().save_batch(items)
        os.kill(os.getpid(), signal.SIGKILL)  # the batch is committed; its reply is never sent
        return stored

app = create_app(FakeRegistry(), DiesAfterCommit(sys.argv[1]), Settings())
asyncio.run(serve(app, hypercorn_config("127.0.0.1", int(sys.argv[2]))))
"""


def test_a_batch_committed_but_never_replied_is_an_ordinary_file_that_retention_removes(tmp_path):
    files, port = tmp_path / "files", free_port()
    script = tmp_path / "server.py"
    script.write_text(DIES_AFTER_COMMIT.format(tests=str(Path(__file__).parent)))
    server = subprocess.Popen([sys.executable, str(script), str(files), str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # a start-up that never comes fails here rather than hanging
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
        body = json.dumps({"prompt": "x", "size": "64x64", "steps": 1, "n": 2}).encode()
        with pytest.raises((ConnectionError, http.client.HTTPException)):  # no reply: the process is gone
            request(f"http://127.0.0.1:{port}", "POST", "/v1/images/generations", body,
                    {"Content-Type": "application/json"})
        assert server.wait(60) == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    store = FileStore(files, max_age=3600)  # the next start
    kept = store.list()
    assert len(kept) == 2  # complete files no client received, listed like any other
    for entry in kept:
        _, data = store.read(entry.id)
        assert data.startswith(b"\x89PNG")
    assert sorted(store.prune(now=time.time() + 2 * 3600)) == sorted(entry.id for entry in kept)
    assert store.list() == [] and not [p for p in files.iterdir() if p.name.startswith("file_")]


# --- 8. the versions a fresh clone installs ---------------------------------------------------------------


def constraint_pins() -> dict[str, Requirement]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = requirement
    return pins


def test_constraints_pin_every_dependency_of_the_project_and_its_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pins = constraint_pins()
    for requirement in pins.values():
        (spec,) = requirement.specifier
        assert spec.operator == "==", requirement
    assert str(pins["torch"].specifier) == "==2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [item for extra in ("test", "bench", "torch")
                                        for item in project["optional-dependencies"][extra]]
    for item in wanted:
        requirement = Requirement(item)
        assert canonicalize_name(requirement.name) in pins, requirement.name
        assert requirement.specifier.contains(next(iter(pins[canonicalize_name(requirement.name)].specifier)).version), \
            requirement


def stub(path: Path, text: str) -> None:
    path.write_text(f"#!{shutil.which('bash')}\n{text}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_the_bootstrap_installs_with_the_constraints_and_again_when_they_change(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", checkout / "scripts" / "bootstrap.sh")
    shutil.copy(ROOT / "constraints.txt", checkout / "constraints.txt")
    (checkout / "pyproject.toml").write_text("[project]\nname = 'x'\nrequires-python = '>=3.10'\n")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("dirname", "rm", "touch"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    stub(bin_dir / "uname", "echo Linux\n")  # Linux: the torch install too
    stub(bin_dir / "python3.12", f"""echo "python $*" >> "{log}"
case "$1" in
  -c) echo 3.12 ;;
  -m) if [ "$2" = venv ]; then "{shutil.which('mkdir')}" -p "$3/bin" && "{shutil.which('cp')}" "$0" "$3/bin/python"; fi ;;
esac
""")

    def bootstrap() -> list[str]:
        log.write_text("")
        result = subprocess.run([shutil.which("bash"), str(checkout / "scripts" / "bootstrap.sh"), "test"],
                                env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        return [line for line in log.read_text().splitlines() if "-m pip" in line]

    installs = bootstrap()
    assert len(installs) == 4  # pip itself, torch, the project, spandrel (the upscalers' reference, without deps)
    assert all(f"-c {checkout}/constraints.txt" in line for line in installs), installs
    assert bootstrap() == []  # nothing changed: nothing to do
    stamp = checkout / ".venv" / ".installed-test"
    later = stamp.stat().st_mtime + 10
    os.utime(checkout / "constraints.txt", (later, later))
    assert len(bootstrap()) == 4  # new pins: installed again
