"""POST /v1/images/upscale: an image enlarged by one of the server's upscalers, answered as our other image
routes answer (OpenAI's `{created, data: [{url | b64_json}]}`).

The body is JSON or a form as for /v1/images/edits: `image`, `upscaler` (GET /v1/upscalers lists them),
`scale` (default: the upscaler's own; the built-in resamplers, which have none, DEFAULT_SCALE), and the
delivery fields `response_format`, `output_format`, `output_compression`. The upscale runs on the worker
thread as a task of the queue (429 when it is full), and its output is at most the server's `max_side`
pixels a side (4096 by default, so at most 4096x4096): the tiled upscalers bound their memory, and the
output image (3 bytes a pixel) and its encoding are what is left. The source's A1111 `parameters` text, if
it has one, is carried over, as A1111's extras tab keeps it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from PIL import Image
from quart import Blueprint, jsonify, request

from mlx_sd_server.api.a1111 import read_image_info
from mlx_sd_server.api.images import file_url, requested_task_id, save_batch
from mlx_sd_server.api.parsing import parse_request
from mlx_sd_server.api.state import ServerState, state
from mlx_sd_server.images import encode_image, flatten, open_upload
from mlx_sd_server.job import Job, JobError, as_float, as_str, shown

blueprint = Blueprint("upscale", __name__)

UPSCALE_FIELDS = ("upscaler", "scale")
DEFAULT_SCALE = 2.0  # a built-in resampler's (lanczos, nearest): A1111's extras tab's default factor


@blueprint.post("/v1/images/upscale")
async def upscale():
    server = state()
    parsed = await parse_request(request, ("image",), fields=UPSCALE_FIELDS)
    try:
        if parsed.delivery.stream:
            raise JobError("an upscale is not streamed: send stream false", "stream", "unsupported_parameter")
        uploads = parsed.uploads.get("image", [])
        if len(uploads) != 1:
            raise JobError("image is required: one image to upscale", "image", "missing_required_parameter")
        if parsed.fields.get("upscaler") in (None, ""):
            raise JobError(
                "upscaler is required (GET /v1/upscalers lists them)", "upscaler", "missing_required_parameter"
            )
        name = as_str("upscaler", parsed.fields["upscaler"]).strip()
        upscaler = await asyncio.to_thread(server.registry.upscalers.info, name)  # 404 when there is none
        scale = parsed.fields.get("scale")
        factor = as_float("scale", scale) if scale not in (None, "") else float(upscaler.scale)
        if scale in (None, "") and factor <= 1:
            factor = DEFAULT_SCALE
        image, parameters = await asyncio.to_thread(_open, server, uploads[0])
    finally:
        parsed.close()
    enlarged = await upscale_image(server, image, upscaler.name, factor, "scale")
    delivery = parsed.delivery
    data = await asyncio.to_thread(
        encode_image, enlarged, delivery.output_format, quality=delivery.output_compression, parameters=parameters
    )
    item: dict[str, Any]
    if delivery.response_format == "b64_json":
        item = {"b64_json": base64.b64encode(data).decode("ascii")}
    else:
        (stored,) = await save_batch(server, [(data, f"upscaled_{upscaler.name}.{delivery.output_format}")])
        item = {"url": file_url(server, stored)}
    item.update({"upscaler": upscaler.name, "scale": factor, "size": f"{enlarged.width}x{enlarged.height}"})
    return jsonify({"created": int(time.time()), "data": [item], "output_format": delivery.output_format})


def _open(server: ServerState, upload: Any) -> tuple[Image.Image, str | None]:
    """The upload decoded (within the upload limits), flattened to RGB, and its A1111 parameters text."""
    settings = server.settings
    image = open_upload(
        upload,
        "image",
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_upload_pixels,
        max_aspect=settings.limits.max_upload_aspect,
    )
    return flatten(image), read_image_info(image)[0]


def output_size(image: Image.Image, scale: float, param: str, max_side: int) -> tuple[int, int]:
    """The size `scale` makes of `image` (as the upscalers round it), refused beyond `max_side` a side."""
    if not scale > 0:
        raise JobError(f"{param} must be above 0, got {shown(scale)}", param, "out_of_range")
    width, height = round(image.width * scale), round(image.height * scale)
    if min(width, height) < 1 or max(width, height) > max_side:
        raise JobError(
            f"{param} {scale:g} makes {image.width}x{image.height} into {width}x{height}: each side must be 1 to "
            f"{max_side} pixels (this server's limit)",
            param,
            "image_too_large" if max(width, height) > max_side else "out_of_range",
        )
    return width, height


async def upscale_image(
    server: ServerState, image: Image.Image, upscaler: str, scale: float, param: str
) -> Image.Image:
    """`image` enlarged `scale` times by `upscaler`, on the worker thread as a task of the queue (429 when it
    is full); the output within `max_side`. A client that goes away cancels it while it waits."""
    width, height = output_size(image, scale, param, server.settings.limits.max_side)
    job = Job(prompt="", model=None, width=width, height=height, steps=1)  # how the task list shows it
    what = f"upscale {upscaler} {image.width}x{image.height} -> {width}x{height}"
    task = server.worker.submit_work(
        lambda: server.registry.upscalers.upscale(upscaler, image, scale), job, what, task_id=requested_task_id()
    )
    try:
        result: Image.Image = await asyncio.wrap_future(task.future)
    except asyncio.CancelledError:
        task.cancel()
        raise
    return result
