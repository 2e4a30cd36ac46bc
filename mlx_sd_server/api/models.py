"""The models and what is in memory: GET /v1/models (OpenAI's list shape), GET /v1/models/{id}, POST
/v1/models/{id}/load and /unload, GET /v1/controlnets, GET /v1/loras, GET /v1/upscalers.

Loading and unloading run on the worker thread (`Worker.call`), between jobs: MLX work stays on one thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from typing import Any

from quart import Blueprint, jsonify, request

from mlx_sd_server.api.errors import APIError
from mlx_sd_server.api.state import state
from mlx_sd_server.job.fields import as_keep_alive
from mlx_sd_server.registry import ModelRegistry, disk_size

blueprint = Blueprint("models", __name__)


def keep_alive_seconds(seconds: float) -> float:
    """A keep-alive as JSON has it: -1 for "kept until unloaded"."""
    return -1 if math.isinf(seconds) else seconds


def model_object(registry: ModelRegistry, name: str) -> dict[str, Any]:
    """One model as the API shows it (reads its folder's size: call off the event loop)."""
    info = registry.info(name)
    capabilities = info.capabilities
    status = registry.status(info.name)
    text_length = capabilities.text_length
    return {
        "id": info.name,
        "object": "model",
        "created": info.created,
        "owned_by": "mlx-sd-server",
        "family": info.family,
        "default": info.name == registry.default_name,
        "loaded": status.loaded,
        "size_bytes": registry.size_bytes(info.name),
        "memory_bytes": status.memory_bytes,
        "expires_at": None if status.expires_at is None else int(status.expires_at),
        "keep_alive": None if status.keep_alive is None else keep_alive_seconds(status.keep_alive),
        "capabilities": dataclasses.asdict(capabilities),
        "defaults": dataclasses.asdict(info.defaults),  # width x height: the area of size "auto"
        # what the playground reads: a model with T5 (its default and most max_sequence_length), its ControlNet,
        # its edits (instruction edits of up to `references` images; inpainting; img2img)
        "has_controlnet": info.has_controlnet,
        "max_sequence_length": None if text_length is None else dataclasses.asdict(text_length),
        "references": capabilities.references,
        "inpainting": capabilities.inpainting,
        "img2img": capabilities.img2img,
    }


@blueprint.get("/v1/models")
async def list_models():
    registry = state().registry

    def listing() -> list[dict[str, Any]]:
        return [model_object(registry, name) for name in registry.names()]

    data = await asyncio.to_thread(listing)
    return jsonify({"object": "list", "data": data, "memory": registry.memory()})


@blueprint.get("/v1/models/<path:model_id>")
async def get_model(model_id: str):
    registry = state().registry
    return jsonify(await asyncio.to_thread(model_object, registry, model_id))


async def _keep_alive_field() -> float | None:
    """The load request's optional `{"keep_alive": ...}` (null: the server's); anything else in the body is a 400."""
    data = await request.get_data()
    if not data.strip():
        return None
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # (a typo must not load with the default keep-alive)
        raise APIError(
            400, 'the body is not valid JSON: send {"keep_alive": ...} or nothing', code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, 'the body must be a JSON object: {"keep_alive": ...}', code="invalid_type")
    if unknown := sorted(set(body) - {"keep_alive"}):
        raise APIError(
            400,
            f"unknown field {unknown[0][:64]!r} (the body takes keep_alive)",
            param=unknown[0][:64],
            code="unknown_field",
        )
    return None if body.get("keep_alive") is None else as_keep_alive("keep_alive", body["keep_alive"])


@blueprint.post("/v1/models/<path:model_id>/load")
async def load_model(model_id: str):
    server = state()
    keep_alive = await _keep_alive_field()
    name = server.registry.info(model_id).name  # 404 / 409 now, not from the worker
    await asyncio.wrap_future(server.worker.call(lambda: server.registry.load(name, keep_alive)))
    return jsonify(await asyncio.to_thread(model_object, server.registry, name))


@blueprint.post("/v1/models/<path:model_id>/unload")
async def unload_model(model_id: str):
    server = state()
    name = server.registry.info(model_id).name
    unloaded = await asyncio.wrap_future(server.worker.call(lambda: server.registry.unload(name)))
    return jsonify({**await asyncio.to_thread(model_object, server.registry, name), "unloaded": unloaded})


@blueprint.get("/v1/controlnets")
async def list_controlnets():
    """The ControlNets a request may name (`control_net`), with the model family each fits."""
    registry = state().registry

    def listing() -> list[dict[str, Any]]:
        out = []
        for info in registry.controlnets():
            status = registry.controlnet_status(info.name)
            out.append(
                {
                    "id": info.name,
                    "object": "controlnet",
                    "family": info.family,
                    "created": info.created,
                    "size_bytes": disk_size(info.folder),
                    "loaded": status.loaded,
                    "memory_bytes": status.memory_bytes,
                    "default_for": registry.models_using_controlnet(info.name),
                }
            )
        return out

    return jsonify({"object": "list", "data": await asyncio.to_thread(listing)})


@blueprint.get("/v1/loras")
async def list_loras():
    """The LoRAs a request may name (`<lora:id:weight>` or `loras`), with the model family each fits."""
    loras = state().registry.loras
    data = [
        {"id": info.name, "object": "lora", "family": info.family, "created": int(info.modified), "bytes": info.size}
        for info in loras.available()
    ]
    return jsonify({"object": "list", "data": data})


@blueprint.get("/v1/upscalers")
async def list_upscalers():
    """The upscalers /v1/images/upscale and a hires fix (`hr_upscaler`) may name: converted ones, and the
    built-in resamplers (no file: `built_in`)."""
    upscalers = state().registry.upscalers

    def listing() -> list[dict[str, Any]]:
        return [
            {
                "id": info.name,
                "object": "upscaler",
                "arch": info.arch,
                "scale": info.scale,
                "built_in": info.folder is None,
            }
            for info in map(upscalers.info, upscalers.names())
        ]

    return jsonify({"object": "list", "data": await asyncio.to_thread(listing)})
