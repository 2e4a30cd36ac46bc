"""The HTTP API: a Quart app speaking sd-api-server's and OpenAI's Images API, and AUTOMATIC1111's (/sdapi/v1).

`create_app` wires the pieces; each resource is a blueprint (images, files, models, health, sdapi, upscale), request
bodies are normalised in `parsing`, tasks are listed and cancelled in `tasks`, and every error is shaped in `errors`.
"""

from __future__ import annotations

from quart import Quart

from mlx_sd_server.api import files, health, images, models, openapi, playground, sdapi, tasks, upscale
from mlx_sd_server.api.auth import require_api_key
from mlx_sd_server.api.cors import CorsPolicy, HostHeaderGuard, require_allowed_host
from mlx_sd_server.api.errors import error_response, register_error_handlers
from mlx_sd_server.api.state import ServerState, Settings
from mlx_sd_server.api.writes import WriteTimeoutGuard
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import Store
from mlx_sd_server.worker import JobCancelled, ServerStopping, Worker

__all__ = ["Settings", "create_app"]

# How long the worker may take to finish its running step when the server stops, before the process
# exits anyway (launchd kills a service 20 s after asking it to stop).
STOP_TIMEOUT_SECONDS = 15.0


def create_app(registry: ModelRegistry, store: Store, settings: Settings = Settings()) -> Quart:
    """The app. Its worker thread starts when serving starts and stops when it ends: the running job after
    its current step, every waiting request answered 503."""
    app = Quart("mlx_sd_server")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_upload_bytes  # base64 images in form text fields
    app.url_map.merge_slashes = False  # `//etc/passwd` is a 404, not a redirect to somewhere else
    worker = Worker(registry, max_queue=settings.max_queue)
    app.extensions["mlx_sd_server"] = ServerState(registry, store, worker, settings)

    cors = CorsPolicy(settings.cors_origins)
    if settings.allowed_hosts:
        app.before_request(require_allowed_host(settings.allowed_hosts))
    app.before_request(cors.answer_preflight)  # before the API key: browsers send none with a preflight
    app.before_request(cors.refuse_cross_origin_writes)
    app.after_request(cors.add_headers)
    if settings.api_key:
        app.before_request(require_api_key(settings.api_key))
    for module in (images, tasks, files, models, health, openapi, playground, sdapi, upscale):
        app.register_blueprint(module.blueprint)
    register_error_handlers(app)

    @app.errorhandler(ServerStopping)
    async def server_stopping(error: ServerStopping):
        response, status = error_response(503, str(error), None, "server_shutting_down")
        response.headers["Connection"] = "close"
        return response, status

    @app.errorhandler(JobCancelled)
    async def job_cancelled(error: JobCancelled):  # its client is gone; should one still be waiting: a 503
        return error_response(503, "the job was cancelled before it finished", None, "job_cancelled")

    # A Host header that is no host name makes the router raise before any hook runs: refused in front.
    # A client that stops reading an answer is given up on after settings.write_timeout seconds.
    # Quart's documented way to add ASGI middleware, though its types declare asgi_app a method.
    app.asgi_app = WriteTimeoutGuard(  # type: ignore[method-assign]
        HostHeaderGuard(app.asgi_app), settings.write_timeout
    )
    app.before_serving(worker.start)
    app.after_serving(lambda: worker.stop(timeout=STOP_TIMEOUT_SECONDS))
    return app
