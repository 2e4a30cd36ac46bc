"""`mlx-sd-server serve` as an operator runs it: a subprocess, real options, readable log lines."""

import json
import re
import subprocess
import sys
import time
import urllib.request

from api_server import free_port


def test_serve_command_serves_and_logs(tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "mlx_sd_server.cli", "serve", "--model", "tiny-random-sd",
               "--model-dir", str(tmp_path / "models"), "--store-dir", str(tmp_path / "files"),
               "--host", "127.0.0.1", "--port", str(port), "--download-url-prefix", "https://images.example"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                health = json.load(urllib.request.urlopen(f"{base}/health", timeout=5))
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        assert health["default_model"] == "tiny-random-sd"
        body = json.dumps({"prompt": "a cat", "size": "64x64", "steps": 2, "sample_method": "euler"}).encode()
        reply = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{base}/v1/images/generations", body, {"Content-Type": "application/json"}), timeout=60))
        assert reply["data"][0]["url"].startswith("https://images.example/v1/files/download/file_")
    finally:
        server.terminate()
        server.wait(timeout=30)
    log = log_path.read_text()
    assert "POST /v1/images/generations 200 " in log  # one line per request: method, path, status, time
    job_line = next(line for line in log.splitlines() if re.search(r" job task_[0-9a-f]{16} done ", line))
    task_id = re.search(r" job (task_[0-9a-f]{16}) done ", job_line)[1]
    assert re.search(rf"POST /v1/images/generations 200 .* {task_id}$", log, re.MULTILINE)  # one id, both lines
    for part in ("model=tiny-random-sd", "size=64x64", "steps=2/2", "sampler=euler", "engine=DiffusionPipeline", "seconds="):
        assert part in job_line
    assert "Traceback" not in log


def start_server(tmp_path, *options, env=None):
    """`serve` in a subprocess, on a free port and the default host; returns (process, base url, log path)."""
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "mlx_sd_server.cli", "serve", "--model", "tiny-random-sd",
               "--model-dir", str(tmp_path / "models"), "--store-dir", str(tmp_path / "files"), "--port", str(port),
               *options]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, log_path.read_text()
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            return server, base, log_path
        except OSError:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)


def test_sigterm_during_a_job_answers_503_and_exits_cleanly(tmp_path):
    """A service stop while a job runs and another waits: both clients get a 503 envelope, the process
    exits with status 0 within seconds, and the log has no traceback. The default host is loopback."""
    import signal
    import threading
    import urllib.error

    server, base, log_path = start_server(tmp_path)
    replies = {}

    def generate(name):
        body = json.dumps({"prompt": name, "size": "512x512", "steps": 150}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(
                f"{base}/v1/images/generations", body, {"Content-Type": "application/json"}), timeout=120)
            replies[name] = (200, None)
        except urllib.error.HTTPError as error:
            replies[name] = (error.code, json.load(error))
        except OSError as error:
            replies[name] = (None, repr(error))

    def queue():
        return json.load(urllib.request.urlopen(f"{base}/health", timeout=5))["queue"]

    clients = [threading.Thread(target=generate, args=(name,)) for name in ("running", "waiting")]
    try:
        clients[0].start()
        deadline = time.monotonic() + 120
        while (queue()["running"] or {}).get("steps_done", 0) < 1:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        clients[1].start()
        while queue()["waiting"] < 1:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        stopped_at = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log_path.read_text()
        assert time.monotonic() - stopped_at < 10
    finally:
        if server.poll() is None:
            server.kill()
        for client in clients:
            client.join(30)
    for name in ("running", "waiting"):
        status, body = replies[name]
        assert status == 503, (name, replies[name])
        assert body["error"]["code"] == "server_shutting_down" and "shutting down" in body["error"]["message"]
    log = log_path.read_text()
    assert "Traceback" not in log, log
    assert f"Running on {base} " in log  # no --host: 127.0.0.1
    assert re.search(r"job task_[0-9a-f]{16} stopped \(server shutting down\)", log) and log.rstrip().endswith("stopped")


def test_a_busy_port_is_one_line_and_a_nonzero_exit(tmp_path):
    import os
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "mlx_sd_server.cli", "serve", "--model-dir", str(tmp_path / "models"),
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "MLX_SD_NO_BLAS_REEXEC": "1"})
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [f"mlx-sd-server serve: cannot listen on 127.0.0.1:{port}: the port is in use (another "
                     "mlx-sd-server, or another program); choose another with --port"], lines
    assert not (tmp_path / "models").exists()  # failed before loading anything
