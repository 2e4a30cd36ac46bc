"""The commands that talk to a running server, against a live one serving real tiny models: `ps` (what is loaded,
how much memory, until when), `stop NAME`, `rm NAME` unloading first; with no server, `ps`/`stop` fail with one
clear line and `rm` still deletes. A lone ControlNet converted or pulled by name lands in `controlnets/`, is
listed by `models` and GET /v1/controlnets, picked by name (`--control-net`, `control_net`) and removed by `rm`."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

import tiny_diffusers
from api_server import free_port, live_server, multipart, request
from convert.model import convert_model
from mlx_sd_server.api import create_app
from mlx_sd_server.api.state import Settings
from mlx_sd_server.cli import main
from mlx_sd_server.client import DEFAULT_URL, URL_ENV, Server, ServerError, ServerTimeoutError, server_from
from mlx_sd_server.engine.model_io import MANIFEST
from mlx_sd_server.paths import CONTROLNET_FOLDER
from mlx_sd_server.registry import ModelRegistry, human_size, in_time, until
from mlx_sd_server.store import FileStore

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A tiny SD 1.x diffusers folder (`sd`) and a tiny ControlNet for it (`cn`), made once."""
    root = tmp_path_factory.mktemp("sources")
    pipe = tiny_diffusers.make_pipeline(root / "sd", "sd1")
    tiny_diffusers.controlnet(pipe.unet).save_pretrained(str(root / "cn"))
    return root


def install(sources: Path, models: Path, name: str, source: str = "sd", dtype: str = "float32") -> Path:
    return convert_model(sources / source, models / name, dtype=dtype, progress=False)


def serve(models: Path, files: Path, specs: list[str], settings: Settings = Settings(), **options):
    registry = ModelRegistry(specs, models, **options)
    return registry, live_server(create_app(registry, FileStore(files), settings))


def generate(url: str, model: str, **fields) -> None:
    body = {"prompt": "a cat", "model": model, "size": "64x64", "steps": 1, "response_format": "b64_json", **fields}
    reply = request(url, "POST", "/v1/images/generations", json.dumps(body).encode(), JSON)
    assert reply.status == 200, reply.body


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def rows(out: str) -> dict[str, str]:
    """ps's table: name -> its whole line (UNTIL has spaces), the header checked."""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "MEMORY", "UNTIL"], out
    return {line.split()[0]: line for line in lines[1:]}


def until_condition(condition, polls: int = 400) -> bool:
    """Poll for what the worker does between its idle polls (bounded, no timing asserted)."""
    for _ in range(polls):
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_ps_stop_and_rm_against_a_live_server(sources, tmp_path, capsys):
    models = tmp_path / "models"
    install(sources, models, "alpha")
    install(sources, models, "beta")
    registry, server = serve(models, tmp_path / "files", ["alpha"])
    with server as url:
        status, out, _ = run(capsys, "ps", "--url", url)
        assert status == 0 and rows(out) == {}  # nothing loaded yet: the header alone

        generate(url, "alpha")  # the server's keep-alive: 5 minutes
        reply = request(url, "POST", "/v1/models/beta/load", json.dumps({"keep_alive": -1}).encode(), JSON)
        assert reply.status == 200, reply.body
        status, out, err = run(capsys, "ps", "--url", url)
        table = rows(out)
        assert status == 0 and set(table) == {"alpha", "beta"}, out
        memory = registry.status("alpha").memory_bytes
        assert memory and table["alpha"].split()[:4] == ["alpha", "sd1", *human_size(memory).split()]
        assert table["alpha"].endswith("in 5 minutes") and table["beta"].endswith("kept")
        assert f"# {url}:" in err and "(--max-memory) in use" in err

        status, out, _ = run(capsys, "stop", "alpha", "--url", url)
        assert status == 0 and out.strip() == f"unloaded alpha ({human_size(memory)} freed)"
        assert registry.loaded() == ["beta"]
        status, out, _ = run(capsys, "stop", "alpha", "--url", url)
        assert status == 0 and out.strip() == "alpha was not loaded"
        status, out, err = run(capsys, "stop", "nope", "--url", url)
        assert status == 1 and out == ""
        assert err.startswith("mlx-sd-server stop: model 'nope' not found; this server has:"), err

        status, out, _ = run(capsys, "rm", "beta", "--model-dir", str(models), "--url", url)
        assert status == 0, out
        assert out.splitlines()[0] == f"beta was loaded in the server at {url}: unloaded first"
        assert out.splitlines()[1].startswith("removed beta (")
        assert not (models / "beta").exists() and registry.loaded() == []
        assert "beta" not in rows(run(capsys, "ps", "--url", url)[1])
        # a model not loaded: deleted without a word about the server
        status, out, _ = run(capsys, "rm", "alpha", "--model-dir", str(models), "--url", url)
        assert status == 0 and out.splitlines() == [out.splitlines()[0]] and out.startswith("removed alpha (")


def test_rm_leaves_a_loaded_model_of_the_same_name_from_another_directory(sources, tmp_path, capsys):
    served, other = tmp_path / "served", tmp_path / "other"
    install(sources, served, "alpha")
    install(sources, other, "alpha", dtype="float16")  # the same name, other files
    registry, server = serve(served, tmp_path / "files", ["alpha"])
    with server as url:
        generate(url, "alpha")
        status, out, _ = run(capsys, "rm", "alpha", "--model-dir", str(other), "--url", url)
        assert status == 0 and "unloaded first" not in out and not (other / "alpha").exists()
        assert registry.loaded() == ["alpha"] and (served / "alpha" / MANIFEST).exists()


def test_the_server_address_and_key_from_options_and_the_environment(sources, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    install(sources, models, "alpha")
    monkeypatch.delenv("API_KEY", raising=False)
    _, server = serve(models, tmp_path / "files", ["alpha"], Settings(api_key="sesame"))
    with server as url:
        status, _, err = run(capsys, "ps", "--url", url)
        assert status == 1 and err.strip() == "mlx-sd-server ps: missing API key: send 'Authorization: Bearer <key>'"
        status, _, err = run(capsys, "ps", "--url", url, "--api-key", "wrong")
        assert status == 1 and err.strip() == "mlx-sd-server ps: incorrect API key"
        assert run(capsys, "ps", "--url", url, "--api-key", "sesame")[0] == 0
        monkeypatch.setenv("API_KEY", "sesame")
        monkeypatch.setenv(URL_ENV, url.removeprefix("http://") + "/")  # no scheme, a trailing slash: as typed
        assert run(capsys, "ps")[0] == 0
        # a key the server refuses: rm says it could not unload first, and deletes all the same
        status, out, err = run(capsys, "rm", "alpha", "--model-dir", str(models), "--api-key", "wrong")
        assert status == 0 and out.startswith("removed alpha (") and not (models / "alpha").exists()
        assert "alpha was not unloaded first (incorrect API key)" in err
    monkeypatch.delenv(URL_ENV)
    assert server_from(argparse_namespace()).url == DEFAULT_URL
    monkeypatch.setenv(URL_ENV, "ftp://nowhere")
    with pytest.raises(ServerError, match=r"^\$MLX_SD_URL: 'ftp://nowhere' is not a server address"):
        server_from(argparse_namespace())
    with pytest.raises(SystemExit):
        main(["ps", "--url", "localhost:port"])


def argparse_namespace() -> argparse.Namespace:
    return argparse.Namespace(url=None, api_key=None)  # (as ps's, with no option given)


def test_with_no_server_ps_and_stop_fail_clearly_and_rm_still_deletes(sources, tmp_path, capsys):
    models = tmp_path / "models"
    install(sources, models, "alpha")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    line = f"no server answers at {url} (start it with mlx-sd-server serve)"
    status, out, err = run(capsys, "ps", "--url", url)
    assert (status, out, err) == (1, "", f"mlx-sd-server ps: {line}\n")
    status, out, err = run(capsys, "stop", "alpha", "--url", url)
    assert (status, out, err) == (1, "", f"mlx-sd-server stop: {line}\n")
    status, out, err = run(capsys, "rm", "alpha", "--model-dir", str(models), "--url", url)
    assert status == 0 and err == "" and out.startswith("removed alpha (") and not (models / "alpha").exists()


def test_client_errors_are_one_line(tmp_path):
    """Something other than this server answering: its status line, not a traceback."""
    from quart import Quart

    app = Quart("other")

    @app.get("/v1/models")
    async def html():
        return "<html>hello</html>"

    @app.get("/v1/models/x")
    async def teapot():
        return "no", 418

    @app.get("/v1/models/slow")
    async def slow():
        await asyncio.sleep(3)
        return {}

    with live_server(app) as url:
        with pytest.raises(ServerTimeoutError, match=rf"^the server at {url} did not answer within 0.5 s$"):
            Server(url).get("/v1/models/slow", timeout=0.5)
        with pytest.raises(ServerError, match="did not answer as mlx-sd-server does"):
            Server(url).get("/v1/models")
        with pytest.raises(ServerError, match=r"^HTTP 418") as caught:
            Server(url).get("/v1/models/x")
        assert caught.value.status == 418


def test_until_and_in_time():
    now = 1000.0
    assert until({"keep_alive": -1, "expires_at": None}, now) == "kept"
    assert until({"keep_alive": 300, "expires_at": None}, now) == "in use"
    assert until({"keep_alive": 300, "expires_at": now + 299}, now) == "in 5 minutes"
    assert [in_time(s) for s in (0.2, 1, 45, 89, 90, 3600, 7200, 86400 * 3)] == [
        "now",
        "in 1 second",
        "in 45 seconds",
        "in 89 seconds",
        "in 2 minutes",
        "in 60 minutes",
        "in 2 hours",
        "in 3 days",
    ]


def png_bytes() -> bytes:
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_controlnet_converted_by_name_lands_in_controlnets(sources, tmp_path, capsys):
    models = tmp_path / "models"
    status, out, _ = run(capsys, "convert", str(sources / "cn"), "--model-dir", str(models), "--dtype", "float32")
    folder = models / CONTROLNET_FOLDER / "cn"
    assert status == 0 and (folder / MANIFEST).exists() and not (models / "cn").exists()
    assert out.strip() == f"converted {sources / 'cn'} -> {folder} (a ControlNet: requests name it with control_net=cn)"
    # the name is taken, by a ControlNet or a model alike; a path is kept as given
    assert run(capsys, "convert", str(sources / "cn"), "--model-dir", str(models))[0] == 1
    status, _, err = run(capsys, "convert", str(sources / "sd"), "cn", "--model-dir", str(models))
    assert status == 1 and f"a ControlNet named cn is in {models / CONTROLNET_FOLDER}" in err
    assert run(capsys, "convert", str(sources / "cn"), str(tmp_path / "elsewhere"))[0] == 0
    assert (tmp_path / "elsewhere" / MANIFEST).exists()
    assert run(capsys, "convert", str(sources / "sd"), "base", "--model-dir", str(models), "--dtype", "float32")[0] == 0
    install(sources, models, "old-cn", source="cn")  # where ControlNets were converted before controlnets/

    status, out, _ = run(capsys, "models", "--model-dir", str(models))
    tables = out.split("\n\n")
    assert status == 0 and len(tables) == 2, out
    assert [line.split()[0] for line in tables[0].splitlines()[1:]] == ["base", "tiny-random-sd"]
    header, *lines = tables[1].splitlines()
    assert header.split() == ["NAME", "FITS", "SIZE", "SOURCE"]
    assert [line.split()[:2] for line in lines] == [["cn", "sd1"], ["old-cn", "sd1"]]
    assert str((sources / "cn").resolve()) in lines[0]

    # picked by name: --control-net at start, control_net in a request; listed by GET /v1/controlnets
    registry, server = serve(models, tmp_path / "files", ["base"], control_net="cn")
    assert registry.controlnet("cn").folder == folder
    with server as url:
        listed = {entry["id"]: entry for entry in request(url, "GET", "/v1/controlnets").json()["data"]}
        assert set(listed) == {"cn", "old-cn"} and listed["cn"]["default_for"] == ["base"]
        body, content_type = multipart(
            {
                "prompt": "a square",
                "model": "base",
                "control_net": "old-cn",
                "size": "64x64",
                "steps": "1",
                "response_format": "b64_json",
                "control_image": ("control.png", png_bytes()),
            }
        )
        reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": content_type})
        assert reply.status == 200, reply.body
        assert registry.controlnet_status("old-cn").loaded

        # rm: a ControlNet by name, from controlnets/ or the model directory, saying which
        status, out, _ = run(capsys, "rm", "old-cn", "--model-dir", str(models), "--url", url)
        assert status == 0 and not (models / "old-cn").exists()
        removed, note = out.splitlines()
        assert removed.startswith(f"removed ControlNet old-cn from {models} (") and removed.endswith(" freed)")
        assert note == f"the server at {url} had it loaded: it unloads it when idle, its files being gone"
        assert until_condition(lambda: not registry.controlnet_status("old-cn").loaded)
        status, out, _ = run(capsys, "rm", "cn", "--model-dir", str(models), "--url", url)
        assert status == 0 and out.startswith(f"removed ControlNet cn from {models / CONTROLNET_FOLDER} (")
        assert not folder.exists() and len(out.splitlines()) == 1  # (it was not loaded)
    status, _, err = run(capsys, "rm", "cn", "--model-dir", str(models))
    assert status == 1 and "no model named 'cn'" in err and "ControlNets: none" in err


def test_rm_refuses_a_name_that_is_both_a_model_and_a_controlnet(sources, tmp_path, capsys):
    models = tmp_path / "models"
    install(sources, models, "twin")
    install(sources, models / CONTROLNET_FOLDER, "twin", source="cn")  # (made by hand: convert never does)
    status, _, err = run(capsys, "rm", "twin", "--model-dir", str(models), "--url", f"http://127.0.0.1:{free_port()}")
    assert status == 1 and "names both" in err
    assert (models / "twin").exists() and (models / CONTROLNET_FOLDER / "twin").exists()


def test_pull_puts_a_controlnet_repo_into_controlnets(sources, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    import convert.pull

    monkeypatch.setattr(convert.pull, "repo_files", lambda repo_id: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(sources / "cn"))
    models = tmp_path / "models"
    status, out, _ = run(capsys, "pull", "someone/Tiny-ControlNet", "--model-dir", str(models), "--dtype", "float32")
    folder = models / CONTROLNET_FOLDER / "tiny-controlnet"
    assert status == 0 and (folder / MANIFEST).exists() and not (models / "tiny-controlnet").exists()
    assert "a ControlNet: requests name it with control_net=tiny-controlnet" in out
    status, out, _ = run(capsys, "pull", "someone/Tiny-ControlNet", "--model-dir", str(models))
    assert status == 0 and out.strip() == f"tiny-controlnet is already in {models / CONTROLNET_FOLDER}"
    # serve's --control-net takes a Hugging Face id too: pulled already, it is found in controlnets/
    install(sources, models, "base")
    registry = ModelRegistry(["base"], models, control_net="someone/Tiny-ControlNet")
    assert registry.controlnet("tiny-controlnet").folder == folder
