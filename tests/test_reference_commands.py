"""The reference's (sd-api-server's) README, followed as written: its start command on a (tiny) Q8_0 GGUF,
then its documented curl requests verbatim — the server answers with images, and the second start reuses
the conversion the first one made."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import tiny_diffusers
from api_server import free_port, multipart
from gguf_layout import write_gguf
from ldm_layout import checkpoint_state

# From the reference's README: `wasmedge --dir .:. sd-api-server.wasm --model-name sd-v1.4 --model
# stable-diffusion-v1-4-Q8_0.gguf`, and `--socket-addr <ip-address>:<port>` to choose the port.
GGUF = "stable-diffusion-v1-4-Q8_0.gguf"
GENERATION = '{\n    "model": "sd-v1.4",\n    "prompt": "A cute baby sea otter"\n}'
EDIT_PROMPT = '"A cute baby sea otter with blue eyes"'  # curl's --form 'prompt="..."' drops the quotes


def tiny_sd14(dst: Path) -> Path:
    """A tiny SD 1.x single file as a Q8_0 GGUF. Its CLIP has the real vocabulary's size: a single file
    carries no tokenizer, so the conversion takes CLIP's real one. Its UNet attends only below full latent
    resolution, so the requests' default 512x512 images take seconds, not a minute, on a CPU."""
    from transformers import CLIPTextModel

    pipe = tiny_diffusers.make_pipeline(dst / "diffusers", "sd1")
    pipe.unet = tiny_diffusers.unet("sd1", down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    config = pipe.text_encoder.config
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 49408, 49406, 49407, 49407
    pipe.text_encoder = CLIPTextModel(config).eval()
    return write_gguf(checkpoint_state(pipe, "sd1"), dst / GGUF, "Q8_0")


def start(folder: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlx_sd_server.cli", "serve", "--model-name", "sd-v1.4", "--model", GGUF,
               "--socket-addr", f"127.0.0.1:{port}"]
    env = {**os.environ, "MLX_SD_MODEL_DIR": str(folder / "models")}
    with open(log, "ab") as out:
        return subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until_up(server: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)


def post(base: str, path: str, body: bytes, content_type: str) -> dict:
    reply = urllib.request.urlopen(urllib.request.Request(f"{base}{path}", body, {"Content-Type": content_type}),
                                   timeout=300)
    return json.load(reply)


def fetch_image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=30).read()))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    tiny_sd14(folder)
    return folder


def test_the_reference_readme_as_written(folder):
    port, log = free_port(), folder / "server.log"
    base = f"http://127.0.0.1:{port}"
    server = start(folder, port, log)
    try:
        wait_until_up(server, base, log)
        generated = post(base, "/v1/images/generations", GENERATION.encode(), "application/json")
        assert generated["model"] == "sd-v1.4"
        assert fetch_image(generated["data"][0]["url"]).size == (512, 512)
        as_sd = post(base, "/v1/images/generations", GENERATION.replace("sd-v1.4", "sd").encode(), "application/json")
        assert as_sd["model"] == "sd-v1.4"  # the reference ignores `model`; with one model, so do we

        otter = io.BytesIO()
        Image.open(io.BytesIO(urllib.request.urlopen(generated["data"][0]["url"]).read())).save(otter, "PNG")
        body, content_type = multipart({"image": ("otter.png", otter.getvalue()), "prompt": EDIT_PROMPT.strip('"')})
        edited = post(base, "/v1/images/edits", body, content_type)
        assert fetch_image(edited["data"][0]["url"]).size == (512, 512)
    finally:
        server.terminate()
        server.wait(timeout=30)
    first_log = log.read_text()
    assert "converting" in first_log and "Traceback" not in first_log

    port = free_port()
    server = start(folder, port, log)  # the second start loads the cached conversion
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}", log)
    finally:
        server.terminate()
        server.wait(timeout=30)
    second_log = log.read_text()[len(first_log):]
    assert "converting" not in second_log and "Traceback" not in second_log
