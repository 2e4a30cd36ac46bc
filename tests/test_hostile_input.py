"""Hostile input, table-driven, against a live server with the real tiny engine.

Every case names its expected status, param and code; every answer must be OpenAI's JSON envelope, short
(echoed values are cut: no answer repeats a big value), free of traceback text, and the server must serve a
good request right after it. Then the resource bounds: the requests that used to hold the only worker for
minutes or take gigabytes (a 10 MB prompt, a BREAK flood, a 1x100000 PNG) are refused in well under a
second with little memory. Then `build_job`, the parsers and the 429's Retry-After directly.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from api_server import live_server, multipart, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.parsing import read_json, read_multipart, read_urlencoded
from mlx_sd_server.job import ECHO_CHARS, Capabilities, JobError, Limits, ModelDefaults, build_job, cover_size, shown
from mlx_sd_server.store import FileStore

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
GEN, EDIT = "/v1/images/generations", "/v1/images/edits"
GOOD = {"prompt": "a cat", "size": "64x64", "steps": 1}
MAX_ANSWER = 1500  # bytes: an error answer never grows with what the client sent
BOUNDARY = "hostileboundary"
LIMITS = Limits()


# --- request builders ------------------------------------------------------------------------------


def png(width=8, height=8, mode="RGB", color=0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def header_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height (grey, 8 bits): nothing is decoded before the
    header is judged."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gen(**fields) -> tuple:
    return "POST", GEN, json.dumps(fields).encode(), JSON


def raw_json(body: bytes | str, path: str = GEN) -> tuple:
    return "POST", path, body.encode() if isinstance(body, str) else body, JSON


def form(path: str, **fields) -> tuple:
    body, content_type = multipart(fields)
    return "POST", path, body, {**AUTH, "Content-Type": content_type}


def edit(image: bytes | None = None, **fields) -> tuple:
    return form(EDIT, prompt="x", size="64x64", steps="1", image=("a.png", png() if image is None else image), **fields)


def part(name: str | None = None, data: bytes | str = b"x", filename: str | None = None, headers: bytes = b"") -> bytes:
    disposition = b"Content-Disposition: form-data"
    if name is not None:
        disposition += f'; name="{name}"'.encode()
    if filename is not None:
        disposition += f'; filename="{filename}"'.encode()
    data = data.encode() if isinstance(data, str) else data
    return f"--{BOUNDARY}\r\n".encode() + disposition + b"\r\n" + headers + b"\r\n" + data + b"\r\n"


CLOSE = f"--{BOUNDARY}--\r\n".encode()


def raw_form(body: bytes, path: str = GEN, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> tuple:
    return "POST", path, body, {**AUTH, "Content-Type": content_type}


def good_parts(path: str = GEN) -> bytes:
    parts = part("prompt", "a cat") + part("size", "64x64") + part("steps", "1")
    return parts + (part("image", png(), "a.png") if path == EDIT else b"")


def urlencoded(body: bytes | str) -> tuple:
    body = body.encode() if isinstance(body, str) else body
    return "POST", GEN, body, {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}


def deep(levels: int, opener: str = "[") -> str:
    return opener * levels


BIG = "x" * 10_000
HUGE_INT = "9" * 4000  # within Python's int-conversion limit, far beyond any range

# (id, (method, path, body, headers), status, param, code)
CASES = [
    # --- JSON: shape, nesting, numbers, encoding ---------------------------------------------------------
    ("json-deep-array-body", raw_json(deep(100_000)), 400, None, "invalid_json"),
    ("json-deep-object-body", raw_json('{"a":' * 50_000), 400, "a", "invalid_type"),
    ("json-deep-array-prompt", raw_json('{"prompt": ' + deep(100_000)), 400, "prompt", "invalid_type"),
    ("json-deep-object-prompt", raw_json('{"prompt": ' + '{"a": ' * 50_000), 400, "prompt", "invalid_type"),
    ("json-deep-array-unknown-field", raw_json('{"prompt": "a", "x": ' + deep(100_000)), 400, "x", "invalid_type"),
    ("json-deep-closed-array", raw_json('{"prompt": "a", "n": ' + "[" * 5000 + "]" * 5000 + "}"), 400, "n",
     "invalid_type"),
    ("json-wide-array", raw_json('{"prompt": [' + ",".join(["0"] * 200_000) + "]}"), 400, "prompt", "invalid_type"),
    ("json-output-format-list", gen(**GOOD, output_format=["png"]), 400, "output_format", "invalid_type"),
    ("json-output-format-object", gen(**GOOD, output_format={"png": 1}), 400, "output_format", "invalid_type"),
    ("json-output-format-number", gen(**GOOD, output_format=5), 400, "output_format", "invalid_type"),
    ("json-response-format-list", gen(**GOOD, response_format=["url"]), 400, "response_format", "invalid_type"),
    ("json-response-format-bool", gen(**GOOD, response_format=True), 400, "response_format", "invalid_type"),
    ("json-output-compression-list", gen(**GOOD, output_compression=[50]), 400, "output_compression", "invalid_type"),
    ("json-output-compression-huge", raw_json('{"prompt": "a", "output_compression": ' + HUGE_INT + "}"),
     400, "output_compression", "out_of_range"),
    ("json-n-array", gen(**{**GOOD, "n": [1, 2]}), 400, "n", "invalid_type"),
    ("json-size-object", gen(**{**GOOD, "size": {"width": 64}}), 400, "size", "invalid_type"),
    ("json-seed-array", gen(**GOOD, seed=[1]), 400, "seed", "invalid_type"),
    ("json-image-nested-array-on-edits", raw_json(json.dumps({"prompt": "x", "image": [[b64(png())]]}), EDIT), 400,
     "image", "invalid_type"),  # (a flat array is an edit's input images: tests/test_api_edits_multi.py)
    ("json-duplicate-prompt", raw_json('{"prompt": "a cat", "prompt": "a dog"}'), 400, "prompt", "invalid_value"),
    ("json-duplicate-after-null", raw_json('{"prompt": "a", "n": null, "n": 2}'), 400, "n", "invalid_value"),
    ("json-nan", raw_json('{"prompt": "a", "cfg_scale": NaN}'), 400, None, "invalid_json"),
    ("json-infinity", raw_json('{"prompt": "a", "cfg_scale": Infinity}'), 400, None, "invalid_json"),
    ("json-minus-infinity", raw_json('{"prompt": "a", "seed": -Infinity}'), 400, None, "invalid_json"),
    ("json-float-overflow", raw_json('{"prompt": "a", "cfg_scale": 1e999}'), 400, "cfg_scale", "invalid_value"),
    ("json-int-over-digit-limit", raw_json('{"prompt": "a", "n": ' + "9" * 5000 + "}"), 400, None, "invalid_json"),
    ("json-huge-n", raw_json('{"prompt": "a", "n": ' + HUGE_INT + "}"), 400, "n", "out_of_range"),
    ("json-huge-seed", raw_json('{"prompt": "a", "seed": ' + HUGE_INT + "}"), 400, "seed", "out_of_range"),
    ("json-huge-steps-float", raw_json('{"prompt": "a", "steps": 1e308}'), 400, "steps", "out_of_range"),
    ("json-huge-cfg-int", raw_json('{"prompt": "a", "cfg_scale": ' + HUGE_INT + "}"), 400, "cfg_scale",
     "invalid_value"),
    ("json-trailing-data", raw_json('{"prompt": "a"} {"prompt": "b"}'), 400, None, "invalid_json"),
    ("json-trailing-comma", raw_json('{"prompt": "a",}'), 400, None, "invalid_json"),
    ("json-unquoted-key", raw_json("{prompt: 'a'}"), 400, None, "invalid_json"),
    ("json-empty-body", raw_json(b""), 400, None, "invalid_json"),
    ("json-10mb-whitespace", raw_json("{" + " " * 10_000_000 + "}"), 400, "prompt", "missing_required_parameter"),
    ("json-whitespace-body", raw_json(b" \n\t "), 400, None, "invalid_json"),
    ("json-string-body", raw_json('"a cat"'), 400, None, "invalid_json"),
    ("json-null-body", raw_json("null"), 400, None, "invalid_json"),
    ("json-unterminated-string", raw_json('{"prompt": "a cat'), 400, None, "invalid_json"),
    ("json-bad-escape", raw_json('{"prompt": "\\x41"}'), 400, None, "invalid_json"),
    ("json-raw-control-char", raw_json(b'{"prompt": "a\x00b"}'), 400, None, "invalid_json"),
    ("json-overlong-utf8", raw_json(b'{"prompt": "\xc0\xaf"}'), 400, None, "invalid_json"),
    ("json-utf8-encoded-surrogate", raw_json(b'{"prompt": "\xed\xa0\x80"}'), 400, None, "invalid_json"),
    ("json-truncated-utf8", raw_json(b'{"prompt": "\xe2\x82"}'), 400, None, "invalid_json"),
    ("json-too-many-fields", raw_json(json.dumps({"prompt": "a", **{f"f{i}": 1 for i in range(100)}})),
     413, None, "too_many_fields"),
    ("json-too-many-nulls", raw_json(json.dumps({"prompt": "a", **{f"f{i}": None for i in range(100)}})),
     413, None, "too_many_fields"),
    # --- lone surrogates: valid JSON escapes, not text ------------------------------------------------
    ("surrogate-prompt", raw_json('{"prompt": "a \\ud800 cat"}'), 400, "prompt", "invalid_value"),
    ("surrogate-low-prompt", raw_json('{"prompt": "\\udfff"}'), 400, "prompt", "invalid_value"),
    ("surrogate-reversed-pair", raw_json('{"prompt": "\\ude00\\ud83d"}'), 400, "prompt", "invalid_value"),
    ("surrogate-negative-prompt", raw_json('{"prompt": "a", "negative_prompt": "\\ud800"}'), 400, "negative_prompt",
     "invalid_value"),
    ("surrogate-model", raw_json('{"prompt": "a", "model": "\\ud800"}'), 400, "model", "invalid_value"),
    ("surrogate-sampler", raw_json('{"prompt": "a", "sample_method": "\\ud800"}'), 400, "sample_method",
     "invalid_value"),
    ("surrogate-user", raw_json('{"prompt": "a", "user": "\\udbff"}'), 400, "user", "invalid_value"),
    ("surrogate-output-format", raw_json('{"prompt": "a", "output_format": "\\ud800"}'), 400, "output_format",
     "invalid_value"),
    ("surrogate-ignored-field", raw_json('{"prompt": "a", "background": "\\ud800"}'), 400, "background",
     "invalid_value"),
    ("surrogate-field-name", raw_json('{"prompt": "a", "\\ud800": 1}'), 400, None, "invalid_value"),
    ("surrogate-in-base64-image", raw_json('{"prompt": "a", "control_image": "\\ud800"}'), 400, "control_image",
     "invalid_value"),
    # --- prompts: length, chunks, emphasis syntax ---------------------------------------------------------
    ("prompt-10mb", gen(prompt="a" * 10_000_000), 400, "prompt", "string_above_max_length"),
    ("prompt-one-over", gen(prompt="a" * (LIMITS.max_prompt_chars + 1)), 400, "prompt", "string_above_max_length"),
    ("prompt-break-flood", gen(prompt="BREAK " * 10_000), 400, "prompt", "string_above_max_length"),
    ("prompt-many-breaks", gen(prompt="BREAK " * 1000), 400, "prompt", "prompt_too_long"),
    ("prompt-17-breaks", gen(**{**GOOD, "prompt": "a cat BREAK " * 17}), 400, "prompt", "prompt_too_long"),
    ("prompt-breaks-in-brackets", gen(**{**GOOD, "prompt": "(a BREAK " * 20}), 400, "prompt", "prompt_too_long"),
    ("prompt-many-tokens", gen(**{**GOOD, "prompt": "a, " * 3000}), 400, "prompt", "prompt_too_long"),
    ("prompt-many-emoji-tokens", gen(**{**GOOD, "prompt": "\U0001f431" * 2000}), 400, "prompt", "prompt_too_long"),
    ("negative-prompt-10mb", gen(**GOOD, negative_prompt="a" * 10_000_000), 400, "negative_prompt",
     "string_above_max_length"),
    ("negative-prompt-break-flood", gen(**GOOD, negative_prompt="BREAK " * 1500), 400, "negative_prompt",
     "prompt_too_long"),
    ("emphasis-dot", gen(**{**GOOD, "prompt": "(cat:.)"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-two-dots", gen(**{**GOOD, "prompt": "(cat:1.2.3)"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-dots-only", gen(**{**GOOD, "prompt": "(cat:...)"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-signed-dot", gen(**{**GOOD, "prompt": "(cat:-.)"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-trailing-dots", gen(**{**GOOD, "prompt": "a (cat: 1.. )"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-in-square", gen(**{**GOOD, "prompt": "[(cat:1.2.3)]"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-negative-prompt", gen(**GOOD, negative_prompt="(dog:.)"), 400, "negative_prompt", "invalid_prompt"),
    ("emphasis-weight-huge", gen(**{**GOOD, "prompt": "(cat:100000000000000000000000000000000000000000)"}),
     400, "prompt", "invalid_prompt"),
    ("emphasis-weight-over-limit", gen(**{**GOOD, "prompt": "(cat:1001)"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-nested-weights", gen(**{**GOOD, "prompt": "((cat:100):100)"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-nested-33", gen(**{**GOOD, "prompt": "(" * 33 + "cat"}), 400, "prompt", "invalid_prompt"),
    ("emphasis-nested-5000", gen(**{**GOOD, "prompt": "(a" * 4000 + ")" * 1000}), 400, "prompt", "invalid_prompt"),
    ("emphasis-square-flood", gen(**{**GOOD, "prompt": "[" * 9000}), 400, "prompt", "invalid_prompt"),
    ("emphasis-mixed-nesting", gen(**{**GOOD, "prompt": "([" * 17 + "cat"}), 400, "prompt", "invalid_prompt"),
    ("lora-unknown", gen(**{**GOOD, "prompt": "<lora:x:1> cat"}), 400, "prompt", "lora_not_found"),
    ("lora-traversal", gen(**{**GOOD, "prompt": "<lora:../../etc/passwd:1> cat"}), 400, "prompt", "lora_not_found"),
    ("lora-bad-weight", gen(**{**GOOD, "prompt": "<lora:x:1e999> cat"}), 400, "prompt", "invalid_value"),
    ("loras-not-array", gen(**GOOD, loras={"name": "x"}), 400, "loras", "invalid_type"),
    ("loras-too-many", gen(**GOOD, loras=[{"name": f"x{i}"} for i in range(9)]), 400, "loras", "out_of_range"),
    ("loras-nested-deep", raw_json('{"prompt": "cat", "loras": ' + "[" * 100_000 + "]" * 100_000 + "}"), 400, None,
     "invalid_json"),
    ("prompt-array", raw_json('{"prompt": ["cat"]}'), 400, "prompt", "invalid_type"),
    # --- other fields' sizes (checked before anything reads them) ------------------------------------------
    ("model-10k", gen(**GOOD, model=BIG), 400, "model", "string_above_max_length"),
    ("user-300", gen(**GOOD, user="u" * 300), 400, "user", "string_above_max_length"),
    ("size-10k", gen(prompt="a", size=BIG), 400, "size", "string_above_max_length"),
    ("sampler-10k", gen(**GOOD, sample_method=BIG), 400, "sample_method", "string_above_max_length"),
    ("scheduler-10k", gen(**GOOD, scheduler=BIG), 400, "scheduler", "string_above_max_length"),
    ("quality-10k", gen(**GOOD, quality=BIG), 400, "quality", "string_above_max_length"),
    ("style-10k", gen(**GOOD, style=BIG), 400, "style", "string_above_max_length"),
    ("response-format-10k", gen(**GOOD, response_format=BIG), 400, "response_format", "string_above_max_length"),
    ("output-format-10k", gen(**GOOD, output_format=BIG), 400, "output_format", "string_above_max_length"),
    ("background-10k", gen(**GOOD, background=BIG), 400, "background", "string_above_max_length"),
    ("control-preprocess-10k", gen(**GOOD, control_preprocess=BIG), 400, "control_preprocess",
     "string_above_max_length"),
    ("unknown-field-long-name", gen(**GOOD, **{"x" * 10_000: 1}), 400, "x" * (ECHO_CHARS - 1) + "…", "unknown_field"),
    ("n-200-digits", gen(**GOOD, n="9" * 200), 400, "n", "out_of_range"),
    ("width-200-digits", gen(prompt="a", width="9" * 200, height=64), 400, "width", "invalid_size"),
    ("size-too-many-digits", gen(prompt="a", size="1" * 20 + "x64"), 400, "size", "invalid_size"),
    ("cfg-250-digits", gen(**GOOD, cfg_scale="1" * 250), 400, "cfg_scale", "out_of_range"),
    ("sampler-garbage-echo", gen(**GOOD, sample_method="z" * 200), 400, "sample_method", "invalid_sample_method"),
    # --- silently ignored before: now a 400 -------------------------------------------------------------
    ("size-and-width-disagree", gen(**GOOD, width=128), 400, "width", "invalid_value"),
    ("size-and-height-disagree", gen(**GOOD, height=128), 400, "height", "invalid_value"),
    ("size-and-both-disagree", gen(**GOOD, width=64, height=128), 400, "height", "invalid_value"),
    ("strength-on-generation", gen(**GOOD, strength=0.5), 400, "strength", "unsupported_parameter"),
    ("strength-on-generation-form", form(GEN, prompt="x", size="64x64", strength="0.5"), 400, "strength",
     "unsupported_parameter"),
    ("strength-with-control-image-only", gen(**GOOD, strength=0.5, control_image=b64(png())), 400, "strength",
     "unsupported_parameter"),
    ("edit-mask-larger", edit(mask=("m.png", png(16, 16))), 400, "mask", "invalid_image_dimensions"),
    ("edit-mask-one-pixel-off", edit(mask=("m.png", png(8, 9))), 400, "mask", "invalid_image_dimensions"),
    ("edit-mask-rgba-other-size", edit(mask=("m.png", png(4, 4, "RGBA"))), 400, "mask", "invalid_image_dimensions"),
    # --- multipart ---------------------------------------------------------------------------------------
    ("form-part-without-name", raw_form(good_parts() + part(None, "x") + CLOSE), 400, None, "invalid_form"),
    ("form-file-without-name", raw_form(good_parts(EDIT) + part(None, png(), "m.png") + CLOSE, EDIT), 400, None,
     "invalid_form"),
    ("form-empty-name", raw_form(good_parts() + part("", "x") + CLOSE), 400, None, "invalid_form"),
    ("form-no-disposition", raw_form(f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n".encode() + CLOSE),
     400, None, "invalid_form"),
    ("form-part-headers-5mb", raw_form(part("prompt", "a", headers=b"X-Pad: " + b"a" * 5_000_000 + b"\r\n") + CLOSE),
     400, None, "invalid_form"),
    ("form-many-header-lines", raw_form(part("prompt", "a", headers=b"X-A: b\r\n" * 500_000) + CLOSE), 400, None,
     "invalid_form"),
    ("form-no-closing-boundary", raw_form(good_parts()), 400, None, "invalid_form"),
    ("form-truncated-in-part", raw_form((good_parts() + CLOSE)[:60]), 400, None, "invalid_form"),
    ("form-truncated-image", raw_form(good_parts(EDIT)[:-40], EDIT), 400, None, "invalid_form"),
    ("form-empty-body", raw_form(b""), 400, None, "invalid_form"),
    ("form-no-boundary-param", raw_form(good_parts() + CLOSE, content_type="multipart/form-data"), 400, None,
     "invalid_form"),
    ("form-wrong-boundary", raw_form(good_parts() + CLOSE, content_type="multipart/form-data; boundary=other"),
     400, None, "invalid_form"),
    ("form-boundary-300", raw_form(good_parts() + CLOSE, content_type="multipart/form-data; boundary=" + "b" * 300),
     400, None, "invalid_form"),
    ("form-header-not-utf8", raw_form(f"--{BOUNDARY}\r\n".encode() + b'Content-Disposition: form-data; name="\xff"\r\n'
                                      b"\r\nx\r\n" + CLOSE), 400, None, "invalid_form"),
    ("form-duplicate-prompt", raw_form(good_parts() + part("prompt", "a dog") + CLOSE), 400, "prompt", "invalid_value"),
    ("form-duplicate-steps", raw_form(good_parts() + part("steps", "2") + CLOSE), 400, "steps", "invalid_value"),
    ("form-duplicate-prompt-brackets", raw_form(good_parts() + part("prompt[]", "a dog") + CLOSE), 400, "prompt",
     "invalid_value"),
    ("form-duplicate-mask", raw_form(good_parts(EDIT) + part("mask", png(), "m.png") * 2 + CLOSE, EDIT), 400, "mask",
     "invalid_value"),
    ("form-image-and-image-list", raw_form(good_parts(EDIT) + part("image[]", png(), "b.png") + CLOSE, EDIT), 400,
     "image", "invalid_value"),
    ("form-65-parts", raw_form(good_parts() + b"".join(part(f"f{i}") for i in range(62)) + CLOSE), 413, None,
     "too_many_fields"),
    ("form-5000-parts", raw_form(b"".join(part(f"f{i}") for i in range(5000)) + CLOSE), 413, None, "too_many_fields"),
    ("form-prompt-not-utf8", raw_form(part("prompt", b"a \xff cat") + CLOSE), 400, "prompt", "invalid_value"),
    ("form-prompt-file-binary", raw_form(part("prompt", png(), "p.txt") + CLOSE), 400, "prompt", "invalid_value"),
    ("form-prompt-10mb", raw_form(part("prompt", "a" * 10_000_000) + CLOSE), 400, "prompt", "string_above_max_length"),
    ("form-unknown-file", raw_form(good_parts() + part("payload", png(), "p.bin") + CLOSE), 400, "payload",
     "unknown_field"),
    ("form-image-on-generations", raw_form(good_parts() + part("image", png(), "a.png") + CLOSE), 400, "image",
     "unknown_field"),
    ("form-control-image-empty", raw_form(good_parts() + part("control_image", b"", "c.png") + CLOSE), 400,
     "control_image", "invalid_image"),
    ("form-emphasis-malformed", form(GEN, prompt="(cat:1.2.3)", size="64x64", steps="1"), 400, "prompt",
     "invalid_prompt"),
    ("form-size-and-width", form(GEN, prompt="x", size="64x64", width="128"), 400, "width", "invalid_value"),
    ("urlencoded-duplicate", urlencoded("prompt=a&prompt=b"), 400, "prompt", "invalid_value"),
    ("urlencoded-bad-percent-utf8", urlencoded("prompt=%ff%fe"), 400, None, "invalid_form"),
    ("urlencoded-raw-bytes", urlencoded(b"prompt=\xff"), 400, None, "invalid_form"),
    ("urlencoded-no-name", urlencoded("=a+cat"), 400, None, "invalid_form"),
    ("urlencoded-too-many", urlencoded("&".join(f"f{i}=1" for i in range(100))), 413, None, "too_many_fields"),
    ("urlencoded-long-prompt", urlencoded("prompt=" + "a" * 20_000), 400, "prompt", "string_above_max_length"),
    # --- uploads ------------------------------------------------------------------------------------------
    ("upload-1x100000", edit(header_png(1, 100_000)), 400, "image", "invalid_image_dimensions"),
    ("upload-100000x1", edit(header_png(100_000, 1)), 400, "image", "invalid_image_dimensions"),
    ("upload-1x36000000", edit(header_png(1, 36_000_000)), 400, "image", "invalid_image_dimensions"),
    ("upload-1x1000000", edit(header_png(1, 1_000_000)), 400, "image", "invalid_image_dimensions"),
    ("upload-aspect-21", edit(png(1, 21)), 400, "image", "invalid_image_dimensions"),
    ("upload-mask-1x100000", edit(mask=("m.png", header_png(1, 100_000))), 400, "mask", "invalid_image_dimensions"),
    ("upload-control-1x100000", gen(**GOOD, control_image=b64(header_png(1, 100_000))), 400, "control_image",
     "invalid_image_dimensions"),
    ("upload-cover-over-budget-tall", form(EDIT, prompt="x", size="2048x2048", steps="1", image=("a.png", png(2, 40))),
     400, "image", "image_too_large"),
    ("upload-cover-over-budget-wide", form(EDIT, prompt="x", size="2048x2048", steps="1", image=("a.png", png(40, 2))),
     400, "image", "image_too_large"),
    ("upload-cover-over-budget-mask", form(EDIT, prompt="x", size="2048x2048", steps="1", image=("a.png", png(64, 64)),
                                           mask=("m.png", png(2, 40))), 400, "mask", "image_too_large"),
    ("upload-bomb", edit(header_png(70_000, 70_000)), 400, "image", "image_too_large"),
    ("upload-truncated-png", edit(png()[:40]), 400, "image", "invalid_image"),
    ("upload-gif-header-only", edit(b"GIF89a"), 400, "image", "invalid_image"),
    ("upload-svg", edit(b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'), 400, "image",
     "invalid_image"),
    ("upload-tiff", edit(b"II*\x00" + b"\x00" * 100), 400, "image", "invalid_image"),
    ("upload-empty", edit(b""), 400, "image", "invalid_image"),
    ("upload-data-url-not-image", raw_json(json.dumps({"prompt": "x", "image": "data:image/png;base64," + b64(b"hi")}),
                                           EDIT), 400, "image", "invalid_image"),
    ("upload-base64-junk", raw_json(json.dumps({"prompt": "x", "image": "!!!" * 1000}), EDIT), 400, "image",
     "invalid_image"),
    # --- what failed in the pipeline, after queueing: each path (JSON, form) refuses it before ------------------
    ("lcm-over-its-steps", gen(**{**GOOD, "scheduler": "lcm", "steps": 51}), 400, "steps", "out_of_range"),
    ("form-lcm-over-its-steps", form(GEN, prompt="x", size="64x64", steps="60", scheduler="lcm"), 400, "steps",
     "out_of_range"),
    ("form-control-image-without-controlnet", form(GEN, prompt="x", size="64x64", steps="1",
                                                   control_image=("c.png", png())), 400, "control_image",
     "controlnet_unavailable"),
    ("form-lora-tag-unknown", form(GEN, prompt="<lora:x:1> cat", size="64x64", steps="1"), 400, "prompt",
     "lora_not_found"),
    ("form-loras-unknown", form(GEN, prompt="cat", size="64x64", steps="1", loras='[{"name": "x"}]'), 400, "loras",
     "lora_not_found"),
    # --- headers -----------------------------------------------------------------------------------------
    ("content-type-5k", ("POST", GEN, json.dumps(GOOD).encode(), {**AUTH, "Content-Type": "text/" + "x" * 5000}),
     415, None, "unsupported_media_type"),
    ("content-type-multipart-mixed", ("POST", GEN, b"", {**AUTH, "Content-Type": "multipart/mixed; boundary=a"}),
     415, None, "unsupported_media_type"),
]

# Odd but valid: each must be served (200), not refused and not a 500.
VALID = [
    ("prompt-16-breaks", gen(**{**GOOD, "prompt": "a cat BREAK " * 16})),
    ("prompt-at-char-limit", gen(**{**GOOD, "prompt": "a cat".ljust(LIMITS.max_prompt_chars)})),  # counted exactly
    ("prompt-emoji-pair-escape", raw_json('{"prompt": "a \\ud83d\\ude00 cat", "size": "64x64", "steps": 1}')),
    ("prompt-nul-and-controls", gen(**{**GOOD, "prompt": "a\u0000b\u0007c\u202ed\u200d"})),
    ("prompt-special-tokens", gen(**{**GOOD, "prompt": "<|endoftext|><|startoftext|> cat"})),
    ("prompt-negative-weight", gen(**{**GOOD, "prompt": "(cat:-1) (dog:0) [bird]"})),
    ("prompt-unbalanced-brackets", gen(**{**GOOD, "prompt": "((cat] dog) ) ] (("})),
    ("prompt-colons-and-escapes", gen(**{**GOOD, "prompt": "time 10:30 \\(literal\\) a:b: \\"})),
    ("size-and-matching-width", gen(**GOOD, width=64, height=64)),
    ("form-latin1-part", raw_form(part("prompt", "caf\xe9".encode("latin-1"),
                                       headers=b"Content-Type: text/plain; charset=iso-8859-1\r\n")
                                  + part("size", "64x64") + part("steps", "1") + CLOSE)),
    ("json-utf8-bom", raw_json(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())),
    ("edit-aspect-20", form(EDIT, prompt="x", size="64x64", steps="1", image=("a.png", png(2, 40)))),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    app = create_app(tiny_registry(root / "models"), FileStore(root / "files"), Settings(api_key=KEY))
    with live_server(app) as url:
        assert serves(url)
        yield url


def serves(url: str) -> bool:
    reply = request(url, "POST", GEN, json.dumps(GOOD).encode(), JSON)
    return reply.status == 200 and len(reply.json()["data"]) == 1


def test_at_least_120_hostile_cases():
    assert len(CASES) >= 120
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("call, status, param, code", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_hostile_input_is_a_clear_error(server, call, status, param, code):
    reply = request(server, *call)
    assert reply.status == status, reply.body[:500]
    assert reply.headers["content-type"] == "application/json"
    assert len(reply.body) < MAX_ANSWER, reply.body[:MAX_ANSWER]
    assert b"Traceback" not in reply.body and b'File "' not in reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error["message"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert serves(server)


@pytest.mark.parametrize("call", [case[1] for case in VALID], ids=[case[0] for case in VALID])
def test_odd_but_valid_input_is_served(server, call):
    reply = request(server, *call)
    assert reply.status == 200, reply.body[:500]
    assert len(reply.json()["data"]) == 1


def test_echoed_values_are_cut(server):
    for field in ("sample_method", "scheduler", "quality"):
        reply = request(server, *gen(**GOOD, **{field: "Q" * 250}))
        message = reply.json()["error"]["message"]
        assert "Q" * ECHO_CHARS not in message and "…" in message, message
    reply = request(server, *gen(**GOOD, n="9" * 200))
    assert "9" * ECHO_CHARS not in reply.json()["error"]["message"]


# --- resource bounds: refused before the queue, in little time and memory ----------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class PeakRss:
    """The largest RSS of this process (which runs the server) while the block runs, sampled every ms."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


RESOURCE_CASES = [
    ("prompt-10mb", lambda: gen(**GOOD | {"prompt": "a" * 10_000_000}), "string_above_max_length"),
    ("break-flood", lambda: gen(**GOOD | {"prompt": "BREAK " * 10_000}), "string_above_max_length"),
    ("break-flood-within-chars", lambda: gen(**GOOD | {"prompt": "BREAK " * 1600}), "prompt_too_long"),
    ("tall-png-1x100000", lambda: edit(header_png(1, 100_000)), "invalid_image_dimensions"),
    ("tall-png-1x36000000", lambda: edit(header_png(1, 36_000_000)), "invalid_image_dimensions"),
    ("multipart-5mb-part-header", lambda: raw_form(part("prompt", "a", headers=b"X-Pad: " + b"a" * 5_000_000 + b"\r\n")
                                                   + CLOSE), "invalid_form"),
    ("thin-strip-cover", lambda: form(EDIT, prompt="x", size="2048x2048", steps="1", image=("a.png", png(2, 40))),
     "image_too_large"),
]


@pytest.mark.parametrize("make, code", [case[1:] for case in RESOURCE_CASES], ids=[case[0] for case in RESOURCE_CASES])
def test_expensive_requests_are_refused_fast_and_small(server, make, code):
    call = make()
    request(server, *call)  # once to warm what any request warms (buffers, code paths)
    with PeakRss() as memory:
        started = time.monotonic()
        reply = request(server, *call)
        seconds = time.monotonic() - started
    assert reply.status == 400 and reply.json()["error"]["code"] == code
    assert seconds < 1.0, f"{seconds:.2f} s"
    assert memory.growth < 50 * 2**20, f"RSS grew {memory.growth / 2**20:.0f} MB"
    assert serves(server)


def test_long_prompt_counted_exactly_is_fast(server):
    """The slowest prompt check: within the character limit but past the quick bound, so it is tokenized."""
    started = time.monotonic()
    reply = request(server, *gen(**GOOD | {"prompt": "a, " * 3300}))
    assert reply.status == 400 and reply.json()["error"]["code"] == "prompt_too_long"
    assert time.monotonic() - started < 2.0  # includes loading the tokenizer the first time


@pytest.mark.parametrize("given, expected", [(None, None), (0.2, 1), (7, 7), (12.1, 13), ("soon", None),
                                             (float("inf"), None), (float("nan"), None)])
def test_retry_after_comes_from_the_error_or_the_default(given, expected):
    from mlx_sd_server.api.errors import DEFAULT_RETRY_AFTER, retry_after
    from mlx_sd_server.worker import QueueFullError

    error = QueueFullError("full")
    error.retry_after = given
    assert retry_after(error) == (expected or DEFAULT_RETRY_AFTER)
    assert retry_after(RuntimeError("no retry_after at all")) == DEFAULT_RETRY_AFTER


# --- build_job directly ---------------------------------------------------------------------------------


def job_error(fields, images=None, **options) -> JobError:
    with pytest.raises(JobError) as caught:
        build_job(fields, images, **options)
    return caught.value


def test_shown_cuts_and_names():
    assert shown("abc") == "'abc'"
    assert shown("x" * 1000) == "'" + "x" * (ECHO_CHARS - 2) + "…"
    assert len(shown("\ud800" * 100)) == ECHO_CHARS
    assert shown(10**5000) == "an integer too large to show"
    assert len(shown(10**1000)) == ECHO_CHARS
    assert shown([1, 2]) == "an array" and shown({"a": 1}) == "an object"
    assert shown(1.5) == "1.5" and shown(True) == "True" and shown(None) == "None"


def test_limits_are_configurable():
    tight = Limits(max_prompt_chars=10, max_prompt_chunks=1, max_field_chars=4, max_upload_aspect=2.0,
                   max_fit_pixels=64 * 64 * 2)
    assert job_error({"prompt": "a" * 11}, limits=tight).code == "string_above_max_length"
    assert job_error({"prompt": "a BREAK b"}, limits=tight).code == "prompt_too_long"
    assert job_error({"prompt": "a", "sample_method": "euler_a"}, limits=tight).code == "string_above_max_length"
    image = Image.new("RGB", (8, 24))
    assert job_error({"prompt": "a", "width": 64, "height": 64, "strength": 0.5}, {"image": image},
                     limits=tight).code == "invalid_image_dimensions"
    image = Image.new("RGB", (8, 16))  # cover 64x128: twice the output, just within the budget
    assert build_job({"prompt": "a", "width": 64, "height": 64}, {"image": image}, limits=tight).init_image is image
    image = Image.new("RGB", (16, 8))  # cover 256x128 for a 64x128 output
    error = job_error({"prompt": "a", "width": 64, "height": 128}, {"image": image}, limits=tight)
    assert (error.param, error.code) == ("image", "image_too_large") and "256x128" in error.message


def test_cover_size_is_what_the_pipeline_resizes_to():
    from mlx_sd_server.engine.pipeline import fit_image

    for size in ((1, 20), (20, 1), (37, 64), (640, 480), (64, 64), (3, 5)):
        assert min(cover_size(size, 64, 48)) >= 48
        assert fit_image(Image.new("RGB", size), 64, 48).shape == (48, 64, 3)
    assert cover_size((2, 40), 2048, 2048) == (2048, 40960)
    assert cover_size((6000, 4000), 512, 512) == (768, 512)


def test_size_with_width_or_height():
    assert build_job({"prompt": "a", "size": "64x128", "width": 64, "height": "128"}).height == 128
    error = job_error({"prompt": "a", "size": "64x128", "width": "65"})
    assert (error.param, error.code) == ("width", "invalid_value")
    assert job_error({"prompt": "a", "size": "64x64", "width": "x"}).code == "invalid_type"


def test_strength_needs_an_image():
    assert job_error({"prompt": "a", "strength": 0.5}).param == "strength"
    control = {"control_image": Image.new("RGB", (8, 8))}
    assert job_error({"prompt": "a", "strength": "0.5"}, control).param == "strength"
    job = build_job({"prompt": "a", "strength": 0.5}, {"image": Image.new("RGB", (8, 8))})
    assert job.strength == 0.5


def test_mask_must_match_the_image():
    image = Image.new("RGB", (64, 48))
    assert build_job({"prompt": "a"}, {"image": image, "mask": Image.new("L", (64, 48))}).mask is not None
    error = job_error({"prompt": "a"}, {"image": image, "mask": Image.new("L", (48, 64))})
    assert (error.param, error.code) == ("mask", "invalid_image_dimensions")
    assert "48x64" in error.message and "64x48" in error.message


def test_the_networks_largest_side_is_refused_before_the_queue():
    sd3_like = Capabilities("sd3", size_multiple=16, largest_side=1536)  # position embeddings for 96 patches
    error = job_error({"prompt": "a", "size": "2048x2048"}, capabilities=sd3_like)
    assert (error.param, error.code, error.status) == ("size", "invalid_size", 400) and "1536" in error.message
    error = job_error({"prompt": "a", "width": 1024, "height": 2048}, capabilities=sd3_like)
    assert error.code == "invalid_size" and "1024x2048" in error.message
    assert build_job({"prompt": "a", "size": "1536x1024"}, capabilities=sd3_like).width == 1536
    assert build_job({"prompt": "a", "size": "2048x2048"}).width == 2048  # no such bound without one
    # what the model cannot do at all is said first, whatever the size
    no_controlnet = Capabilities("sd3", controlnet=False, size_multiple=16, largest_side=192)
    assert job_error({"prompt": "a"}, {"control_image": Image.new("RGB", (8, 8))},
                     capabilities=no_controlnet).param == "control_image"


def test_a_schedules_step_limit_is_refused_before_the_queue():
    error = job_error({"prompt": "a", "scheduler": "lcm", "steps": 60})
    assert (error.param, error.code, error.status) == ("steps", "out_of_range", 400)
    assert "50" in error.message and "lcm" in error.message
    error = job_error({"prompt": "a", "steps": "51"}, defaults=ModelDefaults(steps=4, scheduler="lcm"))
    assert error.param == "steps"  # the model's default schedule counts too
    assert build_job({"prompt": "a", "scheduler": "lcm", "steps": 50}).steps == 50
    assert build_job({"prompt": "a", "scheduler": "karras", "steps": 60}).steps == 60


def test_surrogates_are_refused_in_every_text_field():
    for name in ("prompt", "negative_prompt", "model", "sample_method", "user", "quality", "control_preprocess"):
        fields = {"prompt": "a", name: "x\udc80"}
        error = job_error(fields)
        assert (error.param, error.code) == (name, "invalid_value"), name


# --- the parsers directly -------------------------------------------------------------------------------


def test_json_values_are_never_built_when_nested():
    body = b'{"prompt": ' + b"[" * 10_000_000  # 10 MB of nesting
    started = time.monotonic()
    with pytest.raises(JobError) as caught:
        read_json(body, LIMITS)
    assert caught.value.param == "prompt" and time.monotonic() - started < 1.0


def test_json_reader_matches_json_loads_on_flat_objects():
    for text in ('{}', '{"a": 1, "b": "x", "c": true, "d": false, "e": 1.5e3, "f": -0}', ' {"a" : "\\u00e9\\n"} ',
                 '{"a": "\\ud83d\\ude00", "b": ""}', '{"prompt": "a", "n": null}'):
        expected = {k: v for k, v in json.loads(text).items() if v is not None}
        assert read_json(text.encode(), LIMITS) == expected
        assert read_json(text.encode("utf-16"), LIMITS) == expected


def test_multipart_reader_keeps_files_as_bytes_and_text_as_text():
    body = part("prompt", "a cat") + part("image", png(), "a.png") + part("mask", b64(png())) + CLOSE
    raw = read_multipart(body, BOUNDARY, LIMITS)
    assert raw == {"prompt": "a cat", "image": png(), "mask": b64(png())}
    assert read_multipart(CLOSE, BOUNDARY, LIMITS) == {}
    assert read_urlencoded(b"prompt=a+cat&n=2&image%5B%5D=x", LIMITS) == {"prompt": "a cat", "n": "2", "image": "x"}
