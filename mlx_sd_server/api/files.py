"""The reference's /v1/files routes over the file store (a folder, or an S3 bucket: its outage is a 503).
Ids are validated by the store, never joined onto paths or keys here; a filename in a download url only
has to equal the stored name.

Every store call runs in a thread (`asyncio.to_thread`), so disk work never holds up the event loop
(`/health`, other requests). `GET /v1/files` pages as OpenAI's list endpoints do: `limit` (1-10000,
default 10000), `after` (a file id: the page starts after it), `order` (`desc`, newest first, the
default; or `asc`), and answers `{"object": "list", "data", "first_id", "last_id", "has_more"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from quart import Blueprint, Response, current_app, jsonify, request

from mlx_sd_server.api.errors import APIError
from mlx_sd_server.api.state import state
from mlx_sd_server.images import MIME_TYPES
from mlx_sd_server.job import shown
from mlx_sd_server.store import InvalidFileIdError, Store

log = logging.getLogger("mlx_sd_server.api")

blueprint = Blueprint("files", __name__)

MAX_LIST_LIMIT = 10_000  # OpenAI's for files
PURPOSE = "assistants_output"  # every stored file's


@blueprint.while_app_serving
async def apply_retention():
    """While serving, remove files past --store-max-age / --store-max-gb in the background."""
    store: Store = current_app.extensions["mlx_sd_server"].store
    interval = getattr(store, "prune_interval", None)
    task = asyncio.create_task(_prune_forever(store, interval)) if interval else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _prune_forever(store: Store, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(store.prune)
        except Exception:
            log.exception("retention: pruning %s failed", store.location)


@blueprint.get("/v1/files")
async def list_files():
    limit = _limit(request.args.get("limit"))
    after = request.args.get("after") or None
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got {shown(order)}", param="order", code="invalid_value")
    purpose = request.args.get("purpose")
    store = state().store

    def page_json() -> bytes:  # the page and its JSON, both off the event loop
        if purpose not in (None, "", PURPOSE):
            files, has_more = [], False
        else:
            page = store.list_page(limit=limit, after=after, order=order)
            files, has_more = page.files, page.has_more
        data = [f.to_dict() for f in files]
        return json.dumps(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": has_more,
            }
        ).encode()

    try:
        body = await asyncio.to_thread(page_json)
    except InvalidFileIdError:
        raise APIError(
            400, f"after must be a file id (file_<uuid>), got {shown(after)}", param="after", code="invalid_value"
        ) from None
    except FileNotFoundError:
        raise APIError(
            400,
            f"after: no file {shown(after)} (deleted?); list again without after",
            param="after",
            code="invalid_value",
        ) from None
    return Response(body, mimetype="application/json")


@blueprint.get("/v1/files/<file_id>")
async def retrieve_file(file_id: str):
    stored = await _lookup(state().store.get, file_id)
    return jsonify(stored.to_dict())


@blueprint.delete("/v1/files/<file_id>")
async def delete_file(file_id: str):
    await _lookup(state().store.delete, file_id)
    return jsonify({"id": file_id, "object": "file", "deleted": True})


@blueprint.get("/v1/files/download/<file_id>")
@blueprint.get("/v1/files/download/<file_id>/<filename>")
async def download_file(file_id: str, filename: str | None = None):
    name, data = await _lookup(state().store.read, file_id, filename)  # never through a link
    mimetype = MIME_TYPES.get(name.rpartition(".")[2].lower(), "application/octet-stream")
    return Response(data, mimetype=mimetype)  # images are small; read whole


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return MAX_LIST_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise APIError(
            400,
            f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got {shown(value)}",
            param="limit",
            code="invalid_value",
        )
    return limit


async def _lookup(action, file_id: str, *args):
    try:
        return await asyncio.to_thread(action, file_id, *args)
    except InvalidFileIdError:
        raise APIError(
            400, f"{shown(file_id)} is not a file id (file_<uuid>)", param="file_id", code="invalid_file_id"
        ) from None
    except FileNotFoundError:
        raise APIError(404, f"no file {shown(file_id)}", param="file_id", code="file_not_found") from None
