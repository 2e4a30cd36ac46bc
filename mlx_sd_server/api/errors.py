"""Every error leaves the server as OpenAI's JSON envelope, mapped here and nowhere else.

`{"error": {"message", "type", "param", "code"}}` with the matching status. Unexpected exceptions are
logged with their traceback and answered with a bare 500: a traceback never reaches a client. Messages
show client values through `job.shown` where they are made; here, as a last guard for messages made
elsewhere (a model name in a 404), no message is longer than MAX_MESSAGE and no `param` than ECHO_CHARS.
A 429 says when to retry (`Retry-After`), and so does a 503 for an image store that cannot be reached.
"""

from __future__ import annotations

import logging
import math

from quart import Quart, jsonify
from werkzeug.exceptions import HTTPException

from mlx_sd_server.job import ECHO_CHARS, JobError
from mlx_sd_server.paths import without_paths
from mlx_sd_server.registry import ModelBusyError, ModelLoadError, ModelNotFoundError
from mlx_sd_server.residency import ModelTooLargeError
from mlx_sd_server.store import StoreUnavailableError
from mlx_sd_server.worker import QueueFullError

log = logging.getLogger("mlx_sd_server.api")

# OpenAI's error `type` for each status we send.
ERROR_TYPES = {
    401: "authentication_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    507: "server_error",
}
# `code` for errors raised by routing and body handling rather than by our own code.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}
MAX_MESSAGE = 1000
# Seconds a client is told to wait when the queue is full, unless the QueueFullError carries its own
# `retry_after` (an estimate from the worker): about the time a typical job takes to free a place.
DEFAULT_RETRY_AFTER = 10


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def clip_message(text: str | None, limit: int) -> str | None:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
):
    body = {
        "error": {
            "message": clip_message(message, MAX_MESSAGE),
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": clip_message(param, ECHO_CHARS),
            "code": code,
        }
    }
    response = jsonify(body)
    response.headers.update(headers or {})
    return response, status


def retry_after(error: Exception) -> int:
    """Whole seconds (at least 1) for `Retry-After`: the error's own `retry_after`, else the default."""
    value = getattr(error, "retry_after", None)
    if value is None:
        return DEFAULT_RETRY_AFTER
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else DEFAULT_RETRY_AFTER


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def api_error(error: APIError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.errorhandler(JobError)
    async def job_error(error: JobError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.errorhandler(ModelNotFoundError)
    async def model_not_found(error: ModelNotFoundError):
        return error_response(404, str(error), "model", "model_not_found")

    @app.errorhandler(ModelLoadError)
    async def model_load_error(error: ModelLoadError):
        log.error("%s", error)  # the whole of it; the client's copy names no server path
        return error_response(503, without_paths(str(error)), "model", "model_unavailable")

    @app.errorhandler(ModelBusyError)
    async def model_busy(error: ModelBusyError):
        return error_response(409, str(error), "model", "model_converting")

    @app.errorhandler(ModelTooLargeError)
    async def model_too_large(error: ModelTooLargeError):
        log.error("%s", error)
        return error_response(507, str(error), "model", "model_too_large")

    @app.errorhandler(QueueFullError)
    async def queue_full(error: QueueFullError):
        return error_response(429, str(error), None, "queue_full", {"Retry-After": str(retry_after(error))})

    @app.errorhandler(StoreUnavailableError)
    async def store_unavailable(error: StoreUnavailableError):  # an S3 outage: nothing of the request was kept
        return error_response(503, str(error), None, "store_unavailable", {"Retry-After": str(retry_after(error))})

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException):
        status = error.code or 500
        return error_response(status, error.description or error.name, None, _HTTP_CODES.get(status))

    @app.errorhandler(Exception)
    async def internal_error(error: Exception):
        log.error("internal error", exc_info=error)
        return error_response(500, "internal server error (details are in the server log)", None, "internal_error")
