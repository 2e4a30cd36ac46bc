"""GET /openapi.json: the HTTP contract as an OpenAPI 3.1 document, built from the schemas the parsers
validate with (`job.request_schema`, made from the job's field table, and `parsing.DELIVERY_SCHEMA`), so
what it says is what the server checks.
Tools fuzz it (tests/test_openapi.py runs schemathesis against it) and generate clients from it.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, jsonify

from mlx_sd_server.api.parsing import DELIVERY_SCHEMA
from mlx_sd_server.api.state import state
from mlx_sd_server.job import IMAGE_FIELDS, Limits, request_schema

blueprint = Blueprint("openapi", __name__)

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
IMAGES = {
    "type": "object",
    "required": ["created", "data"],
    "properties": {
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "url": {"type": "string"},
                    "b64_json": {"type": "string"},
                    "prompt": {"type": "string"},
                    "seed": {"type": "integer"},
                },
            },
        },
    },
}
FILE = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "bytes": {"type": "integer"},
        "created_at": {"type": "integer"},
        "filename": {"type": "string"},
        "purpose": {"type": "string"},
    },
}
TASK = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "state": {"type": "string"}},
}
ERROR_STATUSES = {
    "400": "bad input",
    "401": "missing or wrong API key",
    "404": "no such model, file or task",
    "409": "the task was cancelled, or had finished",
    "413": "request too large",
    "415": "wrong content type",
    "429": "queue full (see Retry-After)",
    "503": "model unavailable or server stopping",
    "507": "the image store is full",
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: _json({"$ref": "#/components/schemas/Error"}, ERROR_STATUSES[status]) for status in statuses}


def _image_request(limits: Limits, images: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """The request body of an images route: JSON (images as base64 or data urls) or a multipart form."""
    fields = {**request_schema(limits), **DELIVERY_SCHEMA}
    as_json = {
        "type": "object",
        "required": list(required),
        "additionalProperties": False,
        "properties": {
            **fields,
            **{
                name: {"type": "string", "description": f"{IMAGE_FIELDS[name]}: base64 or a data: url"}
                for name in images
            },
        },
    }
    as_form = {
        "type": "object",
        "required": list(required),
        "additionalProperties": False,
        "properties": {
            **fields,
            **{name: {"type": "string", "format": "binary", "description": IMAGE_FIELDS[name]} for name in images},
        },
    }
    return {
        "required": True,
        "content": {"application/json": {"schema": as_json}, "multipart/form-data": {"schema": as_form}},
    }


def openapi_document(limits: Limits = Limits(), api_key: bool = False) -> dict[str, Any]:
    image_errors = _errors("400", "401", "404", "413", "415", "429", "503", "507")
    file_id = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
    task_id = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "mlx-sd-server",
            "version": "1",
            "description": "LlamaEdge sd-api-server's and OpenAI's Images API, on MLX.",
        },
        "paths": {
            "/v1/images/generations": {
                "post": {
                    "operationId": "createImage",
                    "requestBody": _image_request(limits, ("control_image",), ("prompt",)),
                    "responses": {"200": _json(IMAGES), **image_errors},
                }
            },
            "/v1/images/edits": {
                "post": {
                    "operationId": "createImageEdit",
                    "requestBody": _image_request(limits, tuple(IMAGE_FIELDS), ("prompt", "image")),
                    "responses": {"200": _json(IMAGES), **image_errors},
                }
            },
            "/v1/files": {
                "get": {
                    "operationId": "listFiles",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
                        {"name": "purpose", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "object": {"const": "list"},
                                    "data": {"type": "array", "items": FILE},
                                    "first_id": {"type": ["string", "null"]},
                                    "last_id": {"type": ["string", "null"]},
                                    "has_more": {"type": "boolean"},
                                },
                            }
                        ),
                        **_errors("400", "401"),
                    },
                }
            },
            "/v1/files/{file_id}": {
                "get": {
                    "operationId": "retrieveFile",
                    "parameters": [file_id],
                    "responses": {"200": _json(FILE), **_errors("401", "404")},
                },
                "delete": {
                    "operationId": "deleteFile",
                    "parameters": [file_id],
                    "responses": {"200": _json({"type": "object"}), **_errors("401", "404")},
                },
            },
            "/v1/files/download/{file_id}/{filename}": {
                "get": {
                    "operationId": "downloadFile",
                    "parameters": [
                        file_id,
                        {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {"200": {"description": "the image's bytes"}, **_errors("401", "404")},
                }
            },
            "/v1/images/tasks": {
                "get": {"operationId": "listTasks", "responses": {"200": _json({"type": "object"}), **_errors("401")}}
            },
            "/v1/images/tasks/{task_id}": {
                "get": {
                    "operationId": "retrieveTask",
                    "parameters": [task_id],
                    "responses": {"200": _json(TASK), **_errors("401", "404")},
                },
                "delete": {
                    "operationId": "cancelTask",
                    "parameters": [task_id],
                    "responses": {"200": _json(TASK), **_errors("401", "404", "409")},
                },
            },
            "/v1/images/tasks/{task_id}/events": {
                "get": {
                    "operationId": "followTask",
                    "parameters": [task_id],
                    "responses": {
                        "200": {
                            "description": "progress events, then done, cancelled or failed",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors("401", "404"),
                    },
                }
            },
            "/v1/images/tasks/{task_id}/cancel": {
                "post": {
                    "operationId": "cancelTaskPost",
                    "parameters": [task_id],
                    "responses": {"200": _json(TASK), **_errors("401", "404", "409")},
                }
            },
            "/v1/models": {
                "get": {"operationId": "listModels", "responses": {"200": _json({"type": "object"}), **_errors("401")}}
            },
            "/v1/loras": {
                "get": {
                    "operationId": "listLoras",
                    "description": "the LoRAs a request may name, with the model family each fits",
                    "responses": {"200": _json({"type": "object"}), **_errors("401")},
                }
            },
            "/health": {
                "get": {"operationId": "health", "security": [], "responses": {"200": _json({"type": "object"})}}
            },
        },
        "components": {"schemas": {"Error": ERROR}},
    }
    if api_key:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


@blueprint.get("/openapi.json")
async def openapi():
    settings = state().settings
    return jsonify(openapi_document(settings.limits, bool(settings.api_key)))
