"""Bad input, table-driven, against a live server: each case names its expected status, param and code,
and none may leak a traceback. The server must still serve real requests afterwards."""

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import zlib

import pytest
from PIL import Image

from api_server import live_server, multipart, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.store import FileStore

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
MAX_BODY = 1 << 20


def png(width=8, height=8, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(side=50_000) -> bytes:
    """A few hundred bytes claiming side x side pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def gen(**fields) -> tuple:
    return "POST", "/v1/images/generations", json.dumps(fields).encode(), JSON


def form(path: str, **fields) -> tuple:
    body, content_type = multipart(fields)
    return "POST", path, body, {**AUTH, "Content-Type": content_type}


GOOD = {"prompt": "a cat", "size": "64x64", "steps": 1}
NO_SUCH_ID = "file_00000000-0000-0000-0000-000000000000"

# (id, (method, path, body, headers), status, param, code)
CASES = [
    ("malformed-json", ("POST", "/v1/images/generations", b'{"prompt": ', JSON), 400, None, "invalid_json"),
    ("json-not-object", ("POST", "/v1/images/generations", b'["a cat"]', JSON), 400, None, "invalid_json"),
    ("invalid-utf8", ("POST", "/v1/images/generations", b'{"prompt": "\xff"}', JSON), 400, None, "invalid_json"),
    ("missing-prompt", gen(size="64x64"), 400, "prompt", "missing_required_parameter"),
    ("empty-prompt", gen(prompt="  "), 400, "prompt", "invalid_value"),
    ("prompt-not-string", gen(prompt=42), 400, "prompt", "invalid_type"),
    ("prompt-object", gen(prompt={"text": "a cat"}), 400, "prompt", "invalid_type"),
    ("n-not-int", gen(**GOOD, n="two"), 400, "n", "invalid_type"),
    ("n-zero", gen(**GOOD, n=0), 400, "n", "out_of_range"),
    ("n-too-many", gen(**GOOD, n=11), 400, "n", "out_of_range"),
    ("steps-bool", gen(**{**GOOD, "steps": True}), 400, "steps", "invalid_type"),
    ("steps-huge", gen(**{**GOOD, "steps": 1000}), 400, "steps", "out_of_range"),
    ("cfg-not-number", gen(**GOOD, cfg_scale="high"), 400, "cfg_scale", "invalid_type"),
    ("seed-not-int", gen(**GOOD, seed="abc"), 400, "seed", "invalid_type"),
    ("size-malformed", gen(prompt="a cat", size="51x"), 400, "size", "invalid_size"),
    ("size-not-multiple-of-8", gen(prompt="a cat", size="513x512"), 400, "size", "invalid_size"),
    ("size-huge", gen(prompt="a cat", size="100000x100000"), 400, "size", "invalid_size"),
    ("size-over-pixel-budget", gen(prompt="a cat", size="4096x4096"), 400, "size", "invalid_size"),
    ("width-negative", gen(prompt="a cat", width=-64), 400, "width", "invalid_size"),
    ("unknown-sampler", gen(**GOOD, sample_method="dpm_fast"), 400, "sample_method", "invalid_sample_method"),
    ("unknown-field", gen(**GOOD, sampler="euler"), 400, "sampler", "unknown_field"),
    ("gits-scheduler", gen(**GOOD, scheduler="gits"), 400, "scheduler", "unsupported_scheduler"),
    ("style-ratio", gen(**GOOD, style_ratio=20), 400, "style_ratio", "unsupported_parameter"),
    ("canny-not-bool", gen(**GOOD, apply_canny_preprocessor="maybe"), 400, "apply_canny_preprocessor", "invalid_type"),
    ("bad-quality", gen(**GOOD, quality="ultra"), 400, "quality", "invalid_value"),
    ("bad-style", gen(**GOOD, style="noir"), 400, "style", "invalid_value"),
    ("user-not-string", gen(**GOOD, user=5), 400, "user", "invalid_type"),
    ("unknown-model", gen(**GOOD, model="sd-v9"), 404, "model", "model_not_found"),
    ("model-not-string", gen(**GOOD, model=["a"]), 400, "model", "invalid_type"),
    ("bad-response-format", gen(**GOOD, response_format="jpeg"), 400, "response_format", "invalid_value"),
    ("bad-output-format", gen(**GOOD, output_format="gif"), 400, "output_format", "invalid_value"),
    ("bad-output-compression", gen(**GOOD, output_compression=101), 400, "output_compression", "out_of_range"),
    ("control-image-no-controlnet", gen(**GOOD, control_image=base64.b64encode(png()).decode()),
     400, "control_image", "controlnet_unavailable"),
    ("control-image-not-base64", gen(**GOOD, control_image="%%%not base64%%%"), 400, "control_image", "invalid_image"),
    ("image-on-generations", gen(**GOOD, image=base64.b64encode(png()).decode()), 400, "image", "unknown_field"),
    ("edit-without-image", form("/v1/images/edits", prompt="a cat"), 400, "image", "missing_required_parameter"),
    ("edit-corrupt-image", form("/v1/images/edits", prompt="x", image=("a.png", png()[:30])), 400, "image", "invalid_image"),
    ("edit-text-file", form("/v1/images/edits", prompt="x", image=("a.png", b"hello world")), 400, "image", "invalid_image"),
    ("edit-decompression-bomb", form("/v1/images/edits", prompt="x", image=("bomb.png", bomb_png())),
     400, "image", "image_too_large"),
    ("edit-corrupt-mask", form("/v1/images/edits", prompt="x", image=("a.png", png()), mask=("m.png", b"GIF89a")),
     400, "mask", "invalid_image"),
    ("edit-strength-range", form("/v1/images/edits", prompt="x", image=("a.png", png()), strength="2"),
     400, "strength", "out_of_range"),
    ("edit-two-images", ("POST", "/v1/images/edits", *(lambda b: (b[0].replace(b'name="image2"', b'name="image"'),
     {**AUTH, "Content-Type": b[1]}))(multipart({"prompt": "x", "image": ("a.png", png()), "image2": ("b.png", png())}))),
     400, "image", "invalid_value"),
    ("form-n-not-int", form("/v1/images/generations", prompt="x", n="abc"), 400, "n", "invalid_type"),
    ("form-unknown-sampler", form("/v1/images/generations", prompt="x", sample_method="nope"),
     400, "sample_method", "invalid_sample_method"),
    ("missing-api-key", ("POST", "/v1/images/generations", json.dumps(GOOD).encode(),
                         {"Content-Type": "application/json"}), 401, None, "missing_api_key"),
    ("wrong-api-key", ("GET", "/v1/models", None, {"Authorization": "Bearer nope"}), 401, None, "invalid_api_key"),
    ("not-bearer", ("GET", "/v1/files", None, {"Authorization": KEY}), 401, None, "invalid_api_key"),
    ("text-plain", ("POST", "/v1/images/generations", b"a cat", {**AUTH, "Content-Type": "text/plain"}),
     415, None, "unsupported_media_type"),
    ("no-content-type", ("POST", "/v1/images/generations", json.dumps(GOOD).encode(), AUTH),
     415, None, "unsupported_media_type"),
    # Announced but never sent (as curl does for big bodies), so the early 413 cannot race the upload.
    ("body-too-large", ("POST", "/v1/images/generations", None,
                        {**JSON, "Content-Length": str(MAX_BODY + 1), "Expect": "100-continue"}),
     413, None, "request_too_large"),
    ("wrong-method", ("GET", "/v1/images/generations", None, AUTH), 405, None, "method_not_allowed"),
    ("unknown-route", ("GET", "/v1/nothing", None, AUTH), 404, None, "not_found"),
    ("files-dotdot", ("GET", "/v1/files/../../etc/passwd", None, AUTH), 404, None, "not_found"),
    ("files-encoded-dotdot", ("GET", "/v1/files/%2e%2e", None, AUTH), 400, "file_id", "invalid_file_id"),
    ("download-encoded-dotdot", ("GET", "/v1/files/download/%2e%2e/passwd", None, AUTH), 400, "file_id", "invalid_file_id"),
    ("download-encoded-slash", ("GET", "/v1/files/download/%2Fetc%2Fpasswd", None, AUTH), 404, None, "not_found"),
    ("files-absolute", ("GET", "/v1/files//etc/passwd", None, AUTH), 404, None, "not_found"),
    ("delete-not-an-id", ("DELETE", "/v1/files/etc", None, AUTH), 400, "file_id", "invalid_file_id"),
    ("file-unknown", ("GET", f"/v1/files/{NO_SUCH_ID}", None, AUTH), 404, "file_id", "file_not_found"),
    ("download-unknown", ("GET", f"/v1/files/download/{NO_SUCH_ID}/x.png", None, AUTH), 404, "file_id", "file_not_found"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_errors")
    settings = Settings(api_key=KEY, max_upload_bytes=MAX_BODY)
    # strict: an unknown model name is a 404 even with one model served (tests/test_api_dropin.py: the default)
    app = create_app(tiny_registry(root / "models", strict_model_names=True), FileStore(root / "files"), settings)
    with live_server(app) as url:
        yield url


@pytest.mark.parametrize("call, status, param, code", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input(server, call, status, param, code):
    method, path, body, headers = call
    reply = request(server, method, path, body, headers)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"] and error["type"]
    assert b"Traceback" not in reply.body and b'File "' not in reply.body


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_download_with_a_wrong_name_or_path_tricks_is_not_found(server):
    reply = request(server, "POST", "/v1/images/generations", json.dumps(GOOD).encode(), JSON)
    url = reply.json()["data"][0]["url"]
    path = url.split(server, 1)[1]
    file_id = path.split("/")[4]
    assert request(server, "GET", path, None, AUTH).status == 200
    for trick in (f"/v1/files/download/{file_id}/other.png", f"/v1/files/download/{file_id}/..",
                  f"/v1/files/download/{file_id}/%2e%2e", f"/v1/files/download/{file_id}/..%2F..%2Fetc%2Fpasswd",
                  f"/v1/files/download/{file_id}/../../../etc/passwd"):
        reply = request(server, "GET", trick, None, AUTH)
        assert reply.status == 404, trick
        assert reply.json()["error"]["code"] in ("file_not_found", "not_found")


def test_still_serving_after_bad_input(server):
    for _, call, *_ in CASES:  # everything bad again, back to back
        request(server, *call)
    reply = request(server, "POST", "/v1/images/generations", json.dumps({**GOOD, "n": 2}).encode(), JSON)
    assert reply.status == 200
    assert [item["seed"] for item in reply.json()["data"]] == [42, 43]
    assert request(server, "GET", "/health").json()["status"] == "ok"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_really_uploading_too_much_is_413(server, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png() + os.urandom(MAX_BODY))
    out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {KEY}", "-F", f"image=@{big}", "-F", "prompt=x",
                          "-w", "\\n%{http_code}", f"{server}/v1/images/edits"], capture_output=True, timeout=60).stdout
    body, status = out.rsplit(b"\n", 1)
    assert status == b"413"
    assert json.loads(body)["error"]["code"] == "request_too_large"
