"""GET /openapi.json: the HTTP contract as an OpenAPI 3.1 document, built from the schemas the parsers
validate with (`job.request_schema`, made from the job's field table, and `parsing.DELIVERY_SCHEMA`), so
what it says is what the server checks.
Tools fuzz it (tests/test_openapi.py runs schemathesis against it) and generate clients from it.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, jsonify

from mlx_sd_server.api import a1111
from mlx_sd_server.api.parsing import DELIVERY_SCHEMA, JSON_IMAGE_ALIASES
from mlx_sd_server.api.state import state
from mlx_sd_server.job import IMAGE_FIELDS, IMAGE_LISTS, Limits, request_schema

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
MODEL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "family": {"type": "string"},
        "loaded": {"type": "boolean"},
        "size_bytes": {"type": "integer"},
        "memory_bytes": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"], "description": "unix time its keep-alive ends"},
        "keep_alive": {"type": ["number", "null"], "description": "seconds after its last job; -1: kept"},
        "capabilities": {"type": "object"},
        "defaults": {"type": "object"},
    },
}
LOAD_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"keep_alive": request_schema()["keep_alive"]},
}
ERROR_STATUSES = {
    "400": "bad input",
    "401": "missing or wrong API key",
    "404": "no such model, file or task",
    "409": "the task was cancelled, or had finished; the model is being converted",
    "413": "request too large",
    "415": "wrong content type",
    "429": "queue full (see Retry-After)",
    "503": "model unavailable or server stopping",
    "507": "the image store is full, or the model is larger than the memory budget",
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: _json({"$ref": "#/components/schemas/Error"}, ERROR_STATUSES[status]) for status in statuses}


def _json_image(name: str) -> dict[str, Any]:
    """One image in JSON: base64 or a data URL, or OpenAI's objects {"image_url": <data URL>}, {"b64_json": ...}."""
    return {
        "anyOf": [
            {"type": "string", "description": "base64, or a data: url"},
            *(
                {
                    "type": "object",
                    "required": [key],
                    "additionalProperties": False,
                    "properties": {key: {"type": "string", "description": what}},
                }
                for key, what in (("image_url", "a data: url (no other url is fetched)"), ("b64_json", "base64"))
            ),
        ],
        "description": IMAGE_FIELDS[name],
    }


def _image_list(item: dict[str, Any], limits: Limits, what: str) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": 1, "maxItems": limits.max_images, "description": what}


def _image_request(limits: Limits, images: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """The request body of an images route: JSON (images as base64 or data urls) or a multipart form. An
    IMAGE_LISTS field (`image`) takes several images: a JSON array (or, by its JSON_IMAGE_ALIASES name,
    OpenAI's `images`), repeated form parts (`image` or `image[]`); a required one may come by either name."""
    fields = {**request_schema(limits), **DELIVERY_SCHEMA}
    several = f"the input images in order (instruction-edit models: at most {limits.max_images} and the model's limit)"
    json_images: dict[str, Any] = {}
    form_images: dict[str, Any] = {}
    json_names: dict[str, list[str]] = {}  # each image field -> the names a body may give it by
    form_names: dict[str, list[str]] = {}
    for name in images:
        item = _json_image(name)
        binary = {"type": "string", "format": "binary", "description": IMAGE_FIELDS[name]}
        json_images[name], form_images[name] = item, binary
        json_names[name], form_names[name] = [name], [name]
        if name in IMAGE_LISTS:
            json_images[name] = {"anyOf": [item, _image_list(item, limits, several)], "description": several}
            form_images[f"{name}[]"] = _image_list(binary, limits, f"{several}: one part each, or `{name}` repeated")
            form_names[name].append(f"{name}[]")
        for alias in (alias for alias, field in JSON_IMAGE_ALIASES.items() if field == name):
            json_images[alias] = _image_list(item, limits, f"OpenAI's JSON name for {name}: {several}")
            json_names[name].append(alias)
    content = {}
    for media_type, properties, names in (
        ("application/json", json_images, json_names),
        ("multipart/form-data", form_images, form_names),
    ):
        named = [name for name in required if len(names.get(name, ())) > 1]  # `image` (or `images`...)
        schema: dict[str, Any] = {
            "type": "object",
            "required": [name for name in required if name not in named],
            "additionalProperties": False,
            "properties": {**fields, **properties},
        }
        if named:
            schema["anyOf"] = [{"required": [alias]} for name in named for alias in names[name]]
        content[media_type] = {"schema": schema}
    return {"required": True, "content": content}


def openapi_document(limits: Limits = Limits(), api_key: bool = False) -> dict[str, Any]:
    image_errors = _errors("400", "401", "404", "413", "415", "429", "503", "507")
    file_id = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
    task_id = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
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
            "/v1/images/variations": {
                "post": {
                    "operationId": "createImageVariation",
                    "description": "variations of one image: an img2img at strength 0.6 with the prompt given or "
                    "none, or on an instruction-edit model an instruction to vary it",
                    "requestBody": _image_request(limits, ("image",), ("image",)),
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
                "get": {
                    "operationId": "listModels",
                    "description": "every servable model: loaded, memory_bytes, expires_at, size_bytes, capabilities",
                    "responses": {"200": _json({"type": "object"}), **_errors("401")},
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "operationId": "retrieveModel",
                    "parameters": [model_id],
                    "responses": {"200": _json(MODEL), **_errors("401", "404", "409")},
                }
            },
            "/v1/models/{model_id}/load": {
                "post": {
                    "operationId": "loadModel",
                    "parameters": [model_id],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": LOAD_REQUEST}},
                    },
                    "responses": {"200": _json(MODEL), **_errors("400", "401", "404", "409", "503", "507")},
                }
            },
            "/v1/models/{model_id}/unload": {
                "post": {
                    "operationId": "unloadModel",
                    "parameters": [model_id],
                    "responses": {"200": _json(MODEL), **_errors("401", "404", "409", "503")},
                }
            },
            "/v1/controlnets": {
                "get": {
                    "operationId": "listControlNets",
                    "description": "the ControlNets a request may name (control_net), with the model family each fits",
                    "responses": {"200": _json({"type": "object"}), **_errors("401")},
                }
            },
            "/v1/loras": {
                "get": {
                    "operationId": "listLoras",
                    "description": "the LoRAs a request may name, with the model family each fits",
                    "responses": {"200": _json({"type": "object"}), **_errors("401")},
                }
            },
            "/v1/upscalers": {
                "get": {
                    "operationId": "listUpscalers",
                    "description": "the upscalers /v1/images/upscale and hr_upscaler may name, with their scale",
                    "responses": {"200": _json({"type": "object"}), **_errors("401")},
                }
            },
            "/health": {
                "get": {"operationId": "health", "security": [], "responses": {"200": _json({"type": "object"})}}
            },
        },
        "components": {"schemas": {"Error": ERROR}},
    }
    document["paths"].update(upscale_paths(limits))
    document["paths"].update(sdapi_paths())
    if api_key:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def upscale_paths(limits: Limits) -> dict[str, Any]:
    """POST /v1/images/upscale (api/upscale.py): JSON (the image in base64 or a data url) or a form."""
    delivery = {name: DELIVERY_SCHEMA[name] for name in ("response_format", "output_format", "output_compression")}
    fields = {
        "upscaler": {"type": "string", "maxLength": limits.max_field_chars, "description": "GET /v1/upscalers"},
        "scale": {"type": "number", "exclusiveMinimum": 0, "description": "default: the upscaler's own"},
        **delivery,
    }
    content = {
        media_type: {
            "schema": {
                "type": "object",
                "required": ["image", "upscaler"],
                "additionalProperties": False,
                "properties": {**fields, "image": image},
            }
        }
        for media_type, image in (
            ("application/json", {"type": "string", "description": "base64, or a data: url"}),
            ("multipart/form-data", {"type": "string", "format": "binary"}),
        )
    }
    return {
        "/v1/images/upscale": {
            "post": {
                "operationId": "upscaleImage",
                "description": f"an image enlarged by an upscaler, each side at most {limits.max_side} px",
                "requestBody": {"required": True, "content": content},
                "responses": {"200": _json(IMAGES), **_errors("400", "401", "404", "413", "415", "429", "503")},
            }
        }
    }


# AUTOMATIC1111's API (api/sdapi.py): path -> (method, operationId, request fields (None: no body), description)
SDAPI_ROUTES: dict[str, tuple[str, str, dict[str, Any] | None, str]] = {
    "/sdapi/v1/txt2img": ("post", "a1111Txt2img", a1111.FIELDS["txt2img"], "A1111's txt2img: our generation"),
    "/sdapi/v1/img2img": ("post", "a1111Img2img", a1111.FIELDS["img2img"], "A1111's img2img: our edit"),
    "/sdapi/v1/extra-single-image": ("post", "a1111Extras", a1111.EXTRAS_FIELDS, "A1111's extras: an upscale"),
    "/sdapi/v1/png-info": ("post", "a1111PngInfo", {"image": ""}, "the A1111 parameters an image carries"),
    "/sdapi/v1/options": ("get", "a1111Options", None, "A1111's options this server has"),
    "/sdapi/v1/progress": ("get", "a1111Progress", None, "the running job's progress, with a preview"),
    "/sdapi/v1/interrupt": ("post", "a1111Interrupt", None, "the running A1111 job ends with what it has"),
    "/sdapi/v1/skip": ("post", "a1111Skip", None, "the running A1111 job's current batch ends"),
    "/sdapi/v1/sd-models": ("get", "a1111Models", None, "the models, as A1111's checkpoints"),
    "/sdapi/v1/sd-vae": ("get", "a1111Vaes", None, "none: a model's VAE is its own"),
    "/sdapi/v1/samplers": ("get", "a1111Samplers", None, "A1111's samplers this server has"),
    "/sdapi/v1/schedulers": ("get", "a1111Schedulers", None, "A1111's schedulers this server has"),
    "/sdapi/v1/loras": ("get", "a1111Loras", None, "the LoRAs"),
    "/sdapi/v1/upscalers": ("get", "a1111Upscalers", None, "the upscalers, by A1111's names"),
    "/sdapi/v1/latent-upscale-modes": ("get", "a1111LatentModes", None, "A1111's Latent modes this server has"),
}
_JSON_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def sdapi_paths() -> dict[str, Any]:
    """A1111's routes: their bodies' fields typed by A1111's defaults (a None default: any type)."""
    errors = _errors("400", "401", "404", "413", "415", "429", "503", "507")
    paths: dict[str, Any] = {}
    for path, (method, operation, fields, description) in SDAPI_ROUTES.items():
        entry: dict[str, Any] = {
            "operationId": operation,
            "description": description,
            "responses": {"200": {"description": "OK", "content": {"application/json": {}}}, **errors},
        }
        if fields is not None:
            properties = {
                name: {"type": _JSON_TYPE[type(value)]} if value is not None else {} for name, value in fields.items()
            }
            schema = {"type": "object", "additionalProperties": False, "properties": properties}
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        paths.setdefault(path, {})[method] = entry
    paths["/sdapi/v1/options"]["post"] = {
        "operationId": "a1111SetOptions",
        "description": "sd_model_checkpoint sets the default model; other options only as they are",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
        "responses": {"200": {"description": "OK"}, **errors},
    }
    return paths


@blueprint.get("/openapi.json")
async def openapi():
    settings = state().settings
    return jsonify(openapi_document(settings.limits, bool(settings.api_key)))
