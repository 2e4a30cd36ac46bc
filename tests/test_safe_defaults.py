"""Safe defaults: what a web page in the user's browser can do to a server on their machine (nothing,
unless the operator grants its origin), the API key's scheme, log lines a request cannot forge, the
429's Retry-After, and the bootstrap's choice of Python."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from api_server import FakePipeline, FakeRegistry, live_server, multipart, request
from mlx_sd_server import service
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.cors import normalise_origin
from mlx_sd_server.api.server import (
    OneLineFormatter, bind_address, listening_settings, settings_from_args, warn_about_exposure,
)
from mlx_sd_server.cli import build_parser
from mlx_sd_server.store import FileStore
from mlx_sd_server.worker import QueueFullError, Worker

ROOT = Path(__file__).resolve().parent.parent
EVIL = "https://evil.example"
APP = "https://app.example"
JSON = {"Content-Type": "application/json"}
NO_FILE = "file_00000000-0000-0000-0000-000000000000"


def lower(headers: dict) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def generate(url, headers=None, **fields):
    body = json.dumps({"prompt": "x", "size": "64x64", "steps": 1, **fields}).encode()
    return request(url, "POST", "/v1/images/generations", body, {**JSON, **(headers or {})})


def preflight(url, path, method, origin):
    return request(url, "OPTIONS", path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                                  "Access-Control-Request-Headers": "authorization, content-type"})


# --- listening -----------------------------------------------------------------------------------------


def test_serve_listens_on_loopback_unless_told_otherwise():
    parse = build_parser().parse_args
    assert bind_address(parse(["serve"])) == ("127.0.0.1", 8080)
    assert bind_address(parse(["serve", "--host", "0.0.0.0", "--port", "9000"])) == ("0.0.0.0", 9000)
    assert bind_address(parse(["serve", "--socket-addr", "0.0.0.0:8081"])) == ("0.0.0.0", 8081)  # as it says
    assert bind_address(parse(["serve", "--host", "0.0.0.0", "--socket-addr", "[::1]:8082"])) == ("::1", 8082)


def test_the_service_keeps_an_explicit_host_and_the_cors_origins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SD_MODEL_DIR", str(tmp_path))
    argv = service.serve_argv(build_parser().parse_args(
        ["service", "install", "--host", "127.0.0.1", "--cors-origin", APP, "--cors-origin", "http://localhost:3000"]))
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    again = build_parser().parse_args(argv[3:])
    assert again.cors_origin == [APP, "http://localhost:3000"]
    assert "--host" not in service.serve_argv(build_parser().parse_args(["service", "install"]))


def sock_on(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    return sock


def test_image_urls_come_from_the_bound_address_and_loopback_answers_only_its_names():
    with sock_on("127.0.0.1") as sock:
        port = sock.getsockname()[1]
        settings = listening_settings(Settings(), "127.0.0.1", sock)
        assert settings.bound_url == f"http://127.0.0.1:{port}"
        assert {"localhost", "127.0.0.1", "::1"} <= set(settings.allowed_hosts)
        behind_proxy = listening_settings(Settings(download_url_prefix="https://img.example/x"), "localhost", sock)
        assert behind_proxy.bound_url == f"http://localhost:{port}" and "img.example" in behind_proxy.allowed_hosts
    with sock_on("0.0.0.0") as sock:
        settings = listening_settings(Settings(), "0.0.0.0", sock)
        assert settings.allowed_hosts == ()  # names on the network are not ours to know
        assert settings.bound_url == f"http://{socket.gethostname()}:{sock.getsockname()[1]}"


def test_listening_beyond_loopback_without_a_key_warns(caplog):
    caplog.set_level(logging.WARNING, logger="mlx_sd_server.server")
    with sock_on("127.0.0.1") as sock:
        warn_about_exposure(Settings(), sock)
    with sock_on("0.0.0.0") as sock:
        warn_about_exposure(Settings(api_key="k"), sock)
    assert caplog.records == []
    with sock_on("0.0.0.0") as sock:
        warn_about_exposure(Settings(), sock)
    assert len(caplog.records) == 1 and "without an API key" in caplog.records[0].getMessage()


def test_a_dns_rebound_page_gets_nothing_from_a_loopback_server(tmp_path):
    app = create_app(FakeRegistry(), FileStore(tmp_path), Settings(allowed_hosts=("localhost", "127.0.0.1", "::1")))
    with live_server(app) as url:
        port = url.rsplit(":", 1)[1]
        assert request(url, "GET", "/v1/files", headers={"Host": f"evil.example:{port}"}).status == 403
        refused = generate(url, {"Host": f"evil.example:{port}"})
        assert refused.status == 403 and refused.json()["error"]["code"] == "host_not_allowed"
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert request(url, "GET", "/v1/files", headers={"Host": host}).status == 200, host


# --- CORS ----------------------------------------------------------------------------------------------


def test_by_default_no_origin_gets_a_grant_nor_a_write(tmp_path):
    pipeline = FakePipeline()
    store = FileStore(tmp_path)
    with live_server(create_app(FakeRegistry(pipeline), store, Settings())) as url:
        listed = request(url, "GET", "/v1/files", headers={"Origin": EVIL})
        assert listed.status == 200 and "access-control-allow-origin" not in lower(listed.headers)
        for path in (f"/v1/files/{NO_FILE}", "/v1/images/generations", "/v1/files"):
            for method in ("DELETE", "POST", "GET"):
                answer = preflight(url, path, method, EVIL)
                assert "access-control-allow-origin" not in lower(answer.headers), (path, method)
                assert answer.status >= 400, (path, method)
        # "simple" requests a browser sends without a preflight: a form post from some web page
        body, content_type = multipart({"prompt": "x", "size": "64x64", "steps": "1"})
        refused = request(url, "POST", "/v1/images/generations", body, {"Content-Type": content_type, "Origin": EVIL})
        assert refused.status == 403 and refused.json()["error"]["code"] == "cors_origin_not_allowed"
        assert "--cors-origin https://evil.example" in refused.json()["error"]["message"]
        assert request(url, "DELETE", f"/v1/files/{NO_FILE}", headers={"Origin": "null"}).status == 403
        assert pipeline.jobs == []
        # clients outside a browser send no Origin
        assert generate(url).status == 200 and len(pipeline.jobs) == 1


def test_cors_origin_grants_that_origin_only(tmp_path):
    settings = Settings(cors_origins=(APP,), api_key="secret")
    with live_server(create_app(FakeRegistry(), FileStore(tmp_path), settings)) as url:
        granted = preflight(url, f"/v1/files/{NO_FILE}", "DELETE", APP)
        assert granted.status == 204  # answered before the API key check: browsers send none with it
        headers = lower(granted.headers)
        assert headers["access-control-allow-origin"] == APP
        assert "DELETE" in headers["access-control-allow-methods"] and "POST" not in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        assert "origin" in headers["vary"].lower()
        # our routes and their methods only
        assert preflight(url, "/v1/images/generations", "DELETE", APP).status == 403
        assert preflight(url, "/v1/images/generations", "POST", APP).status == 204
        assert preflight(url, "/no/such/path", "GET", APP).status == 404
        for origin in (EVIL, "https://app.example.evil.example", "http://app.example"):
            answer = preflight(url, f"/v1/files/{NO_FILE}", "DELETE", origin)
            assert answer.status == 403 and "access-control-allow-origin" not in lower(answer.headers), origin
        auth = {"Authorization": "Bearer secret"}
        reply = request(url, "GET", "/v1/models", headers={"Origin": APP, **auth})
        assert reply.status == 200 and lower(reply.headers)["access-control-allow-origin"] == APP
        assert "retry-after" in lower(reply.headers)["access-control-expose-headers"].lower()
        refused = request(url, "GET", "/v1/models", headers={"Origin": EVIL, **auth})
        assert "access-control-allow-origin" not in lower(refused.headers)
        assert generate(url, {"Origin": APP, **auth}).status == 200
        assert generate(url, {"Origin": EVIL, **auth}).status == 403


def test_cors_origin_star_grants_every_origin(tmp_path):
    with live_server(create_app(FakeRegistry(), FileStore(tmp_path), Settings(cors_origins=("*",)))) as url:
        assert lower(preflight(url, "/v1/images/generations", "POST", EVIL).headers)["access-control-allow-origin"] == "*"
        assert lower(request(url, "GET", "/health").headers)["access-control-allow-origin"] == "*"
        assert generate(url, {"Origin": EVIL}).status == 200


def test_cors_origins_are_checked_and_normalised_at_start():
    assert normalise_origin("HTTPS://App.Example:443/") == APP
    assert normalise_origin("http://localhost:3000") == "http://localhost:3000"
    assert normalise_origin("http://[::1]:80") == "http://[::1]"
    for bad in ("localhost:3000", "app.example", "https://app.example/path", "ftp://x", "null", "https://u@x"):
        with pytest.raises(ValueError):
            normalise_origin(bad)
    args = build_parser().parse_args(["serve", "--cors-origin", "http://localhost:3000/", "--cors-origin", APP])
    assert settings_from_args(args).cors_origins == ("http://localhost:3000", APP)
    with pytest.raises(SystemExit, match="--cors-origin"):
        settings_from_args(build_parser().parse_args(["serve", "--cors-origin", "localhost:3000"]))


# --- API key -------------------------------------------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive(tmp_path):
    with live_server(create_app(FakeRegistry(), FileStore(tmp_path), Settings(api_key="sk-1"))) as url:
        for sent in ("Bearer sk-1", "bearer sk-1", "BEARER sk-1", "bEaReR   sk-1"):
            assert request(url, "GET", "/v1/models", headers={"Authorization": sent}).status == 200, sent
        for sent in ("bearer sk-2", "Basic sk-1", "sk-1", "Bearersk-1", "bearer", "Bearer sk-1 sk-1"):
            reply = request(url, "GET", "/v1/models", headers={"Authorization": sent})
            assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key", sent


# --- logs ----------------------------------------------------------------------------------------------


def test_a_request_cannot_forge_log_lines_or_write_terminal_escapes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlx_sd_server.access")
    path = "/v1/files/x%0a2026-01-01%20INFO%20mlx_sd_server.access:%20GET%20/forged%20200%0d%1b[2J%1b]0;pwned%07"
    with live_server(create_app(FakeRegistry(), FileStore(tmp_path))) as url:
        assert request(url, "GET", path).status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "mlx_sd_server.access" and "/v1/files/x" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line), repr(line)
    assert line.startswith("GET /v1/files/x%0a2026-01-01%20INFO") and " 404 " in line


def test_log_messages_are_one_line_each():
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "model %s", ("a\nINFO forged\x1b[31m\u2028",), None)
    assert formatter.format(record) == "INFO model a\\nINFO forged\\x1b[31m\\u2028"


# --- 429 -----------------------------------------------------------------------------------------------


class Running:
    def __init__(self, started, steps_done, total_steps):
        self.started, self.steps_done, self.total_steps = started, steps_done, total_steps


def test_retry_after_is_the_measured_time_of_the_jobs_ahead():
    worker = Worker(FakeRegistry(), max_queue=2)
    assert worker.estimated_wait() == 1  # nothing ahead
    worker._durations.extend([4.0, 6.0])  # recent jobs took 5 s on average
    worker._running = Running(time.monotonic() - 3.0, steps_done=3, total_steps=4)  # ~1 s left
    worker._queue.put_nowait("waiting")
    worker._queue.put_nowait("waiting")
    assert worker.estimated_wait() in (11, 12)  # 1 s + 2 x 5 s
    with pytest.raises(QueueFullError) as raised:
        worker.submit(object())
    assert raised.value.retry_after in (11, 12)


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    pipeline = FakePipeline()
    pipeline.gate.clear()
    app = create_app(FakeRegistry(pipeline), FileStore(tmp_path), Settings(max_queue=1))
    with live_server(app) as url:
        threads = [threading.Thread(target=generate, args=(url,)) for _ in range(2)]
        threads[0].start()
        assert pipeline.started.wait(30)
        threads[1].start()
        deadline = time.monotonic() + 30
        while request(url, "GET", "/health").json()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        rejected = generate(url)
        pipeline.gate.set()
        for thread in threads:
            thread.join(30)
    assert rejected.status == 429
    assert int(lower(rejected.headers)["retry-after"]) >= 1


# --- bootstrap -----------------------------------------------------------------------------------------


def fake_python(bin_dir: Path, name: str, version: str, log: Path) -> None:
    """A stand-in `name` that reports `version`, makes a venv holding a copy of itself, and logs calls."""
    script = bin_dir / name
    script.write_text(f"""#!{shutil.which('bash')}
echo "{name} $*" >> "{log}"
case "$1" in
  -c) echo "{version}" ;;
  -m) if [ "$2" = venv ]; then "{shutil.which('mkdir')}" -p "$3/bin" && "{shutil.which('cp')}" "$0" "$3/bin/python"; fi ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def checkout(tmp_path):
    """A copy of the bootstrap in an empty checkout, and a PATH holding only stub Pythons and the few
    tools the script uses; `uname` says Darwin (a stock Mac)."""
    (tmp_path / "checkout" / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "checkout" / "scripts" / "bootstrap.sh")
    (tmp_path / "checkout" / "pyproject.toml").write_text("[project]\nname = 'x'\nrequires-python = '>=3.10'\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "rm", "touch"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "uname").write_text(f"#!{shutil.which('bash')}\necho Darwin\n")
    (bin_dir / "uname").chmod(0o755)
    return tmp_path


def bootstrap(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(checkout / "bin"), "HOME": str(checkout)}
    return subprocess.run([shutil.which("bash"), str(checkout / "checkout" / "scripts" / "bootstrap.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_bootstrap_with_only_a_too_old_python_says_what_to_install(checkout):
    log = checkout / "calls.log"
    fake_python(checkout / "bin", "python3", "3.9", log)
    result = bootstrap(checkout)
    assert result.returncode != 0
    assert "needs Python 3.10 or newer" in result.stderr and "python3 (3.9)" in result.stderr
    assert "brew install python@3.12" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (checkout / "checkout" / ".venv").exists()
    assert "-m venv" not in log.read_text()


def test_bootstrap_prefers_the_newest_suitable_python(checkout):
    log = checkout / "calls.log"
    bin_dir = checkout / "bin"
    fake_python(bin_dir, "python3", "3.9", log)
    fake_python(bin_dir, "python3.11", "3.11", log)
    assert bootstrap(checkout, "--print-python").stdout.strip() == str(bin_dir / "python3.11")
    fake_python(bin_dir, "python3.13", "3.13", log)
    assert bootstrap(checkout, "--print-python").stdout.strip() == str(bin_dir / "python3.13")
    for name in ("python3.13", "python3.11", "python3"):
        (bin_dir / name).unlink()
    fake_python(bin_dir, "python3", "3.12", log)  # a python3 that is new enough will do
    assert bootstrap(checkout, "--print-python").stdout.strip() == str(bin_dir / "python3")


def test_bootstrap_builds_with_a_suitable_python_and_rebuilds_a_venv_made_by_an_old_one(checkout):
    log = checkout / "calls.log"
    fake_python(checkout / "bin", "python3", "3.9", log)
    fake_python(checkout / "bin", "python3.12", "3.12", log)
    venv = checkout / "checkout" / ".venv"
    (venv / "bin").mkdir(parents=True)  # what the old bootstrap left on a stock Mac: a 3.9 venv, never installed
    fake_python(venv / "bin", "python", "3.9", log)
    result = bootstrap(checkout)
    assert result.returncode == 0, result.stderr
    assert "made by Python 3.9" in result.stderr and "rebuilding" in result.stderr
    calls = log.read_text().splitlines()
    assert f"python3.12 -m venv {venv}" in calls
    assert any(call.startswith("python3.12 -m pip install -q -e") for call in calls)  # the new venv's copy of it
    assert (venv / ".installed-base").exists()
    # the second run has nothing to do
    log.write_text("")
    assert bootstrap(checkout).returncode == 0
    assert "venv" not in log.read_text() and "pip" not in log.read_text()


def test_bootstrap_accepts_a_python_named_by_mlx_sd_python(checkout):
    log = checkout / "calls.log"
    fake_python(checkout / "bin", "python3", "3.9", log)
    fake_python(checkout, "my-python", "3.12", log)
    env_python = str(checkout / "my-python")
    result = subprocess.run([shutil.which("bash"), str(checkout / "checkout" / "scripts" / "bootstrap.sh"),
                             "--print-python"], env={"PATH": str(checkout / "bin"), "MLX_SD_PYTHON": env_python},
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == env_python
