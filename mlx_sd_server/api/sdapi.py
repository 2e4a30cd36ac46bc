"""AUTOMATIC1111's web API, /sdapi/v1/*, for the clients that speak it (SillyTavern, Open WebUI's
"Automatic1111" engine, Krita's plugins, scripts).

txt2img and img2img become our Jobs (api/a1111.py translates) and run through the same job building,
validation, limits, queue, worker and store as /v1/images/*: `n_iter` batches are jobs of one task, run one
after the other on one loaded model, seeds going on over all images (seed + i) as A1111's do. The answer is
A1111's `{images, parameters, info}`. Around them: sd-models, sd-vae, samplers, schedulers, loras, upscalers,
latent-upscale-modes, options (POST sd_model_checkpoint switches the server's default model), progress (with
a preview of the running job, decoded on the worker thread when asked), interrupt (the running A1111 job ends
after its current step and answers with that step decoded, as A1111 does), skip (the current batch ends so,
the next runs), png-info and extra-single-image (an upscale).

Errors: A1111's clients read `detail` from an error's JSON (FastAPI's HTTPException shape), ours read OpenAI's
`error` envelope. One shape serves both: ours, with `detail` added (the message) on every /sdapi/ error, so a
client of either kind finds what it looks for and our tests and logs see one format.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from typing import Any

from quart import Blueprint, Response, current_app, jsonify, request

from mlx_sd_server.api import a1111
from mlx_sd_server.api.images import (
    build_request_job,
    check_task,
    file_url,
    requested_task_id,
    result_parameters,
    save_batch,
)
from mlx_sd_server.api.parsing import Delivery, ParsedRequest, close_all, read_body, upload_of
from mlx_sd_server.api.state import ServerState, state
from mlx_sd_server.api.upscale import upscale_image
from mlx_sd_server.images import encode_image, flatten, model_hash, open_upload
from mlx_sd_server.job import JobError, Limits, as_bool, shown
from mlx_sd_server.job.fields import MAX_SEED
from mlx_sd_server.registry import ModelInfo
from mlx_sd_server.worker import Task, Worker, valid_task_id

log = logging.getLogger("mlx_sd_server.api")

blueprint = Blueprint("sdapi", __name__)


def _ours() -> set[str]:
    """The ids of the live tasks /sdapi started: those interrupt and skip may stop."""
    return current_app.extensions.setdefault("mlx_sd_server.sdapi_tasks", set())


def _limits(server: ServerState) -> Limits:
    limits = server.settings.limits
    return dataclasses.replace(limits, max_fields=max(limits.max_fields, a1111.MAX_FIELDS))


async def _read(server: ServerState, image_fields: tuple[str, ...] = (), structured: tuple[str, ...] = ()) -> dict:
    return await read_body(
        request,
        image_fields,
        _limits(server),
        server.settings.max_upload_pixels,
        structured=structured,
        image_lists=a1111.IMAGE_LISTS,
        json_only=True,
    )


@blueprint.after_app_request
async def add_detail(response: Response) -> Response:
    """An /sdapi/ error answered in our envelope gets A1111's `detail` too (see the module's docstring)."""
    if not request.path.startswith("/sdapi/") or response.status_code < 400 or response.mimetype != "application/json":
        return response
    try:
        body = json.loads(await response.get_data())
    except ValueError:
        return response
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "detail" not in body:
        body["detail"] = body["error"].get("message")
        response.set_data(json.dumps(body))
    return response


# --- txt2img, img2img ------------------------------------------------------------------------------------


@blueprint.post("/sdapi/v1/txt2img")
async def txt2img():
    check_task()
    return await _generate("txt2img")


@blueprint.post("/sdapi/v1/img2img")
async def img2img():
    check_task()
    return await _generate("img2img")


async def _generate(mode: str):
    server = state()
    started = time.time()
    raw = await _read(server, a1111.IMAGE_FIELDS[mode], a1111.STRUCTURED)
    images = {name: raw.pop(name) for name in a1111.IMAGE_FIELDS[mode] if name in raw}
    parsed = ParsedRequest()
    try:
        requested = a1111.requested_model(raw)
        info = server.registry.info(requested) if requested else server.registry.resolve(None)
        options = a1111.options(server.registry.default_name, Worker.PREVIEW_EVERY)
        hires = as_bool("enable_hr", raw.get("enable_hr") or False)
        upscalers = await asyncio.to_thread(server.registry.upscalers.names) if hires else []
        translated = a1111.translate(mode, raw, info, options, upscalers, images.get("mask") not in (None, ""))
        parsed = ParsedRequest(
            fields=translated.fields,
            uploads=_uploads(server, images, mode),
            delivery=Delivery(response_format="b64_json", output_format=translated.output_format),
        )
        job = await asyncio.to_thread(
            build_request_job,
            parsed,
            info,
            server,
            optional=("prompt",),
            mask_reader=a1111.mask_reader(translated.invert_mask),
            mask_from_transparency=False,
        )
    finally:
        parsed.close()
        close_all(images)
    if translated.stretch:
        job = a1111.stretched(job)
    a1111.check_hires_size(job, translated.hr_size)
    limits = server.settings.limits
    if translated.n_iter > limits.max_n:
        raise JobError(f"n_iter must be at most {limits.max_n}, got {translated.n_iter}", "n_iter", "out_of_range")
    jobs = [job] + [
        dataclasses.replace(job, seed=(job.seed + k * job.n) % (MAX_SEED + 1)) for k in range(1, translated.n_iter)
    ]
    made = [(each, seed) for each in jobs for seed in each.seeds()]
    loras = server.registry.loras

    def finish(images: list) -> list[tuple[bytes, str, int]]:  # on the worker thread
        out = []
        for image, (each, seed) in zip(images, made):
            text = result_parameters(each, seed, info, loras)
            out.append((encode_image(image, translated.output_format, parameters=text), text, seed))
        return out

    task = server.worker.submit(jobs, finish, task_id=_task_id(translated.task_id))
    ours = _ours()
    ours.add(task.id)
    try:
        results = await asyncio.wrap_future(task.future)
    except asyncio.CancelledError:  # the client went away: stop the job, deliver nothing
        task.cancel()
        log.info("client disconnected: cancelled task %s", task.id)
        raise
    finally:
        ours.discard(task.id)
    saved: list[str] = []
    if translated.save_images and results:
        extension = translated.output_format
        stored = await save_batch(server, [(data, f"image_{seed}.{extension}") for data, _, seed in results])
        saved = [file_url(server, item) for item in stored]
    if requested and translated.keep_overrides:
        _set_default(server, info.name)  # A1111 keeps the override: the model stays the default
    hashed = await asyncio.to_thread(model_hash, info.folder)
    parameters = a1111.echo(translated, job)
    if images and as_bool("include_init_images", raw.get("include_init_images") or False):
        parameters.update(_image_texts(images))
    response = jsonify(
        {
            "images": [base64.b64encode(data).decode("ascii") for data, _, _ in results]
            if translated.send_images
            else [],
            "parameters": parameters,
            "info": a1111.info_text(
                translated,
                jobs,
                [seed for _, _, seed in results],
                [text for _, text, _ in results],
                info,
                hashed,
                started,
                saved,
            ),
        }
    )
    response.headers["X-Task-Id"] = task.id
    return response


def _uploads(server: ServerState, images: dict[str, Any], mode: str) -> dict[str, list]:
    """init_images (one) and mask -> our uploads: `image` and `mask`."""
    if mode != "img2img":
        return {}
    limits, max_pixels = _limits(server), server.settings.max_upload_pixels
    init = images.get("init_images")
    items = init if isinstance(init, list) else [] if init in (None, "") else [init]
    if len(items) != 1:
        raise JobError(
            "init_images must hold one image" + (f", not {len(items)}: one is used for every image" if items else ""),
            "init_images",
            "missing_required_parameter" if not items else "invalid_value",
        )
    uploads = {"image": [upload_of("init_images", items[0], limits, max_pixels, "init_images")]}
    if images.get("mask") not in (None, ""):
        uploads["mask"] = [upload_of("mask", images["mask"], limits, max_pixels, "mask")]
    return uploads


def _image_texts(images: dict[str, Any]) -> dict[str, Any]:
    """include_init_images: the images as sent (base64 text), for the echo."""

    def text(value: Any) -> Any:
        if isinstance(value, list):
            return [text(item) for item in value]
        return bytes(value).decode("ascii", "replace") if isinstance(value, (bytes, memoryview)) else value

    return {name: text(value) for name, value in images.items()}


def _task_id(forced: str | None) -> str | None:
    """force_task_id (A1111's), else X-Request-Id: the task's id."""
    if forced is None:
        return requested_task_id()
    if not valid_task_id(forced):
        raise JobError(
            "force_task_id must be 1 to 64 characters: letters, digits and . _ ~ : - (not first)",
            "force_task_id",
            "invalid_request_id",
        )
    return forced


def _set_default(server: ServerState, name: str) -> None:
    if server.registry.default_name != name:
        log.info("default model: %s (set through /sdapi/v1)", name)
    server.registry.set_default(name)


# --- progress, interrupt, skip ------------------------------------------------------------------------------

IDLE_STATE = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}


@blueprint.get("/sdapi/v1/progress")
async def progress():
    """A1111's progress of the running job (any: ours too), with `current_image`: a preview of its current
    step, asked for here and made on the worker thread after a following step (at most every PREVIEW_EVERY)."""
    skip_image = as_bool("skip_current_image", request.args.get("skip_current_image", "false"))
    task = state().worker.running()
    if task is None or task.work is not None:
        return jsonify({"progress": 0, "eta_relative": 0, "state": IDLE_STATE, "current_image": None, "textinfo": None})
    totals = task.step_totals or [task.total_steps or 0]
    job_no, step = 0, task.steps_done
    while job_no < len(totals) - 1 and step > totals[job_no]:
        step -= totals[job_no]
        job_no += 1
    steps = totals[job_no]
    done = 0.01 + (job_no + (step / steps if steps else 0)) / len(totals)
    eta = task.describe().get("eta_seconds")
    if eta is None:  # nothing measured yet: A1111's own estimate, from the time so far
        elapsed = time.monotonic() - (task.started or time.monotonic())
        eta = elapsed / done - elapsed
    if not skip_image:
        task.request_preview()
    current_image = None
    if task.preview is not None and not skip_image:
        data = await asyncio.to_thread(encode_image, task.preview, "png")
        current_image = base64.b64encode(data).decode("ascii")
    run_state = {
        "skipped": task.skip_requested,
        "interrupted": task.interrupted,
        "stopping_generation": False,
        "job": f"Batch {job_no + 1} out of {len(totals)}",
        "job_count": len(totals),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.started_at or time.time())),
        "job_no": job_no,
        "sampling_step": step,
        "sampling_steps": steps,
    }
    return jsonify(
        {
            "progress": min(done, 1.0),
            "eta_relative": max(float(eta), 0.0),
            "state": run_state,
            "current_image": current_image,
            "textinfo": None,
        }
    )


def _running_ours() -> Task | None:
    task = state().worker.running()
    return task if task is not None and task.id in _ours() else None


@blueprint.post("/sdapi/v1/interrupt")
async def interrupt():
    """The running /sdapi job stops after its current step and answers with it decoded (a /v1 job is not
    stopped: its client has the tasks API)."""
    task = _running_ours()
    if task is not None:
        task.interrupt()
        log.info("task %s interrupted through /sdapi/v1/interrupt", task.id)
    return jsonify({})


@blueprint.post("/sdapi/v1/skip")
async def skip():
    """The running /sdapi job's current batch ends after its current step (decoded); the next one runs."""
    task = _running_ours()
    if task is not None:
        task.skip()
    return jsonify(None)


# --- what there is ---------------------------------------------------------------------------------------


@blueprint.get("/sdapi/v1/sd-models")
async def sd_models():
    registry = state().registry

    def listing() -> list[dict[str, Any]]:
        out = []
        for name in registry.names():
            info: ModelInfo = registry.info(name)
            out.append(
                {
                    "title": name,  # what sd_model_checkpoint takes, and options report
                    "model_name": name,
                    "hash": model_hash(info.folder),
                    "sha256": None,
                    "filename": name,  # (no server path)
                    "config": None,
                }
            )
        return out

    return jsonify(await asyncio.to_thread(listing))


@blueprint.get("/sdapi/v1/sd-vae")
async def sd_vae():
    """A model's VAE is its own here: no others to choose."""
    return jsonify([])


@blueprint.get("/sdapi/v1/samplers")
async def samplers():
    return jsonify(a1111.sampler_list())


@blueprint.get("/sdapi/v1/schedulers")
async def schedulers():
    return jsonify(a1111.scheduler_list())


@blueprint.get("/sdapi/v1/loras")
async def loras():
    """The LoRAs `<lora:name:weight>` tags may name, in the shape of A1111's Lora extension's list."""
    available = await asyncio.to_thread(state().registry.loras.available)
    return jsonify(
        [
            {"name": lora.name, "alias": lora.name, "path": f"{lora.name}.safetensors", "metadata": {}}
            for lora in available
        ]
    )


@blueprint.get("/sdapi/v1/upscalers")
async def upscalers():
    library = state().registry.upscalers

    def listing() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        ]
        for name in library.names():
            info = library.info(name)
            out.append(
                {
                    "name": a1111.a1111_upscaler(name),
                    "model_name": None if info.folder is None else name,
                    "model_path": None,
                    "model_url": None,
                    "scale": info.scale,
                }
            )
        return out

    return jsonify(await asyncio.to_thread(listing))


@blueprint.get("/sdapi/v1/latent-upscale-modes")
async def latent_upscale_modes():
    return jsonify([{"name": name} for name in a1111.LATENT_MODES])


@blueprint.get("/sdapi/v1/options")
async def get_options():
    return jsonify(a1111.options(state().registry.default_name, Worker.PREVIEW_EVERY))


@blueprint.post("/sdapi/v1/options")
async def set_options():
    """sd_model_checkpoint switches the server's default model; any other option is accepted only with the
    value it has here (a client posting back what it read), else refused naming it."""
    server = state()
    raw = await _read(server)
    current = a1111.options(server.registry.default_name, Worker.PREVIEW_EVERY)
    model = None
    for key, value in raw.items():
        if key == "sd_model_checkpoint":
            model = server.registry.info(a1111.checkpoint_name(value, key)).name  # 404 for none of that name
        else:
            a1111.check_option(key, value, current, key)
    if model is not None:
        _set_default(server, model)
    return jsonify(None)


# --- png-info, extra-single-image ------------------------------------------------------------------------


def _one_image(server: ServerState, raw: dict[str, Any], name: str) -> Any:
    value = raw.pop(name, None)
    if value in (None, ""):
        raise JobError(f"{name} is required: a base64 image", name, "missing_required_parameter")
    upload = upload_of(name, value, _limits(server), server.settings.max_upload_pixels, name)
    settings = server.settings
    try:
        return open_upload(
            upload,
            name,
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_upload_pixels,
            max_aspect=settings.limits.max_upload_aspect,
        )
    finally:
        close_all(upload)


@blueprint.post("/sdapi/v1/png-info")
async def png_info():
    """The A1111 `parameters` an image carries (a PNG's text, a JPEG's or WebP's EXIF comment), parsed as A1111
    parses it, and the image's other info items."""
    server = state()
    raw = await _read(server, ("image",))
    image = await asyncio.to_thread(_one_image, server, raw, "image")
    if unknown := sorted(raw):
        raise JobError(f"unknown field {shown(unknown[0])}", unknown[0], "unknown_field")
    text, items = a1111.read_image_info(image)
    return jsonify({"info": text or "", "items": items, "parameters": a1111.parse_infotext(text or "")})


@blueprint.post("/sdapi/v1/extra-single-image")
async def extra_single_image():
    """An upscale, as A1111's extras tab makes it: by upscaling_resize, or (resize_mode 1) to cover
    upscaling_resize_w x _h, cropped to it (centred) unless upscaling_crop is false."""
    server = state()
    raw = await _read(server, ("image",))
    image = await asyncio.to_thread(_one_image, server, raw, "image")
    extras = a1111.extras_request(raw, await asyncio.to_thread(server.registry.upscalers.names))
    await asyncio.to_thread(server.registry.upscalers.info, extras.upscaler)  # 404 when there is none
    parameters = a1111.read_image_info(image)[0]
    source = flatten(image)
    if extras.scale is not None:
        scale = extras.scale
        param = "upscaling_resize"
    else:
        scale = max(extras.size[0] / source.width, extras.size[1] / source.height)
        param = "upscaling_resize_w"
    enlarged = await upscale_image(server, source, extras.upscaler, scale, param)
    if extras.scale is None and extras.crop and enlarged.size != extras.size:
        left, top = (enlarged.width - extras.size[0]) // 2, (enlarged.height - extras.size[1]) // 2
        enlarged = enlarged.crop((left, top, left + extras.size[0], top + extras.size[1]))
    data = await asyncio.to_thread(encode_image, enlarged, "png", parameters=parameters)
    return jsonify({"html_info": a1111.extras_info(extras, scale), "image": base64.b64encode(data).decode("ascii")})
