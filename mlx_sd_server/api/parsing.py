"""Request bodies (JSON or multipart/form) -> job fields, raw image uploads and delivery options.

The two encodings are normalised here, so the routes see one shape: `fields` holds job fields (typed
JSON values or form strings, validated later by `build_job`), `uploads` holds the bytes of each image
field (a list: `image` may be given several times, in order), and `delivery` says how the results go
back to the client.

A body is read strictly, as the flat set of fields it must be, so its shape cannot cost more than its
bytes: a JSON body is one object of plain values (strings, numbers, booleans, null; an array or object
value is refused before it is built, so nesting cannot recurse), with at most `Limits.max_fields` keys,
each once; a form has at most `max_fields` parts, each named and sent once, and must end with its
closing boundary; text is UTF-8. Anything else is a 400 (413 for too many fields) naming what is wrong.
The exceptions are images, read item by item as they are: in JSON an image is a base64 string or data
URL, or an object `{"image_url": <data URL>}` / `{"b64_json": <base64>}` (OpenAI's shapes), and `image`
(or OpenAI's JSON name, `images`) an array of up to `Limits.max_images` of them; in a form `image` (also
`image[]`, `image[0]`... as clients send lists) may be repeated, up to `max_images` parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import parse_qsl

from quart import Request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestTimeout
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData, State

from mlx_sd_server.api.state import state
from mlx_sd_server.images import (
    HEADER_BYTES,
    OUTPUT_FORMATS,
    SIGNATURE_BYTES,
    check_upload_head,
    decode_base64_image,
    decode_base64_upload,
    spooled_upload,
)
from mlx_sd_server.job import (
    IMAGE_LISTS,
    JOB_FIELDS,
    JobError,
    Limits,
    as_bool,
    check_field_sizes,
    check_text,
    request_schema,
    shown,
)

# Accepted for OpenAI-SDK compatibility and ignored: nothing here can honour them.
# How results go back: validated here, published in /openapi.json (api/openapi.py).
DELIVERY_SCHEMA: dict[str, dict[str, Any]] = {
    "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "url"},
    "output_format": {"type": "string", "enum": [*OUTPUT_FORMATS, "jpg"], "default": "png"},
    "output_compression": {"type": "integer", "minimum": 0, "maximum": 100, "description": "jpeg/webp quality"},
    "stream": {
        "type": "boolean",
        "default": False,
        "description": "answer with Server-Sent Events as OpenAI does (image_generation.* / image_edit.*)",
    },
    "partial_images": {
        "type": "integer",
        "minimum": 0,
        "maximum": 3,
        "default": 0,
        "description": "partial images sent while streaming (needs stream: true)",
    },
}
DELIVERY_FIELDS = tuple(DELIVERY_SCHEMA)
# A JSON body's other names for an image field: OpenAI's JSON form of an edit sends `images`, a list.
JSON_IMAGE_ALIASES = {"images": "image"}
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_BOUNDARY = 200  # RFC 2046 allows 70 characters
MAX_PART_HEADERS = 16 * 1024  # bytes of one part's headers (a long file name fits many times over)
TEXT_CHARSETS = ("utf-8", "ascii", "us-ascii", "iso-8859-1")  # a form part may declare one of these


@dataclass(frozen=True)
class Delivery:
    response_format: str = "url"  # or "b64_json"
    output_format: str = "png"  # png | jpeg | webp
    output_compression: int | None = None  # jpeg/webp quality, 0..100
    stream: bool = False  # Server-Sent Events, OpenAI's image streaming
    partial_images: int = 0  # 0..3, only with stream


Upload = bytes | IO[bytes]  # an image's bytes, or a seekable binary file (a spooled upload) holding them


@dataclass
class ParsedRequest:
    fields: dict[str, Any] = field(default_factory=dict)
    # Each image field's uploads, in the order sent: one, or for IMAGE_LISTS (`image`) up to Limits.max_images.
    uploads: dict[str, list[Upload]] = field(default_factory=dict)
    delivery: Delivery = Delivery()

    def close(self) -> None:
        """Release the spooled uploads (their temporary files)."""
        for uploads in self.uploads.values():
            close_all(uploads)


def close_all(values: Any) -> None:
    """Close each spooled upload in `values` (any value, list or dict of them; other values are left)."""
    for value in values.values() if isinstance(values, dict) else values if isinstance(values, list) else [values]:
        if isinstance(value, (list, dict)):
            close_all(value)
        elif hasattr(value, "close"):
            value.close()


# A body is read as it arrives, a slice at a time; see parse_request.
BODY_SLICE = 64 * 1024


async def parse_request(
    request: Request,
    image_fields: tuple[str, ...],
    limits: Limits | None = None,
    max_pixels: int | None = None,
    fields: Collection[str] = JOB_FIELDS,
) -> ParsedRequest:
    """Read and sort a request body. `image_fields` are the image fields this route accepts, `fields` its
    other fields (the job's by default; the delivery fields always); `limits` and `max_pixels` (an upload's)
    default to the server's.

    What an upload may cost before it is refused is bounded: the body is read as it arrives (never held
    twice), a form's image parts go to spooled files (check_upload_head judges each by its first bytes, as
    they arrive: a part that is not an image, or whose header says too many pixels, is refused then, and
    the rest of the body is read and dropped), and a JSON body's long base64 strings are set aside as
    bytes and decoded to spooled files a slice at a time, after their first slice has been judged."""
    if limits is None or max_pixels is None:
        settings = state().settings
        limits = limits or settings.limits
        max_pixels = max_pixels if max_pixels is not None else settings.max_upload_pixels
    raw = await read_body(request, image_fields, limits, max_pixels)
    parsed = ParsedRequest()
    try:
        for name, value in raw.items():
            if name not in image_fields and name not in fields and name not in DELIVERY_FIELDS:
                raise JobError(f"unknown field {shown(name)}", name, "unknown_field")
            if name not in image_fields and isinstance(value, bytes):  # a text field sent as a file (curl -F x=@f)
                raw[name] = _text(name, value)
        # Sizes before anything reads them: `model` is resolved, and delivery fields read, before build_job runs.
        check_field_sizes({name: value for name, value in raw.items() if name not in image_fields}, limits)
        delivery: dict[str, Any] = {}
        for name, value in raw.items():
            if name in image_fields:
                parsed.uploads[name] = uploads = []
                items = value if isinstance(value, list) else [value]
                if len(items) > 1 and name not in IMAGE_LISTS:  # (the readers let only IMAGE_LISTS repeat)
                    raise JobError(f"only one {shown(name)} may be sent", name, "invalid_value")
                for index, item in enumerate(items):
                    label = f"{name} {index + 1}" if len(items) > 1 else name
                    uploads.append(upload_of(name, item, limits, max_pixels, label))
            elif name in fields:
                parsed.fields[name] = value
            elif name in DELIVERY_FIELDS:
                delivery[name] = value
        parsed.delivery = _parse_delivery(delivery)
    except BaseException:
        parsed.close()
        close_all(raw)
        raise
    return parsed


async def read_body(
    request: Request,
    image_fields: tuple[str, ...],
    limits: Limits,
    max_pixels: int,
    *,
    structured: Collection[str] = (),
    image_lists: Collection[str] = (),
    json_only: bool = False,
) -> dict[str, Any]:
    """A request body (JSON, or a form unless `json_only`) read as parse_request reads it, within its time
    limit, into {name: value} as read_json and FormReader give them (images as bytes, spooled files or
    set-aside base64; unchecked). `structured` and `image_lists` are read_json's."""
    chunks = _body(request)
    loop = asyncio.get_running_loop()
    timeout = request.body_timeout  # for the whole body, as Quart's get_data has it
    started = loop.time()
    try:
        if json_only and request.mimetype != "application/json":
            raise JobError(
                f"Content-Type must be application/json, got {shown(request.mimetype or 'none')}",
                None,
                "unsupported_media_type",
                415,
            )
        reading = _read(request, chunks, image_fields, limits, max_pixels, structured, image_lists)
        return await asyncio.wait_for(reading, timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise RequestTimeout() from None
    except JobError:  # refused before the body was all read: read the rest (dropped) so the answer is heard
        left = None if timeout is None else max(timeout - (loop.time() - started), 0)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(_drain(chunks), left)
        raise


async def _read(
    request: Request,
    chunks: AsyncIterator[memoryview],
    image_fields: tuple[str, ...],
    limits: Limits,
    max_pixels: int,
    structured: Collection[str] = (),
    image_lists: Collection[str] = (),
) -> dict[str, Any]:
    if request.mimetype == "application/json":
        body = await _collect(chunks, request.content_length)
        raw = read_json(body, limits, image_fields, structured=structured, image_lists=image_lists)
        for alias, name in JSON_IMAGE_ALIASES.items():
            if alias in raw and name in image_fields:
                if name in raw:
                    raise JobError(f"send the images as {name} or as {alias}, not both", alias, "invalid_value")
                raw[name] = raw.pop(alias)
        return raw
    if request.mimetype == "multipart/form-data":
        reader = FormReader(request.mimetype_params.get("boundary"), limits, image_fields, max_pixels)
        try:
            async for chunk in chunks:
                reader.feed(chunk)
            reader.feed(None)
        except BaseException:
            reader.close()
            raise
        return reader.fields
    if request.mimetype in FORM_TYPES:
        return read_urlencoded(bytes(await _collect(chunks, request.content_length)), limits)
    raise JobError(
        f"Content-Type must be application/json or multipart/form-data, got {shown(request.mimetype or 'none')}",
        None,
        "unsupported_media_type",
        415,
    )


async def _body(request: Request) -> AsyncIterator[memoryview]:
    """The request body as it arrives, in slices of at most BODY_SLICE bytes; over the server's limit
    (MAX_CONTENT_LENGTH, which Quart checks against a Content-Length) it is a 413."""
    limit = request.max_content_length
    total = 0
    async for data in request.body:
        total += len(data)
        if limit is not None and total > limit:
            raise RequestEntityTooLarge()
        view = memoryview(data)
        for at in range(0, len(view), BODY_SLICE):
            yield view[at : at + BODY_SLICE]


async def _collect(chunks: AsyncIterator[memoryview], expected: int | None) -> bytearray:
    """The whole body in one buffer (sized by its Content-Length when it has one: held once, not grown)."""
    if expected is not None:
        body = bytearray(expected)
        at = 0
        async for chunk in chunks:
            if at + len(chunk) > expected:  # more than announced: not what HTTP sends, but grow anyway
                body[at:] = chunk
            else:
                body[at : at + len(chunk)] = chunk
            at += len(chunk)
        del body[at:]
        return body
    body = bytearray()
    async for chunk in chunks:
        body += chunk
    return body


async def _drain(chunks: AsyncIterator[memoryview]) -> None:
    """Read what is left of a refused body without keeping it (up to the size limit), so that the client,
    still sending, gets to read the refusal instead of a reset connection."""
    try:
        async for _ in chunks:
            pass
    except HTTPException:  # over the size limit: enough
        pass


def upload_of(name: str, value: Any, limits: Limits, max_pixels: int, label: str) -> Upload:
    """One image of an image field -> its bytes (or a spooled file holding them). `label` names it in
    messages (`image 2`)."""
    if isinstance(value, (bytes, bytearray)) or hasattr(value, "read"):  # a form's file part
        return value
    if isinstance(value, dict):  # JSON: OpenAI's {"image_url": ...} or {"b64_json": ...}
        value = _image_object(name, value, label)
    if isinstance(value, memoryview):  # a long JSON string, set aside unread
        return decode_base64_upload(
            value, name, max_pixels=max_pixels, max_aspect=limits.max_upload_aspect, label=label
        )
    return _image_from_text(name, value, label)


IMAGE_OBJECT_KEYS = ("image_url", "b64_json")  # OpenAI's: an image as a data URL, or as base64


def _image_object(name: str, value: dict[str, Any], label: str) -> Any:
    """An image given as a JSON object -> its data URL or base64 text (as read: a string or a set-aside view)."""
    if "file_id" in value:
        raise JobError(
            f"{label}: file_id names a file in OpenAI's Files API, which this server does not have; "
            'send the image itself ({"image_url": "data:image/png;base64,..."})',
            name,
            "unsupported_parameter",
        )
    if unknown := sorted(set(value) - set(IMAGE_OBJECT_KEYS)):
        raise JobError(
            f"{label}: unknown key {shown(unknown[0])} (an image object has image_url or b64_json)",
            name,
            "unknown_field",
        )
    if len(value) != 1:
        raise JobError(f"{label} must have one of image_url or b64_json", name, "invalid_value")
    text = next(iter(value.values()))
    if isinstance(text, str) and re.match(r"\s*[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
        raise JobError(
            f"{label}: image_url must be a data: URL (data:image/png;base64,...); this server fetches no urls",
            name,
            "invalid_image",
        )
    return text


# --- JSON ------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


# A JSON string at least this long is set aside as bytes before the body is decoded to text (see read_json).
SET_ASIDE_CHARS = 64 * 1024
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_ESCAPE_OR_CONTROL = re.compile(rb"[\x00-\x1f\\]")
_JSON_WHITESPACE = re.compile(rb"[ \t\n\r]*")


def _set_aside(body: bytes | bytearray, limits: Limits) -> tuple[bytes | bytearray, dict[str, memoryview]]:
    """A UTF-8 JSON body with each long string value (SET_ASIDE_CHARS or more, no escapes: a base64 image)
    replaced by a short placeholder string no client can send (a random token), and those strings' bytes
    (views of the body, not copies) by placeholder: the body is then decoded to text without a second,
    text copy of its images."""
    if len(body) < SET_ASIDE_CHARS or json.detect_encoding(body) != "utf-8":
        return body, {}
    view = memoryview(body)
    token = secrets.token_hex(8)
    pieces: list[bytes | memoryview] = []
    aside: dict[str, memoryview] = {}
    copied = at = 0
    for _ in range(4 * limits.max_fields + 16):  # a body with more strings than that is refused anyway
        quote = body.find(b'"', at)
        if quote < 0:
            break
        match = _JSON_STRING.match(body, quote)
        if match is None:  # unterminated: the parser says so
            break
        at = match.end()
        inner = view[quote + 1 : at - 1]
        if len(inner) < SET_ASIDE_CHARS or _ESCAPE_OR_CONTROL.search(inner):
            continue
        spaces = _JSON_WHITESPACE.match(body, at)
        assert spaces is not None  # it matches the empty string too
        after = spaces.end()
        if body[after : after + 1] == b":":  # a key: read as it is
            continue
        key = f"\0{token}:{len(aside)}"
        pieces += [view[copied : quote + 1], f"\\u0000{token}:{len(aside)}".encode()]
        aside[key] = inner
        copied = at - 1
    if not aside:
        return body, {}
    pieces.append(view[copied:])
    return b"".join(pieces), aside


def _put_back(value: Any, aside: dict[str, memoryview], keep: bool) -> Any:
    """A parsed value with the strings set aside put back: as bytes (views) where `keep` (an image field's
    value, and the strings in it), else as text."""
    if isinstance(value, str) and value in aside:
        if keep:
            return aside[value]
        try:
            return str(aside[value], "utf-8")
        except UnicodeDecodeError as error:
            raise JobError(
                f"request body is not valid JSON: not UTF-8 text ({error.reason})", None, "invalid_json"
            ) from None
    if isinstance(value, list):
        return [_put_back(item, aside, keep) for item in value]
    if isinstance(value, dict):
        return {name: _put_back(item, aside, keep) for name, item in value.items()}
    return value


def read_json(
    body: bytes | bytearray,
    limits: Limits,
    image_fields: tuple[str, ...] = (),
    *,
    structured: Collection[str] = (),
    image_lists: Collection[str] = (),
) -> dict[str, Any]:
    """One JSON object of plain values -> {name: value}, null values dropped (absent, as OpenAI treats them).

    Read key by key with the standard decoder's scanner, so an array or object value is refused on sight
    (never built), as are duplicate keys, NaN/Infinity, lone surrogates and more than `max_fields` keys.
    Only the fields whose schema is an array (`loras`), and those in `structured` (a route's own), take one;
    their readers check them. `image_lists`: image fields beside IMAGE_LISTS that take an array of images.

    An `image_fields` field (and its JSON_IMAGE_ALIASES) is read as an image (_scan_image): a string, an
    image object, or for IMAGE_LISTS an array of them.

    A long string (a base64 image) is set aside as bytes before the body becomes text; the strings of an
    image field are then memoryviews of their base64 text (decode_base64_upload), any other its text."""
    arrays = {name for name, schema in request_schema(limits).items() if schema["type"] == "array"}
    aliases = {alias for alias, name in JSON_IMAGE_ALIASES.items() if name in image_fields}
    lists = {name for name in image_fields if name in (*IMAGE_LISTS, *image_lists)} | aliases
    images = {*image_fields, *lists}
    body, aside = _set_aside(body, limits)
    try:
        text = body.decode(json.detect_encoding(body))
    except UnicodeDecodeError as error:
        raise JobError(
            f"request body is not valid JSON: not UTF-8 text ({error.reason} at byte {error.start})",
            None,
            "invalid_json",
        ) from None
    del body
    raw: dict[str, Any] = {}
    seen: set[str] = set()
    end = len(text)

    def skip(at: int) -> int:
        return _skip(text, at)

    def expect(at: int, char: str, what: str) -> int:
        return _expect(text, at, char, what)

    at = skip(0)
    if at >= end or text[at] != "{":
        if at < end and text[at] in '["-0123456789tfn':  # a JSON value, but not an object
            raise JobError("request body must be a JSON object", None, "invalid_json")
        raise JobError(f"request body is not valid JSON: expected an object at character {at}", None, "invalid_json")
    at = skip(at + 1)
    if at < end and text[at] == "}":
        at += 1
    else:
        while True:
            if at >= end or text[at] != '"':
                raise JobError(
                    f"request body is not valid JSON: expected a field name in double quotes at character {at}",
                    None,
                    "invalid_json",
                )
            name, at = _scan(text, at)
            try:
                check_text("a field name", name)
            except JobError as error:  # about no field: no param
                raise JobError(error.message, None, error.code) from None
            if name in seen:
                raise JobError(f"only one {shown(name)} may be sent", name, "invalid_value")
            if len(seen) >= limits.max_fields:
                raise JobError(f"the request has more than {limits.max_fields} fields", None, "too_many_fields", 413)
            seen.add(name)
            at = skip(expect(skip(at), ":", "':'"))
            if name in images:
                value, at = _scan_image(text, at, name, limits, name in lists)
            elif at < end and text[at] in "[{" and name not in structured and not (text[at] == "[" and name in arrays):
                kind = "an array" if text[at] == "[" else "an object"
                raise JobError(
                    f"{shown(name)} must be a single value (a string, number or boolean), not {kind}",
                    name,
                    "invalid_type",
                )
            else:
                value, at = _scan(text, at)
            if isinstance(value, str):
                check_text(name, value)
            if value is not None:  # null = absent
                raw[name] = value
            at = skip(at)
            if at < end and text[at] == ",":
                at = skip(at + 1)
                continue
            at = expect(at, "}", "',' or '}'")
            break
    if skip(at) != end:
        raise JobError(f"request body is not valid JSON: extra data at character {skip(at)}", None, "invalid_json")
    if aside:
        raw = {name: _put_back(value, aside, name in images) for name, value in raw.items()}
    return raw


def _skip(text: str, at: int) -> int:
    spaces = _WHITESPACE.match(text, at)
    assert spaces is not None  # it matches the empty string too
    return spaces.end()


def _expect(text: str, at: int, char: str, what: str) -> int:
    if at >= len(text) or text[at] != char:
        raise JobError(f"request body is not valid JSON: expected {what} at character {at}", None, "invalid_json")
    return at + 1


IMAGE_OBJECT_MAX_KEYS = 4  # more than an image object has (image_url or b64_json; file_id is refused by name)


def _scan_image(text: str, at: int, name: str, limits: Limits, many: bool) -> tuple[Any, int]:
    """An image field's JSON value at `at` -> (value, end), read item by item so that nothing but images is
    built: a string (base64, a data URL), an object of strings (`{"image_url": ...}`), or where `many` an
    array of up to `limits.max_images` of those. Any other scalar is read, and refused as an image later."""
    end = len(text)
    if at < end and text[at] == "[":
        if not many:
            raise JobError(f"{shown(name)} is one image, not an array", name, "invalid_type")
        items: list[Any] = []
        at = _skip(text, at + 1)
        if at < end and text[at] == "]":
            return items, at + 1
        while True:
            if len(items) >= limits.max_images:
                raise JobError(
                    f"{name}: more than {limits.max_images} input images, this server's limit", name, "invalid_value"
                )
            item, at = _scan_image(text, at, name, limits, False)
            items.append(item)
            at = _skip(text, at)
            if at < end and text[at] == ",":
                at = _skip(text, at + 1)
                continue
            return items, _expect(text, at, "]", "',' or ']'")
    if at < end and text[at] == "{":
        image: dict[str, Any] = {}
        at = _skip(text, at + 1)
        if at < end and text[at] == "}":
            return image, at + 1
        while True:
            if at >= end or text[at] != '"':
                raise JobError(
                    f"request body is not valid JSON: expected a key in double quotes at character {at}",
                    None,
                    "invalid_json",
                )
            key, at = _scan(text, at)
            if key in image or len(image) >= IMAGE_OBJECT_MAX_KEYS:
                raise JobError(f"{shown(name)}: an image object has one image_url or b64_json", name, "invalid_value")
            at = _skip(text, _expect(text, _skip(text, at), ":", "':'"))
            if at < end and text[at] in "[{":
                raise JobError(f"{shown(name)}: {shown(key)} must be a string", name, "invalid_type")
            image[key], at = _scan(text, at)
            at = _skip(text, at)
            if at < end and text[at] == ",":
                at = _skip(text, at + 1)
                continue
            return image, _expect(text, at, "}", "',' or '}'")
    return _scan(text, at)


def _scan(text: str, at: int) -> tuple[Any, int]:
    """One JSON value at `at` -> (value, end)."""
    try:
        return _DECODER.raw_decode(text, at)
    except RecursionError:
        raise JobError("request body is not valid JSON: nested too deeply", None, "invalid_json") from None
    except json.JSONDecodeError as error:
        raise JobError(f"request body is not valid JSON: {error}", None, "invalid_json") from None
    except ValueError as error:  # NaN/Infinity, or an integer with more digits than Python converts
        message = str(error) if "JSON number" in str(error) else "a number too long to read"
        raise JobError(f"request body is not valid JSON: {message}", None, "invalid_json") from None


# --- forms -----------------------------------------------------------------------------------------


class _Decoder(MultipartDecoder):
    """Werkzeug's decoder, refusing a part's headers over MAX_PART_HEADERS before parsing them (megabytes of
    header take its header parser seconds)."""

    def _parse_headers(self, data: bytes | bytearray):
        if len(data) > MAX_PART_HEADERS:
            raise ValueError(f"a part's headers are over {MAX_PART_HEADERS} bytes")
        return super()._parse_headers(data)


def read_multipart(body: bytes, boundary: str | None, limits: Limits) -> dict[str, Any]:
    """A multipart/form-data body -> {name: bytes (a file part) or str (a text part)}. Every part must be
    named and sent once, text must be UTF-8 (or a charset the part declares), and the body must end with
    its closing boundary: a truncated upload is refused, not read as far as it got."""
    reader = FormReader(boundary, limits)
    reader.feed(body)
    reader.feed(None)  # all of it: the decoder must find the closing boundary in what it has
    return reader.fields


class FormReader:
    """A multipart/form-data body read as it arrives (`feed` each piece, then None): `fields` as
    read_multipart gives them, except that a file part of one of `image_fields` is a spooled file, whose
    first bytes check_upload_head judges as they come (with `max_pixels`), and that those of IMAGE_LISTS
    (`image`, also sent as `image[]` or `image[0]`) may repeat: their value is then a list, in order, of at
    most `limits.max_images`."""

    def __init__(
        self, boundary: str | None, limits: Limits, image_fields: tuple[str, ...] = (), max_pixels: int = 6000 * 6000
    ):
        if not boundary:
            raise JobError("multipart/form-data needs a boundary parameter in its Content-Type", None, "invalid_form")
        if len(boundary) > MAX_BOUNDARY:
            raise JobError(f"the multipart boundary is over {MAX_BOUNDARY} characters", None, "invalid_form")
        self.limits = limits
        self.image_fields = image_fields
        self.lists = tuple(name for name in image_fields if name in IMAGE_LISTS)
        self.max_pixels = max_pixels
        self.decoder = _Decoder(boundary.encode("latin-1", "replace"), max_parts=limits.max_fields)
        self.fields: dict[str, Any] = {}
        self.part: Field | File | None = None
        self.name = ""
        self.chunks: list[bytes] = []
        self.upload: IO[bytes] | None = None  # the current part's spooled file, for an image part
        self.head = bytearray()  # and its first HEADER_BYTES
        self.done = False

    def feed(self, data: bytes | memoryview | None) -> None:
        if self.done:
            return  # the epilogue: ignored
        decoder = self.decoder
        try:
            # Werkzeug types `data` as bytes, but only extends a bytearray with it: a view needs no copy.
            decoder.receive_data(data)  # type: ignore[arg-type]
            while True:
                event = decoder.next_event()
                if isinstance(event, Epilogue):
                    self.done = True
                    return
                if isinstance(event, NeedData):
                    if data is None:  # not reached: the decoder raises once all data is in
                        raise ValueError("the body ended early")
                    return
                if isinstance(event, (Field, File)):
                    self._start(event)
                elif isinstance(event, Data) and self.part is not None:
                    self._take(self.part, event.data, event.more_data)
        except JobError:  # a ValueError too
            raise
        except RequestEntityTooLarge:
            raise JobError(
                f"the form has more than {self.limits.max_fields} parts", None, "too_many_fields", 413
            ) from None
        except ValueError as error:  # the decoder's word for a malformed body (UnicodeDecodeError included)
            if decoder.state == State.PREAMBLE:
                raise JobError(
                    "the multipart body has no part opening with the boundary its Content-Type names",
                    None,
                    "invalid_form",
                ) from None
            if "parse beyond" in str(error):  # all data in, and the decoder still wanted more
                raise JobError(
                    "the multipart body ends before its closing boundary (--boundary--): the upload is incomplete",
                    None,
                    "invalid_form",
                ) from None
            raise JobError(f"the multipart body is malformed: {shown(str(error))}", None, "invalid_form") from None

    def _start(self, part: Field | File) -> None:
        self.part, self.chunks, self.head = part, [], bytearray()
        self.name = _part_name(part, self.fields, self.lists)
        if self.name in self.lists and len(self.fields.get(self.name, ())) >= self.limits.max_images:
            raise JobError(
                f"more than {self.limits.max_images} {self.name} parts: over this server's limit of input images",
                self.name,
                "invalid_value",
            )
        if isinstance(part, File) and self.name in self.image_fields:
            self.upload = spooled_upload()

    def _label(self) -> str:
        """The part's name in messages: `image 2` for the second of a list."""
        if self.name not in self.lists or not self.fields.get(self.name):
            return self.name
        return f"{self.name} {len(self.fields[self.name]) + 1}"

    def _store(self, value: Any) -> None:
        if self.name in self.lists:
            self.fields.setdefault(self.name, []).append(value)
        else:
            self.fields[self.name] = value

    def _take(self, part: Field | File, data: bytes, more: bool) -> None:
        if self.upload is not None:
            self.upload.write(data)
            had = len(self.head)
            if had < HEADER_BYTES:
                self.head += data[: HEADER_BYTES - had]
                if had < SIGNATURE_BYTES <= len(self.head) or had < HEADER_BYTES <= len(self.head):
                    check_upload_head(
                        self.head,
                        self.name,
                        max_pixels=self.max_pixels,
                        max_aspect=self.limits.max_upload_aspect,
                        label=self._label(),
                    )
        else:
            self.chunks.append(data)
        if more:
            return
        if self.upload is not None:
            upload, self.upload, self.head = self.upload, None, bytearray()
            self._store(upload)
        else:
            data = b"".join(self.chunks)
            self._store(data if isinstance(part, File) else _text(self.name, data, part.headers.get("content-type")))
        self.part, self.chunks = None, []

    def close(self) -> None:
        """Release the spooled uploads, read or being read (after a refusal)."""
        close_all([*self.fields.values(), self.upload])


_LIST_INDEX = re.compile(r"\[\d{0,4}\]$")


def _part_name(part: Field | File, raw: dict[str, Any], lists: tuple[str, ...] = ()) -> str:
    """A part's field name: `image[]` is `image` (OpenAI clients send image lists so), as is `image[0]` for a
    field of `lists`, which may repeat; any other field is sent once."""
    if not part.name:
        raise JobError('a form part has no name (Content-Disposition: form-data; name="...")', None, "invalid_form")
    name = part.name.removesuffix("[]")
    if _LIST_INDEX.sub("", name) in lists:
        return _LIST_INDEX.sub("", name)
    if name in raw:
        raise JobError(f"only one {shown(name)} may be sent", name, "invalid_value")
    return name


def _text(name: str, data: bytes, content_type: str | None = None) -> str:
    """A text field's bytes, in the charset its part declares (UTF-8 unless one of TEXT_CHARSETS)."""
    charset = parse_options_header(content_type or "")[1].get("charset", "utf-8").lower()
    charset = charset if charset in TEXT_CHARSETS else "utf-8"
    try:
        return data.decode(charset)
    except UnicodeDecodeError:
        raise JobError(f"{shown(name)} is not valid {charset} text", name, "invalid_value") from None


def read_urlencoded(body: bytes, limits: Limits) -> dict[str, str]:
    """An application/x-www-form-urlencoded body -> {name: str}, each name once, UTF-8."""
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=limits.max_fields,
        )
    except UnicodeDecodeError:
        raise JobError("the form is not valid UTF-8 text", None, "invalid_form") from None
    except ValueError:  # max_num_fields
        raise JobError(f"the form has more than {limits.max_fields} fields", None, "too_many_fields", 413) from None
    raw: dict[str, str] = {}
    for name, value in pairs:
        name = name.removesuffix("[]")
        if not name:
            raise JobError("a form field has no name", None, "invalid_form")
        if name in raw:
            raise JobError(f"only one {shown(name)} may be sent", name, "invalid_value")
        raw[name] = value
    return raw


# --- the rest --------------------------------------------------------------------------------------


def _image_from_text(name: str, value: Any, label: str) -> bytes:
    if not isinstance(value, str):
        raise JobError(f"{label} must be an uploaded file, a base64 string or a data URL", name, "invalid_type")
    return decode_base64_image(value, name, label)


def _parse_delivery(values: dict[str, Any]) -> Delivery:
    stream = as_bool("stream", values.pop("stream")) if "stream" in values else False
    partial_images = _parse_partial_images(values.pop("partial_images", None), stream)
    for name, value in values.items():
        if name != "output_compression" and not isinstance(value, str):
            raise JobError(f"{name} must be a string, got {shown(value)}", name, "invalid_type")
    for name in ("response_format", "output_format"):
        choices = DELIVERY_SCHEMA[name]["enum"]
        if values.get(name, DELIVERY_SCHEMA[name]["default"]) not in choices:
            raise JobError(
                f"{name} must be one of {', '.join(choices)}, got {shown(values[name])}", name, "invalid_value"
            )
    response_format = values.get("response_format", DELIVERY_SCHEMA["response_format"]["default"])
    output_format = values.get("output_format", DELIVERY_SCHEMA["output_format"]["default"])
    output_format = "jpeg" if output_format == "jpg" else output_format
    compression = values.get("output_compression")
    if compression is not None:
        try:
            if isinstance(compression, (bool, float)):
                raise TypeError(compression)
            compression = int(compression)
        except (TypeError, ValueError):
            raise JobError(
                f"output_compression must be an integer 0..100, got {shown(compression)}",
                "output_compression",
                "invalid_type",
            ) from None
        bounds = DELIVERY_SCHEMA["output_compression"]
        if not bounds["minimum"] <= compression <= bounds["maximum"]:
            raise JobError(
                f"output_compression must be between 0 and 100, got {shown(compression)}",
                "output_compression",
                "out_of_range",
            )
    return Delivery(response_format, output_format, compression, stream, partial_images)


def _parse_partial_images(value: Any, stream: bool) -> int:
    if value is None:
        return 0
    bounds = DELIVERY_SCHEMA["partial_images"]
    number = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int):
        raise JobError(
            f"partial_images must be an integer {bounds['minimum']}..{bounds['maximum']}, got {shown(value)}",
            "partial_images",
            "invalid_type",
        )
    if not bounds["minimum"] <= number <= bounds["maximum"]:
        raise JobError(
            f"partial_images must be between {bounds['minimum']} and {bounds['maximum']}, got {shown(value)}",
            "partial_images",
            "out_of_range",
        )
    if not stream:
        raise JobError(
            "partial_images needs stream: true (partial images are only sent while streaming)",
            "partial_images",
            "invalid_value",
        )
    return number
