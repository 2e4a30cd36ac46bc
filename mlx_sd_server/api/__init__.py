"""The HTTP API: a Quart app speaking sd-api-server's and OpenAI's Images API.

`create_app` wires the pieces; each resource is a blueprint (images, files, models, health), request
bodies are normalised in `parsing`, and every error is shaped in `errors`.
"""

from __future__ import annotations

from quart import Quart

from mlx_sd_server.api import files, health, images, models
from mlx_sd_server.api.auth import require_api_key
from mlx_sd_server.api.cors import add_cors_headers, answer_preflight
from mlx_sd_server.api.errors import register_error_handlers
from mlx_sd_server.api.state import ServerState, Settings
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore
from mlx_sd_server.worker import Worker

__all__ = ["Settings", "create_app"]


def create_app(registry: ModelRegistry, store: FileStore, settings: Settings = Settings()) -> Quart:
    """The app. Its worker thread starts when serving starts and stops (cancelling jobs) when it ends."""
    app = Quart("mlx_sd_server")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_upload_bytes  # base64 images in form text fields
    app.url_map.merge_slashes = False  # `//etc/passwd` is a 404, not a redirect to somewhere else
    worker = Worker(registry, max_queue=settings.max_queue)
    app.extensions["mlx_sd_server"] = ServerState(registry, store, worker, settings)

    app.before_request(answer_preflight)
    app.after_request(add_cors_headers)
    if settings.api_key:
        app.before_request(require_api_key(settings.api_key))
    for module in (images, files, models, health):
        app.register_blueprint(module.blueprint)
    register_error_handlers(app)
    app.before_serving(worker.start)
    app.after_serving(worker.stop)
    return app
