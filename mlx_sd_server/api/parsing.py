"""Request bodies (JSON or multipart/form) -> job fields, raw image uploads and delivery options.

The two encodings are normalised here, so the routes see one shape: `fields` holds job fields (typed
JSON values or form strings, validated later by `build_job`), `uploads` holds the bytes of each image
field, and `delivery` says how the results go back to the client.

A body is read strictly, as the flat set of fields it must be, so its shape cannot cost more than its
bytes: a JSON body is one object of plain values (strings, numbers, booleans, null; an array or object
value is refused before it is built, so nesting cannot recurse), with at most `Limits.max_fields` keys,
each once; a form has at most `max_fields` parts, each named and sent once, and must end with its
closing boundary; text is UTF-8. Anything else is a 400 (413 for too many fields) naming what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator
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


@dataclass
class ParsedRequest:
    fields: dict[str, Any] = field(default_factory=dict)
    # Each image field's bytes: `bytes`, or a seekable binary file (a spooled upload) holding them.
    uploads: dict[str, bytes | IO[bytes]] = field(default_factory=dict)
    delivery: Delivery = Delivery()

    def close(self) -> None:
        """Release the spooled uploads (their temporary files)."""
        for upload in self.uploads.values():
            if hasattr(upload, "close"):
                upload.close()


# A body is read as it arrives, a slice at a time; see parse_request.
BODY_SLICE = 64 * 1024


async def parse_request(
    request: Request, image_fields: tuple[str, ...], limits: Limits | None = None, max_pixels: int | None = None
) -> ParsedRequest:
    """Read and sort a request body. `image_fields` are the image fields this route accepts; `limits` and
    `max_pixels` (an upload's) default to the server's.

    What an upload may cost before it is refused is bounded: the body is read as it arrives (never held
    twice), a form's image parts go to spooled files (check_upload_head judges each by its first bytes, as
    they arrive: a part that is not an image, or whose header says too many pixels, is refused then, and
    the rest of the body is read and dropped), and a JSON body's long base64 strings are set aside as
    bytes and decoded to spooled files a slice at a time, after their first slice has been judged."""
    if limits is None or max_pixels is None:
        settings = state().settings
        limits = limits or settings.limits
        max_pixels = max_pixels if max_pixels is not None else settings.max_upload_pixels
    chunks = _body(request)
    loop = asyncio.get_running_loop()
    timeout = request.body_timeout  # for the whole body, as Quart's get_data has it
    started = loop.time()
    try:
        raw = await asyncio.wait_for(_read(request, chunks, image_fields, limits, max_pixels), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise RequestTimeout() from None
    except JobError:  # refused before the body was all read: read the rest (dropped) so the answer is heard
        left = None if timeout is None else max(timeout - (loop.time() - started), 0)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(_drain(chunks), left)
        raise
    parsed = ParsedRequest()
    try:
        for name, value in raw.items():
            if name not in image_fields and name not in (*JOB_FIELDS, *DELIVERY_FIELDS):
                raise JobError(f"unknown field {shown(name)}", name, "unknown_field")
            if name not in image_fields and isinstance(value, bytes):  # a text field sent as a file (curl -F x=@f)
                raw[name] = _text(name, value)
        # Sizes before anything reads them: `model` is resolved, and delivery fields read, before build_job runs.
        check_field_sizes({name: value for name, value in raw.items() if name not in image_fields}, limits)
        delivery: dict[str, Any] = {}
        for name, value in raw.items():
            if name in image_fields:
                parsed.uploads[name] = _upload(name, value, limits, max_pixels)
            elif name in JOB_FIELDS:
                parsed.fields[name] = value
            elif name in DELIVERY_FIELDS:
                delivery[name] = value
        parsed.delivery = _parse_delivery(delivery)
    except BaseException:
        parsed.close()
        for value in raw.values():
            if hasattr(value, "close"):
                value.close()
        raise
    return parsed


async def _read(
    request: Request, chunks: AsyncIterator[memoryview], image_fields: tuple[str, ...], limits: Limits, max_pixels: int
) -> dict[str, Any]:
    if request.mimetype == "application/json":
        return read_json(await _collect(chunks, request.content_length), limits, image_fields)
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


def _upload(name: str, value: Any, limits: Limits, max_pixels: int) -> bytes | IO[bytes]:
    """An image field's value -> its bytes (or a spooled file holding them)."""
    if isinstance(value, (bytes, bytearray)) or hasattr(value, "read"):  # a form's file part
        return value
    if isinstance(value, memoryview):  # a long JSON string, set aside unread
        return decode_base64_upload(value, name, max_pixels=max_pixels, max_aspect=limits.max_upload_aspect)
    return _image_from_text(name, value)


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
    """A parsed value with the strings set aside put back: as bytes (views) where `keep`, else as text."""
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
        return [_put_back(item, aside, False) for item in value]
    if isinstance(value, dict):
        return {name: _put_back(item, aside, False) for name, item in value.items()}
    return value


def read_json(body: bytes | bytearray, limits: Limits, image_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """One JSON object of plain values -> {name: value}, null values dropped (absent, as OpenAI treats them).

    Read key by key with the standard decoder's scanner, so an array or object value is refused on sight
    (never built), as are duplicate keys, NaN/Infinity, lone surrogates and more than `max_fields` keys.
    Only the fields whose schema is an array (`loras`) take one; build_job checks its items.

    A long string (a base64 image) is set aside as bytes before the body becomes text; the value of an
    `image_fields` field is then a memoryview of its base64 text (decode_base64_upload), any other its text."""
    structured = {name for name, schema in request_schema(limits).items() if schema["type"] == "array"}
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
        spaces = _WHITESPACE.match(text, at)
        assert spaces is not None  # it matches the empty string too
        return spaces.end()

    def expect(at: int, char: str, what: str) -> int:
        if at >= end or text[at] != char:
            raise JobError(f"request body is not valid JSON: expected {what} at character {at}", None, "invalid_json")
        return at + 1

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
            if at < end and text[at] in "[{" and not (text[at] == "[" and name in structured):
                kind = "an array" if text[at] == "[" else "an object"
                raise JobError(
                    f"{shown(name)} must be a single value (a string, number or boolean), not {kind}",
                    name,
                    "invalid_type",
                )
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
        raw = {name: _put_back(value, aside, name in image_fields) for name, value in raw.items()}
    return raw


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
    first bytes check_upload_head judges as they come (with `max_pixels`)."""

    def __init__(
        self, boundary: str | None, limits: Limits, image_fields: tuple[str, ...] = (), max_pixels: int = 6000 * 6000
    ):
        if not boundary:
            raise JobError("multipart/form-data needs a boundary parameter in its Content-Type", None, "invalid_form")
        if len(boundary) > MAX_BOUNDARY:
            raise JobError(f"the multipart boundary is over {MAX_BOUNDARY} characters", None, "invalid_form")
        self.limits = limits
        self.image_fields = image_fields
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
        self.name = _part_name(part, self.fields)
        if isinstance(part, File) and self.name in self.image_fields:
            self.upload = spooled_upload()

    def _take(self, part: Field | File, data: bytes, more: bool) -> None:
        if self.upload is not None:
            self.upload.write(data)
            had = len(self.head)
            if had < HEADER_BYTES:
                self.head += data[: HEADER_BYTES - had]
                if had < SIGNATURE_BYTES <= len(self.head) or had < HEADER_BYTES <= len(self.head):
                    check_upload_head(
                        self.head, self.name, max_pixels=self.max_pixels, max_aspect=self.limits.max_upload_aspect
                    )
        else:
            self.chunks.append(data)
        if more:
            return
        if self.upload is not None:
            self.fields[self.name], self.upload, self.head = self.upload, None, bytearray()
        else:
            data = b"".join(self.chunks)
            self.fields[self.name] = (
                data if isinstance(part, File) else _text(self.name, data, part.headers.get("content-type"))
            )
        self.part, self.chunks = None, []

    def close(self) -> None:
        """Release the spooled uploads, read or being read (after a refusal)."""
        for value in (*self.fields.values(), self.upload):
            if hasattr(value, "close"):
                value.close()


def _part_name(part: Field | File, raw: dict[str, Any]) -> str:
    if not part.name:
        raise JobError('a form part has no name (Content-Disposition: form-data; name="...")', None, "invalid_form")
    name = part.name.removesuffix("[]")  # OpenAI clients send image lists as `image[]`
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


def _image_from_text(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise JobError(f"{name} must be an uploaded file, a base64 string or a data URL", name, "invalid_type")
    return decode_base64_image(value, name)


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
