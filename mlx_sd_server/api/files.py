"""The reference's /v1/files routes over the file store. Ids are validated by the store, never joined
onto paths here; a filename in a download url only has to equal the stored name."""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, jsonify

from mlx_sd_server.api.errors import APIError
from mlx_sd_server.api.state import state
from mlx_sd_server.images import MIME_TYPES
from mlx_sd_server.store import InvalidFileIdError

blueprint = Blueprint("files", __name__)


@blueprint.get("/v1/files")
async def list_files():
    files = [f.to_dict() for f in state().store.list()]
    return jsonify({"object": "list", "data": files, "has_more": False})  # SDKs page until has_more is false


@blueprint.get("/v1/files/<file_id>")
async def retrieve_file(file_id: str):
    return jsonify(_lookup(lambda: state().store.get(file_id), file_id).to_dict())


@blueprint.delete("/v1/files/<file_id>")
async def delete_file(file_id: str):
    _lookup(lambda: state().store.delete(file_id), file_id)
    return jsonify({"id": file_id, "object": "file", "deleted": True})


@blueprint.get("/v1/files/download/<file_id>")
@blueprint.get("/v1/files/download/<file_id>/<filename>")
async def download_file(file_id: str, filename: str | None = None):
    path: Path = _lookup(lambda: state().store.path(file_id, filename), file_id)
    mimetype = MIME_TYPES.get(path.suffix.lstrip(".").lower(), "application/octet-stream")
    return Response(path.read_bytes(), mimetype=mimetype)  # images are small; read whole


def _lookup(action, file_id: str):
    try:
        return action()
    except InvalidFileIdError:
        raise APIError(400, f"{file_id!r} is not a file id (file_<uuid>)", param="file_id",
                       code="invalid_file_id") from None
    except FileNotFoundError:
        raise APIError(404, f"no file {file_id!r}", param="file_id", code="file_not_found") from None
