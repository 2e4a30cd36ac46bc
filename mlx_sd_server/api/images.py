"""POST /v1/images/generations and /v1/images/edits: request -> Job -> worker -> urls or base64."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

from PIL import Image
from quart import Blueprint, jsonify, request

from mlx_sd_server.api.parsing import Delivery, ParsedRequest, parse_request
from mlx_sd_server.api.state import ServerState, state
from mlx_sd_server.images import (
    a1111_parameters, encode_image, flatten, has_transparency, mask_from_upload,
    open_upload,
)
from mlx_sd_server.job import Job, JobError, build_job
from mlx_sd_server.registry import ModelInfo
from mlx_sd_server.store import StoredFile, StoreFullError

log = logging.getLogger("mlx_sd_server.api")

blueprint = Blueprint("images", __name__)


# --task: which task each endpoint is, for servers started for one of them only.
ENDPOINT_TASKS = {"/v1/images/generations": "text2image", "/v1/images/edits": "image2image"}


def _check_task() -> None:
    task = state().settings.task
    if task not in ("full", ENDPOINT_TASKS[request.path]):
        raise JobError(f"this server was started with --task {task}: {request.path} is turned off",
                       None, "task_disabled", 403)


@blueprint.post("/v1/images/generations")
async def generations():
    _check_task()
    return await _serve(await parse_request(request, ("control_image",)))


@blueprint.post("/v1/images/edits")
async def edits():
    _check_task()
    parsed = await parse_request(request, ("image", "mask", "control_image"))
    if "image" not in parsed.uploads:
        raise JobError("image is required: the image to edit", "image", "missing_required_parameter")
    return await _serve(parsed)


async def _serve(parsed: ParsedRequest):
    server = state()
    model = parsed.fields.get("model")
    if model is not None and not isinstance(model, str):
        raise JobError(f"model must be a string, got {type(model).__name__}", "model", "invalid_type")
    info = server.registry.resolve(model or None)
    job = await asyncio.to_thread(_build_job, parsed, info, server)  # decoding uploads is CPU work

    created = int(time.time())
    task = server.worker.submit(job, lambda images: _encode(images, job, info, parsed.delivery))
    try:
        encoded = await asyncio.wrap_future(task.future)
    except asyncio.CancelledError:  # the client went away: stop the job, deliver nothing
        task.cancel()
        log.info("client disconnected: cancelled task %d", task.id)
        raise

    extension = parsed.delivery.output_format
    images = list(zip(encoded, job.seeds()))
    if parsed.delivery.response_format == "b64_json":
        data = [{"prompt": job.prompt, "seed": seed, "b64_json": base64.b64encode(image_bytes).decode("ascii")}
                for image_bytes, seed in images]
    else:  # one batch: every image is kept, or none is
        stored = await _save_batch(server, [(image_bytes, f"image_{seed}.{extension}") for image_bytes, seed in images])
        prefix = _url_prefix(server)
        data = [{"prompt": job.prompt, "seed": seed, "url": f"{prefix}/v1/files/download/{item.id}/{item.filename}"}
                for item, (_, seed) in zip(stored, images)]
    return jsonify({"created": created, "data": data, "model": info.name, "output_format": extension})


async def _save_batch(server: ServerState, items: list[tuple[bytes, str]]) -> list[StoredFile]:
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
        raise JobError(f"{error.strerror}; free some disk space or delete files (DELETE /v1/files/{{id}})",
                       None, "insufficient_storage", 507) from None


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


def _build_job(parsed: ParsedRequest, info: ModelInfo, server: ServerState) -> Job:
    """Decode the uploads and validate everything into one Job (the pipeline fits images to its size)."""
    settings = server.settings
    uploads = {
        name: open_upload(data, name, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_upload_pixels,
                          max_aspect=settings.limits.max_upload_aspect)
        for name, data in parsed.uploads.items()
    }
    images: dict[str, Image.Image] = {name: flatten(image) for name, image in uploads.items() if name != "mask"}
    if "mask" in uploads:
        images["mask"] = mask_from_upload(uploads["mask"])
    elif "image" in uploads and has_transparency(uploads["image"]):
        images["mask"] = mask_from_upload(uploads["image"])  # OpenAI: no mask = the image's own transparency
    fields = {**parsed.fields, "model": info.name}
    return build_job(fields, images, limits=settings.limits, defaults=info.defaults,
                     capabilities=info.capabilities, model_name=info.name)


def _encode(images: list[Image.Image], job: Job, info: ModelInfo, delivery: Delivery) -> list[bytes]:
    """Runs on the worker thread, so encoding never blocks the event loop."""
    return [
        encode_image(image, delivery.output_format, quality=delivery.output_compression,
                     parameters=a1111_parameters(job, seed, info.name))
        for image, seed in zip(images, job.seeds())
    ]


def _url_prefix(server: ServerState) -> str:
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
