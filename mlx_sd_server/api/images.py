"""POST /v1/images/generations and /v1/images/edits: request -> Job -> worker -> urls or base64.

Every job is a task with an id (the client's `X-Request-Id`, else a generated one), answered in the
`X-Task-Id` header and the body's `task_id`; see api/tasks.py. With `stream: true` the answer is OpenAI's
image streaming: Server-Sent Events, `partial_images` (0-3) real decodes of the current latents at evenly
spaced steps, then one `*.completed` event per image carrying the same bytes a non-streamed request gets.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from PIL import Image
from quart import Blueprint, Response, jsonify, request

from mlx_sd_server.api.errors import ERROR_TYPES, MAX_MESSAGE, clip_message
from mlx_sd_server.api.parsing import Delivery, ParsedRequest, parse_request
from mlx_sd_server.api.state import ServerState, state
from mlx_sd_server.engine.sampling.samplers import Step
from mlx_sd_server.images import (
    PixelBudget,
    a1111_parameters,
    encode_image,
    flatten,
    has_transparency,
    mask_from_upload,
    model_hash,
    open_upload,
    short_sha256,
)
from mlx_sd_server.job import Job, JobError, as_str, build_job
from mlx_sd_server.lora.library import LoRALibrary
from mlx_sd_server.paths import without_paths
from mlx_sd_server.registry import ModelInfo, ModelLoadError, ModelNotFoundError
from mlx_sd_server.residency import ModelTooLargeError
from mlx_sd_server.store import StoredFile, StoreFullError
from mlx_sd_server.worker import JobCancelled, ServerStopping, TaskCancelled, valid_task_id

log = logging.getLogger("mlx_sd_server.api")

blueprint = Blueprint("images", __name__)


# --task: which task each endpoint is, for servers started for one of them only.
ENDPOINT_TASKS = {
    "/v1/images/generations": "text2image",
    "/v1/images/edits": "image2image",
    "/v1/images/variations": "image2image",
    "/sdapi/v1/txt2img": "text2image",
    "/sdapi/v1/img2img": "image2image",
}
# A variation (POST /v1/images/variations) on an img2img model: the image re-noised to this share of the
# schedule and denoised with the request's prompt, "" (the model's unconditional image) by default. 0.6
# keeps the composition and colours while the details change; the request's `strength` overrides it.
VARIATION_STRENGTH = 0.6
# ... and on an instruction-edit model (FLUX.2 klein, Kontext), the instruction unless the request gives one.
VARIATION_INSTRUCTION = (
    "Make a variation of this image: the same subject, style and composition, with different details"
)


def check_task() -> None:
    task = state().settings.task
    if task not in ("full", ENDPOINT_TASKS[request.path]):
        raise JobError(
            f"this server was started with --task {task}: {request.path} is turned off", None, "task_disabled", 403
        )


@blueprint.post("/v1/images/generations")
async def generations():
    check_task()
    return await _serve(await parse_request(request, ("control_image",)))


@blueprint.post("/v1/images/edits")
async def edits():
    check_task()
    parsed = await parse_request(request, ("image", "mask", "control_image"))
    if not parsed.uploads.get("image"):
        parsed.close()
        raise JobError("image is required: the image to edit", "image", "missing_required_parameter")
    return await _serve(parsed)


@blueprint.post("/v1/images/variations")
async def variations():
    """OpenAI's and the reference's variations (the reference parses the request and then crashes:
    llama-core's image_variation is unimplemented): one image, no prompt needed; see VARIATION_*."""
    check_task()
    parsed = await parse_request(request, ("image",))
    count = len(parsed.uploads.get("image", ()))
    if count != 1:
        parsed.close()
        if not count:
            raise JobError("image is required: the image to make variations of", "image", "missing_required_parameter")
        raise JobError(f"a variation is of one image, and this request has {count}", "image", "invalid_value")
    return await _serve(parsed, variation=True)


async def _serve(parsed: ParsedRequest, variation: bool = False):
    server = state()
    try:
        model = parsed.fields.get("model")
        if model is not None and not isinstance(model, str):
            raise JobError(f"model must be a string, got {type(model).__name__}", "model", "invalid_type")
        info = server.registry.resolve(model or None)
        job = await asyncio.to_thread(
            build_request_job, parsed, info, server, variation
        )  # decoding uploads is CPU work
    finally:
        parsed.close()  # the uploads are decoded (or refused): their spooled files go

    task_id = requested_task_id()
    created = int(time.time())
    if parsed.delivery.stream:
        return _stream(server, job, info, parsed.delivery, task_id, created)
    task = server.worker.submit(
        job, lambda images: encode_results(images, job, info, parsed.delivery, server.registry.loras), task_id=task_id
    )
    try:
        encoded = await asyncio.wrap_future(task.future)
    except asyncio.CancelledError:  # the client went away: stop the job, deliver nothing
        task.cancel()
        log.info("client disconnected: cancelled task %s", task.id)
        raise

    extension = parsed.delivery.output_format
    images = list(zip(encoded, job.seeds()))
    if parsed.delivery.response_format == "b64_json":
        data = [
            {"prompt": job.prompt, "seed": seed, "b64_json": base64.b64encode(image_bytes).decode("ascii")}
            for image_bytes, seed in images
        ]
    else:  # one batch: every image is kept, or none is
        stored = await save_batch(server, [(image_bytes, f"image_{seed}.{extension}") for image_bytes, seed in images])
        data = [
            {"prompt": job.prompt, "seed": seed, "url": file_url(server, item)}
            for item, (_, seed) in zip(stored, images)
        ]
    response = jsonify(
        {"created": created, "data": data, "model": info.name, "output_format": extension, "task_id": task.id}
    )
    response.headers["X-Task-Id"] = task.id
    return response


def requested_task_id() -> str | None:
    """The client's own task id (`X-Request-Id`), checked; None: the worker makes one."""
    value = request.headers.get("X-Request-Id")
    if value is None:
        return None
    if not valid_task_id(value):
        raise JobError(
            "X-Request-Id must be 1 to 64 characters: letters, digits and . _ ~ : - (not first)",
            "X-Request-Id",
            "invalid_request_id",
        )
    return value


# --- streaming -------------------------------------------------------------------------------------


def partial_steps(total: int, partials: int) -> list[int]:
    """After which steps (counted from 1) partial images are sent: evenly spaced, round(T*(i+1)/(k+1)),
    kept within 1..T; fewer than asked when the job has too few steps to space them."""
    return (
        sorted({min(max(round(total * (i + 1) / (partials + 1)), 1), total) for i in range(partials)}) if total else []
    )


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _error_envelope(error: BaseException | None) -> dict:
    """An exception raised after the stream started -> OpenAI's error envelope (the `error` event)."""
    if isinstance(error, JobError):
        status, message, param, code = error.status, error.message, error.param, error.code
    elif isinstance(error, TaskCancelled):
        status, message, param, code = 409, str(error), None, "task_cancelled"
    elif isinstance(error, ServerStopping):
        status, message, param, code = 503, str(error), None, "server_shutting_down"
    elif isinstance(error, JobCancelled) or error is None:
        status, message, param, code = 503, "the job was cancelled before it finished", None, "job_cancelled"
    elif isinstance(error, ModelNotFoundError):
        status, message, param, code = 404, str(error), "model", "model_not_found"
    elif isinstance(error, ModelTooLargeError):
        status, message, param, code = 507, str(error), "model", "model_too_large"
    elif isinstance(error, ModelLoadError):
        status, message, param, code = 503, without_paths(str(error)), "model", "model_unavailable"
    else:
        status, message, param, code = (
            500,
            "internal server error (details are in the server log)",
            None,
            "internal_error",
        )
    return {
        "error": {
            "message": clip_message(message, MAX_MESSAGE),
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def _stream(
    server: ServerState, job: Job, info: ModelInfo, delivery: Delivery, task_id: str | None, created: int
) -> Response:
    """Submit the job and answer with its events as they come. Partial images are decoded and encoded
    on the worker thread (the task's step callback) and handed to the event loop; a client that goes
    away cancels the task."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    kind = "image_generation" if request.path.endswith("/generations") else "image_edit"
    common = {
        "created_at": created,
        "size": f"{job.width}x{job.height}",
        "quality": "auto",
        "background": "opaque",
        "output_format": delivery.output_format,
    }

    def post(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(events.put_nowait, item)

    marks: list[int] = []

    def on_step(step: Step, pipeline: Any) -> None:  # the worker thread
        if not marks and delivery.partial_images:
            marks.extend(partial_steps(pipeline.total_steps(job), delivery.partial_images) or [0])
        if step.index + 1 not in marks or step.denoised is None or not hasattr(pipeline, "decode_latents"):
            return
        index = marks.index(step.index + 1)
        for image_index, image in enumerate(pipeline.decode_latents(step.denoised)):
            data = encode_image(image, delivery.output_format, quality=delivery.output_compression)
            post(("partial", index, image_index, data))

    task = server.worker.submit(
        job,
        lambda images: encode_results(images, job, info, delivery, server.registry.loras),
        task_id=task_id,
        on_step=on_step if delivery.partial_images else None,
    )
    task.future.add_done_callback(lambda future: post(("end", future)))

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                item = await events.get()
                if item[0] == "partial":
                    _, index, image_index, data = item
                    yield _sse(
                        f"{kind}.partial_image",
                        {
                            "type": f"{kind}.partial_image",
                            "b64_json": base64.b64encode(data).decode("ascii"),
                            **common,
                            "partial_image_index": index,
                            "image_index": image_index,
                        },
                    )
                    continue
                future: concurrent.futures.Future = item[1]
                error = JobCancelled() if future.cancelled() else future.exception()
                if error is not None:
                    yield _sse("error", _error_envelope(error))
                    return
                for image_index, (data, seed) in enumerate(zip(future.result(), job.seeds())):
                    yield _sse(
                        f"{kind}.completed",
                        {
                            "type": f"{kind}.completed",
                            "b64_json": base64.b64encode(data).decode("ascii"),
                            **common,
                            "usage": USAGE,
                            "image_index": image_index,
                            "seed": seed,
                            "task_id": task.id,
                        },
                    )
                return
        finally:
            if not task.future.done():  # the client went away (or the server is closing the stream)
                task.cancel()
                log.info("client disconnected: cancelled streamed task %s", task.id)

    response = Response(
        body(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Task-Id": task.id, "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # a stream lasts as long as its job, not Quart's RESPONSE_TIMEOUT
    return response


# Token usage: OpenAI reports it for its GPT image models; a local server has none to count.
USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


async def save_batch(server: ServerState, items: list[tuple[bytes, str]]) -> list[StoredFile]:
    """Save the request's images all-or-nothing, off the event loop. A full disk is a 507 with nothing
    kept; a client gone while saving gets nothing, and nothing is kept for it either."""
    saving = asyncio.ensure_future(asyncio.to_thread(server.store.save_batch, items))
    try:
        return await asyncio.shield(saving)
    except asyncio.CancelledError:
        saving.add_done_callback(lambda done: _discard(server, done))
        raise
    except StoreFullError as error:
        log.error("%s", error.strerror)
        raise JobError(
            f"{error.strerror}; free some disk space or delete files (DELETE /v1/files/{{id}})",
            None,
            "insufficient_storage",
            507,
        ) from None


def _discard(server: ServerState, done: asyncio.Future) -> None:
    """A batch saved for a client that went away: nobody has its urls, so remove it (in a thread)."""
    if done.cancelled() or done.exception() is not None:
        return
    ids = [item.id for item in done.result()]

    def remove() -> None:
        for file_id in ids:
            try:
                server.store.delete(file_id)
            except OSError:
                log.warning("could not remove undelivered file %s", file_id)

    asyncio.get_running_loop().run_in_executor(None, remove)


def build_request_job(
    parsed: ParsedRequest,
    info: ModelInfo,
    server: ServerState,
    variation: bool = False,
    *,
    optional: Collection[str] = (),
    mask_reader: Callable[[Image.Image], Image.Image] = mask_from_upload,
    mask_from_transparency: bool = True,
) -> Job:
    """Decode the uploads, in order and within the request's pixel budget, and validate everything into one
    Job (the pipeline fits images to its size); a variation's fields completed by `variation_fields`.
    `optional`: required fields this route lets be absent (build_job's); `mask_reader` reads the uploaded mask
    (OpenAI's convention by default); `mask_from_transparency`: an edit without a mask inpaints its image's
    transparent pixels (OpenAI's convention, see transparency_is_mask)."""
    settings = server.settings
    budget = PixelBudget(settings.max_upload_pixels_total)
    hashes: list[tuple[str, str]] = []
    uploads: dict[str, list[Image.Image]] = {}
    for name, items in parsed.uploads.items():
        uploads[name] = []
        for index, data in enumerate(items):
            uploads[name].append(
                open_upload(
                    data,
                    name,
                    max_bytes=settings.max_upload_bytes,
                    max_pixels=settings.max_upload_pixels,
                    max_aspect=settings.limits.max_upload_aspect,
                    budget=budget,
                    label=f"{name} {index + 1}" if len(items) > 1 else name,
                )
            )
            hashes.append((name, short_sha256(data)))  # of the bytes sent: what `sha256sum` of the file says
    images: dict[str, Image.Image | list[Image.Image]] = {
        name: [flatten(image) for image in decoded] if name == "image" else flatten(decoded[0])
        for name, decoded in uploads.items()
        if name != "mask"
    }
    if "mask" in uploads:
        images["mask"] = mask_reader(uploads["mask"][0])
    elif (
        mask_from_transparency
        and len(uploads.get("image", ())) == 1
        and transparency_is_mask(info)
        and has_transparency(uploads["image"][0])
    ):
        images["mask"] = mask_from_upload(uploads["image"][0])  # OpenAI: no mask = the image's own transparency
    fields = {**parsed.fields, "model": info.name}
    if variation:
        fields = variation_fields(fields, info)
    capabilities = info.capabilities
    if fields.get("control_net") not in (None, ""):  # a ControlNet by name: it must exist and fit the model
        requested = as_str("control_net", fields["control_net"]).strip()
        fields["control_net"] = server.registry.controlnet_for(info, requested)
        capabilities = dataclasses.replace(capabilities, controlnet=True)
    return build_job(
        fields,
        images,
        limits=settings.limits,
        defaults=info.defaults,
        capabilities=capabilities,
        model_name=info.name,
        lora_family=server.registry.loras.family,
        input_hashes=hashes,
        optional=("prompt", *optional) if variation else optional,
        upscalers=server.registry.upscalers.names(),
    )


def variation_fields(fields: dict[str, Any], info: ModelInfo) -> dict[str, Any]:
    """A variation's request as an edit of its one image: an img2img at VARIATION_STRENGTH with the prompt
    given or "", or on an instruction-edit model the instruction given or VARIATION_INSTRUCTION."""
    capabilities = info.capabilities
    if capabilities.mask_required or not (capabilities.img2img or capabilities.references):
        raise JobError(
            f"{info.name} ({capabilities.family}) cannot make variations: it has no image-to-image "
            + ("(it only inpaints, with a mask: use /v1/images/edits)" if capabilities.mask_required else "mode"),
            "model",
            "unsupported_parameter",
        )
    prompt = fields.get("prompt")
    blank = prompt is None or (isinstance(prompt, str) and not prompt.strip())
    if capabilities.references:
        return {**fields, "prompt": VARIATION_INSTRUCTION if blank else prompt}
    return {"strength": VARIATION_STRENGTH, **fields, "prompt": "" if blank else prompt}


def transparency_is_mask(info: ModelInfo) -> bool:
    """Whether an edit without a mask inpaints its image's transparent pixels (OpenAI's convention for
    DALL-E 2): on img2img models. An instruction-edit model reads a transparent image as a reference (a
    cut-out product shot), and inpaints only with a mask."""
    return not info.capabilities.references


def encode_results(
    images: list[Image.Image], job: Job, info: ModelInfo, delivery: Delivery, loras: LoRALibrary
) -> list[bytes]:
    """Runs on the worker thread, so encoding never blocks the event loop."""
    return [
        encode_image(
            image,
            delivery.output_format,
            quality=delivery.output_compression,
            parameters=result_parameters(job, seed, info, loras),
        )
        for image, seed in zip(images, job.seeds())
    ]


def result_parameters(job: Job, seed: int, info: ModelInfo, loras: LoRALibrary) -> str:
    """The A1111 `parameters` text an image of `job` made with `seed` carries (reads the LoRAs' hashes)."""
    lora_hashes = {name: loras.short_hash(name) for name, _ in job.loras}
    return a1111_parameters(job, seed, info.name, model_hash=model_hash(info.folder), lora_hashes=lora_hashes)


def file_url(server: ServerState, stored: StoredFile) -> str:
    """A stored image's url: the store's own (a presigned S3 url, --store-urls presigned), else our download."""
    return server.store.download_url(stored) or f"{url_prefix(server)}/v1/files/download/{stored.id}/{stored.filename}"


def url_prefix(server: ServerState) -> str:
    """Where image urls point: --download-url-prefix, else the address the server is bound to, else the
    address this connection was accepted on. Never the request's Host header (a client could make the
    urls point anywhere)."""
    settings = server.settings
    prefix = settings.download_url_prefix or getattr(settings, "bound_url", None)
    if not prefix:
        scheme = "https" if request.scope.get("scheme") in ("https", "wss") else "http"
        host, port = (request.scope.get("server") or ("127.0.0.1", None))[:2]
        if host in (None, "", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        prefix = f"{scheme}://{host}" + (f":{port}" if port else "")
    return prefix.rstrip("/")
