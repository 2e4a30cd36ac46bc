"""GET /v1/models in OpenAI's list shape."""

from __future__ import annotations

from quart import Blueprint, jsonify

from mlx_sd_server.api.state import state

blueprint = Blueprint("models", __name__)


@blueprint.get("/v1/models")
async def list_models():
    registry = state().registry
    data = []
    for name in registry.names():
        info = registry.info(name)
        data.append({"id": info.name, "object": "model", "created": info.created, "owned_by": "mlx-sd-server",
                     "family": info.family, "has_controlnet": info.has_controlnet,
                     "default": info.name == registry.default_name})
    return jsonify({"object": "list", "data": data})
