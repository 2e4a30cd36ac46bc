"""GET /health: liveness, what is loaded, and the queue. Open without an API key, for monitors."""

from __future__ import annotations

from quart import Blueprint, jsonify

from mlx_sd_server.api.state import state

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
async def health():
    server = state()
    return jsonify(
        {
            "status": "ok",
            "default_model": server.registry.default_name,
            "loaded_models": server.registry.loaded(),
            "memory": server.registry.memory(),
            "queue": server.worker.status(),
        }
    )
