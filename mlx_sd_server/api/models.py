"""GET /v1/models and GET /v1/loras, in OpenAI's list shape."""

from __future__ import annotations

import dataclasses

from quart import Blueprint, jsonify

from mlx_sd_server.api.state import state

blueprint = Blueprint("models", __name__)


@blueprint.get("/v1/models")
async def list_models():
    registry = state().registry
    data = []
    for name in registry.names():
        info = registry.info(name)
        text_length = info.capabilities.text_length if info.capabilities else None
        data.append(
            {
                "id": info.name,
                "object": "model",
                "created": info.created,
                "owned_by": "mlx-sd-server",
                "family": info.family,
                "has_controlnet": info.has_controlnet,
                # a model with T5: its default and most max_sequence_length (the playground offers the field)
                "max_sequence_length": None if text_length is None else dataclasses.asdict(text_length),
                "default": info.name == registry.default_name,
                # what its edits are: instruction edits of up to `references` input images (0: img2img of
                # one), inpainting with a mask or not (the playground shows its mask painter or not)
                "references": info.capabilities.references if info.capabilities else 0,
                "inpainting": bool(info.capabilities and info.capabilities.inpainting),
                "img2img": bool(info.capabilities and info.capabilities.img2img),
                "defaults": dataclasses.asdict(info.defaults),  # width x height: the area of size "auto"
            }
        )
    return jsonify({"object": "list", "data": data})


@blueprint.get("/v1/loras")
async def list_loras():
    """The LoRAs a request may name (`<lora:id:weight>` or `loras`), with the model family each fits."""
    loras = state().registry.loras
    data = [
        {"id": info.name, "object": "lora", "family": info.family, "created": int(info.modified), "bytes": info.size}
        for info in loras.available()
    ]
    return jsonify({"object": "list", "data": data})
