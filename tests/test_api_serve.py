"""`mlx-sd-server serve` as an operator runs it: a subprocess, real options, readable log lines."""

import json
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
    job_line = next(line for line in log.splitlines() if " job 1 done " in line)
    for part in ("model=tiny-random-sd", "size=64x64", "steps=2/2", "sampler=euler", "engine=DiffusionPipeline", "seconds="):
        assert part in job_line
    assert "Traceback" not in log
