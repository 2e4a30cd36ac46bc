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


# From the reference's FLUX example (examples/flux.md): its start command and its request, verbatim.
FLUX_COMMAND = ["serve", "--model-name", "flux1-schnell", "--diffusion-model", "flux1-schnell-Q4_0.gguf",
                "--vae", "ae.safetensors", "--clip-l", "clip_l.safetensors", "--t5xxl", "t5xxl-Q8_0.gguf"]
FLUX_REQUEST = {"model": "flux1-schnell", "prompt": "a lovely cat", "cfg_scale": 1.0, "sample_method": "euler",
                "steps": 20}


def tiny_flux_files(folder: Path) -> None:
    """FLUX.1-schnell's split files, tiny: the transformer at FLUX's head size (one 128-wide head, so the
    default rotary split applies) as Q4_0, T5 as Q8_0, CLIP-L with CLIP's real vocabulary size."""
    from diffusers import FluxTransformer2DModel
    from safetensors.numpy import save_file
    from transformers import CLIPTextModel

    import tiny_flux
    import tiny_t5
    from bfl_layout import bfl_state
    from test_flux_files import clip_file_state, t5_file_state, vae_file_state

    transformer = tiny_flux.randomize(FluxTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 56, 56)), seed=7)
    state = {k: v.detach().float().numpy() for k, v in bfl_state(transformer.state_dict()).items()}
    write_gguf(state, folder / "flux1-schnell-Q4_0.gguf", "Q4_0")
    config = tiny_diffusers.text_encoder("sd1").config
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 49408, 49406, 49407, 49407
    save_file(clip_file_state(CLIPTextModel(config).eval()), str(folder / "clip_l.safetensors"))
    save_file(vae_file_state(tiny_flux.vae()), str(folder / "ae.safetensors"))
    write_gguf(t5_file_state(tiny_t5.t5_encoder()), folder / "t5xxl-Q8_0.gguf", "Q8_0")
    tiny_t5.write_t5_tokenizer(folder / "t5-tokenizer")


def offline_hub_cache(cache: Path, tokenizer: Path) -> None:
    """A Hugging Face cache holding FLUX.1-schnell's tokenizer_2/tokenizer.json, as a first start on a
    connected machine leaves it (the split files carry no T5 tokenizer)."""
    repo = cache / "models--black-forest-labs--FLUX.1-schnell"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    target = repo / "snapshots" / revision / "tokenizer_2"
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_bytes((tokenizer / "tokenizer.json").read_bytes())


def test_the_reference_flux_example_as_written(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from api_server import live_server, request
    from mlx_sd_server.api import Settings, create_app
    from mlx_sd_server.api.server import registry_from_args
    from mlx_sd_server.cli import build_parser
    from mlx_sd_server.store import FileStore

    tiny_flux_files(tmp_path)
    offline_hub_cache(tmp_path / "hub", tmp_path / "t5-tokenizer")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_SD_MODEL_DIR", str(tmp_path / "models"))
    registry = registry_from_args(build_parser().parse_args(FLUX_COMMAND))
    with live_server(create_app(registry, FileStore(tmp_path / "files"), Settings())) as url:
        reply = request(url, "POST", "/v1/images/generations", json.dumps(FLUX_REQUEST).encode(),
                        {"Content-Type": "application/json"})
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "flux1-schnell"
    assert registry.info().family == "flux" and registry.info().defaults.width == 1024
