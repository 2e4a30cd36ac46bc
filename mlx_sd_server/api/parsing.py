"""Request bodies (JSON or multipart/form) -> job fields, raw image uploads and delivery options.

The two encodings are normalised here, so the routes see one shape: `fields` holds job fields (typed
JSON values or form strings, validated later by `build_job`), `uploads` holds the bytes of each image
field, and `delivery` says how the results go back to the client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from quart import Request

from mlx_sd_server.images import OUTPUT_FORMATS, decode_base64_image
from mlx_sd_server.job import JOB_FIELDS, JobError

# Accepted for OpenAI-SDK compatibility and ignored: nothing here can honour them.
IGNORED_FIELDS = ("background", "moderation")
DELIVERY_FIELDS = ("response_format", "output_format", "output_compression")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class Delivery:
    response_format: str = "url"  # or "b64_json"
    output_format: str = "png"  # png | jpeg | webp
    output_compression: int | None = None  # jpeg/webp quality, 0..100


@dataclass
class ParsedRequest:
    fields: dict[str, Any] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    delivery: Delivery = Delivery()


async def parse_request(request: Request, image_fields: tuple[str, ...]) -> ParsedRequest:
    """Read and sort a request body. `image_fields` are the image fields this route accepts."""
    if request.mimetype == "application/json":
        raw = await _read_json(request)
    elif request.mimetype in FORM_TYPES:
        raw = await _read_form(request, image_fields)
    else:
        raise JobError(
            f"Content-Type must be application/json or multipart/form-data, got {request.mimetype or 'none'!r}",
            None, "unsupported_media_type", 415,
        )
    parsed = ParsedRequest()
    delivery: dict[str, Any] = {}
    for name, value in raw.items():
        if name in image_fields:
            parsed.uploads[name] = value if isinstance(value, bytes) else _image_from_text(name, value)
        elif name in JOB_FIELDS:
            parsed.fields[name] = value
        elif name in DELIVERY_FIELDS:
            delivery[name] = value
        elif name not in IGNORED_FIELDS:
            raise JobError(f"unknown field {name!r}", name, "unknown_field")
    parsed.delivery = _parse_delivery(delivery)
    return parsed


async def _read_json(request: Request) -> dict[str, Any]:
    body = await request.get_data()
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise JobError(f"request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(raw, dict):
        raise JobError("request body must be a JSON object", None, "invalid_json")
    return {name: value for name, value in raw.items() if value is not None}  # null = absent, as OpenAI


async def _read_form(request: Request, image_fields: tuple[str, ...]) -> dict[str, Any]:
    form = await request.form
    files = await request.files
    raw: dict[str, Any] = {}
    for name in form:
        raw[_field_name(name)] = form[name]
    for name in files:
        uploads = files.getlist(name)
        field_name = _field_name(name)
        if len(uploads) > 1 or field_name in raw:
            raise JobError(f"only one {field_name} may be sent", field_name, "invalid_value")
        raw[field_name] = uploads[0].read() if field_name in image_fields else uploads[0].read().decode("utf-8", "replace")
    return raw


def _field_name(name: str) -> str:
    return name.removesuffix("[]")  # OpenAI clients send image lists as `image[]`


def _image_from_text(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise JobError(f"{name} must be an uploaded file, a base64 string or a data URL", name, "invalid_type")
    return decode_base64_image(value, name)


def _parse_delivery(values: dict[str, Any]) -> Delivery:
    response_format = values.get("response_format", "url")
    if response_format not in ("url", "b64_json"):
        raise JobError(f"response_format must be 'url' or 'b64_json', got {response_format!r}",
                       "response_format", "invalid_value")
    output_format = values.get("output_format", "png")
    output_format = "jpeg" if output_format == "jpg" else output_format
    if output_format not in OUTPUT_FORMATS:
        raise JobError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}",
                       "output_format", "invalid_value")
    compression = values.get("output_compression")
    if compression is not None:
        try:
            if isinstance(compression, (bool, float)):
                raise TypeError(compression)
            compression = int(compression)
        except (TypeError, ValueError):
            raise JobError("output_compression must be an integer 0..100", "output_compression", "invalid_type") from None
        if not 0 <= compression <= 100:
            raise JobError("output_compression must be between 0 and 100", "output_compression", "out_of_range")
    return Delivery(response_format, output_format, compression)
