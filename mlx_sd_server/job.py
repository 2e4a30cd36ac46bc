"""The one job type: every generation request, from HTTP or the command line, becomes a `Job`.

This module is the single place where request defaults and limits live. `build_job` takes raw field
values (typed JSON values or multipart strings) plus already-decoded images and returns an immutable,
fully-validated `Job`, or raises `JobError` naming the offending field. Everything that bounds a job's
work (prompt length, image sizes, the size of what an upload is scaled to) is checked here, before the
job is queued, so no request can hold the worker for long or take much memory by its shape alone.

Error messages show a client's value through `shown`, which never echoes more than `ECHO_CHARS`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from PIL import Image

from mlx_sd_server.engine.errors import ECHO_CHARS, JobError, kind_of, shown
from mlx_sd_server.engine.families.spec import DEFAULT_GUIDANCE, Capabilities, ModelDefaults
from mlx_sd_server.engine.sampling.samplers import SAMPLE_METHODS
from mlx_sd_server.engine.sampling.schedules import SCHEDULERS


MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Server-configurable bounds on a request, all checked before its job is queued."""

    max_n: int = 10
    max_steps: int = 150
    max_pixels: int = 2048 * 2048  # output width x height
    min_side: int = 64
    max_side: int = 4096
    # Prompts (prompt and negative_prompt): characters, and 75-token CLIP windows counted as the SD text
    # encoders cut them (each BREAK starts a new one). Encoding cost grows with the windows.
    max_prompt_chars: int = 10_000
    max_prompt_chunks: int = 16
    max_field_chars: int = 256  # any other text field (model, size, sample_method, user, ...)
    max_fields: int = 64  # fields in one request (JSON keys, form parts)
    # Uploads (image, mask, control_image): long side / short side, and the pixels of the upload scaled to
    # cover the output size (the intermediate the pipeline crops from); a thin strip would scale to a giant.
    max_upload_aspect: float = 20.0
    max_fit_pixels: int = 6000 * 6000
    max_loras: int = 8  # LoRAs in one request (tags and the `loras` field together)


_DEFAULTS = ModelDefaults()  # what a model without its own defaults uses


@dataclass(frozen=True)
class Job:
    """A fully resolved generation request. Images are RGB (`mask`: L, 255 = repaint)."""

    prompt: str
    model: str | None = None
    negative_prompt: str = ""
    n: int = 1
    steps: int = _DEFAULTS.steps
    cfg_scale: float = _DEFAULTS.cfg_scale
    sample_method: str = _DEFAULTS.sample_method
    scheduler: str = _DEFAULTS.scheduler
    width: int = _DEFAULTS.width
    height: int = _DEFAULTS.height
    seed: int = 42
    guidance: float | None = _DEFAULTS.guidance
    # img2img / inpainting (edits)
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float = 0.75
    mask: Image.Image | None = field(default=None, repr=False)
    # ControlNet
    control_image: Image.Image | None = field(default=None, repr=False)
    control_strength: float = 0.9
    control_preprocess: str = "none"  # "none" (an edge map / pose already) or "canny" (a photo)
    # LoRAs (name in the LoRA folder, weight), from `<lora:name:weight>` tags (stripped from the prompts
    # above) and the `loras` field
    loras: tuple[tuple[str, float], ...] = ()

    def seeds(self) -> list[int]:
        """Image i of the batch uses seed + i, so any single image can be reproduced with n=1."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]


# OpenAI fields accepted with the values OpenAI documents, and without effect: the model's own settings
# decide quality and style; `user` is for the client's abuse tracking; no moderation is performed;
# images are opaque (`background: transparent` is refused: no model here makes an alpha channel).
OPENAI_HINTS = {"quality": ("auto", "standard", "hd", "low", "medium", "high"), "style": ("vivid", "natural"),
                "user": None, "moderation": ("auto", "low"), "background": ("auto", "opaque", "transparent")}
# The reference's schedulers that we do not have, and why (stable-diffusion.cpp's names).
UNSUPPORTED_SCHEDULERS = {"gits": "GITS needs its paper's precomputed per-model step tables, which are not implemented"}

# Fields a request may carry, with the job attribute each feeds. Images arrive separately, decoded.
JOB_FIELDS = (
    "model", "prompt", "negative_prompt", "n", "steps", "cfg_scale", "sample_method", "scheduler",
    "size", "width", "height", "seed", "strength", "control_strength", "control_preprocess", "guidance",
    "apply_canny_preprocessor", "style_ratio", "loras", *OPENAI_HINTS,
)
IMAGE_FIELDS = ("image", "mask", "control_image")
PROMPT_FIELDS = ("prompt", "negative_prompt")

_LORA_TAG_RE = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)
LORA_SCALE_LIMIT = 10.0  # |weight|: A1111's LoRAs are used from about -2 to 2
_SIZE_RE = re.compile(r"^\s*(\d{1,9})\s*[xX×]\s*(\d{1,9})\s*$")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_text(name: str, value: str) -> str:
    """Refuse a string that is not Unicode text: JSON's `\\ud800` escape gives a lone surrogate, which no
    encoder (tokenizer, PNG text, log) can write."""
    if not value.isascii() and (surrogate := _SURROGATE_RE.search(value)):
        raise JobError(f"{name} is not valid Unicode text: it contains a lone surrogate ({shown(surrogate[0])})",
                       name, "invalid_value")
    return value


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise JobError(f"{name} must be an integer, got {shown(value)}", name, "invalid_type")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:  # also more digits than Python converts
            pass
    raise JobError(f"{name} must be an integer, got {shown(value)}", name, "invalid_type")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise JobError(f"{name} must be a number, got {shown(value)}", name, "invalid_type")
    if isinstance(value, (int, float)):
        try:
            out = float(value)
        except OverflowError:  # an int beyond a float's range
            raise JobError(f"{name} must be finite, got {shown(value)}", name, "invalid_value") from None
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise JobError(f"{name} must be a number, got {shown(value)}", name, "invalid_type") from None
    else:
        raise JobError(f"{name} must be a number, got {shown(value)}", name, "invalid_type")
    if not math.isfinite(out):
        raise JobError(f"{name} must be finite, got {shown(value)}", name, "invalid_value")
    return out


def _as_bool(name: str, value: Any) -> bool:
    """A JSON boolean, or a form field's true/false (also 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise JobError(f"{name} must be true or false, got {shown(value)}", name, "invalid_type")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise JobError(f"{name} must be a string, got {kind_of(value)}", name, "invalid_type")
    return check_text(name, value)


def request_schema(limits: Limits = Limits()) -> dict[str, dict[str, Any]]:
    """Every job field a request may carry as JSON Schema. build_job checks values against these bounds
    and choices, and /openapi.json publishes them (api/openapi.py): one description, so they cannot drift."""
    text = {"type": "string", "maxLength": limits.max_field_chars}
    prompt = {"type": "string", "maxLength": limits.max_prompt_chars}
    side = {"type": "integer", "minimum": limits.min_side, "maximum": limits.max_side, "multipleOf": 8}
    return {
        "prompt": {**prompt, "minLength": 1, "description": "what the image shows; A1111 emphasis syntax"},
        "negative_prompt": {**prompt, "description": "what it should not show"},
        "model": {**text, "description": "a served model's name (default: the server's default model)"},
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n, "default": 1},
        "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps,
                  "description": "default: the model's (20; turbo/LCM/FLUX fewer)"},
        "cfg_scale": {"type": "number", "minimum": 0, "maximum": 50,
                      "description": "classifier-free guidance; <= 1 is off (default: the model's)"},
        "guidance": {"type": "number", "minimum": 0, "maximum": 100,
                     "description": "distilled guidance of models with a guidance embedding (FLUX.1-dev)"},
        "sample_method": {"type": "string", "enum": list(SAMPLE_METHODS)},
        "scheduler": {"type": "string", "enum": list(SCHEDULERS)},
        "size": {**text, "description": "WIDTHxHEIGHT, or auto (the model's size)"},
        "width": side,
        "height": side,
        "seed": {"type": "integer", "maximum": MAX_SEED, "default": 42, "description": "negative: random"},
        "strength": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.75,
                     "description": "edits: how much of the schedule is re-run"},
        "control_strength": {"type": "number", "minimum": 0, "maximum": 10, "default": 0.9},
        "control_preprocess": {"type": "string", "enum": ["none", "canny"], "default": "none"},
        "apply_canny_preprocessor": {"type": "boolean", "description": "the reference's control_preprocess=canny"},
        "style_ratio": {"type": "number", "description": "PhotoMaker's: refused (400), there is none here"},
        "loras": {"type": "array", "maxItems": limits.max_loras,
                  "description": "LoRAs to apply (GET /v1/loras lists them), besides <lora:name:weight> prompt tags",
                  "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                            "properties": {"name": {**text, "minLength": 1},
                                           "scale": {"type": "number", "minimum": -LORA_SCALE_LIMIT,
                                                     "maximum": LORA_SCALE_LIMIT, "default": 1.0}}}},
        **{name: ({**text, "enum": list(choices)} if choices else text) for name, choices in OPENAI_HINTS.items()},
    }


def _in_range(name: str, value: float, schema: dict[str, dict[str, Any]]) -> None:
    lo, hi = schema[name].get("minimum", -math.inf), schema[name].get("maximum", math.inf)
    if not lo <= value <= hi:
        raise JobError(f"{name} must be between {lo} and {hi}, got {shown(value)}", name, "out_of_range")


def parse_size(value: Any, defaults: ModelDefaults = _DEFAULTS) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height), as the reference documents (not as it parses); OpenAI's "auto" is
    the model's native size."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return defaults.width, defaults.height
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise JobError(f"size must be WIDTHxHEIGHT, got {shown(value)}", "size", "invalid_size")
    return int(match.group(1)), int(match.group(2))


def _check_dimensions(width: int, height: int, limits: Limits, param: str, multiple: int) -> None:
    for side_name, side in (("width", width), ("height", height)):
        if side % multiple:
            raise JobError(f"{side_name} must be a multiple of {multiple} for this model, got {shown(side)}", param,
                           "invalid_size")
        if not limits.min_side <= side <= limits.max_side:
            raise JobError(
                f"{side_name} must be between {limits.min_side} and {limits.max_side}, got {shown(side)}",
                param, "invalid_size",
            )
    if width * height > limits.max_pixels:
        raise JobError(
            f"{width}x{height} is {width * height} pixels, over this server's limit of {limits.max_pixels}",
            param, "invalid_size",
        )


def check_field_sizes(fields: Mapping[str, Any], limits: Limits) -> None:
    """Text fields within their limits: prompts in `max_prompt_chars`, any other in `max_field_chars`.
    Cheap (lengths only), so callers may run it before anything else reads the fields."""
    for name, value in fields.items():
        if not isinstance(value, str):
            continue
        limit = limits.max_prompt_chars if name in PROMPT_FIELDS else limits.max_field_chars
        if len(value) > limit:
            raise JobError(f"{shown(name)} is {len(value)} characters, over this server's limit of {limit}",
                           name, "string_above_max_length")


def _check_prompt(name: str, text: str, limits: Limits) -> None:
    """Emphasis syntax, and at most `max_prompt_chunks` 75-token windows (see engine/prompt.py)."""
    from mlx_sd_server.engine.text.prompt import check_prompt  # the engine's own rules; imports this module

    check_prompt(text, name, limits.max_prompt_chunks)


def cover_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The size an image of `size` is resized to before being centre-cropped to width x height (scaled to
    cover the output): the largest intermediate the pipeline's `fit_image` makes."""
    scale = max(width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def _check_images(images: Mapping[str, Image.Image], width: int, height: int, limits: Limits) -> None:
    """Uploads the pipeline can fit to the output without a giant intermediate; a mask the image's size."""
    for name, image in images.items():
        w, h = image.size
        if max(w, h) > limits.max_upload_aspect * min(w, h):
            raise JobError(f"{name} is {w}x{h}: its aspect ratio is over this server's limit of "
                           f"{limits.max_upload_aspect:g}:1", name, "invalid_image_dimensions")
        cover_w, cover_h = cover_size((w, h), width, height)
        if cover_w * cover_h > limits.max_fit_pixels:
            raise JobError(f"{name} ({w}x{h}) would be scaled to {cover_w}x{cover_h} to cover {width}x{height}: "
                           f"over this server's limit of {limits.max_fit_pixels} pixels; send an image closer "
                           "to the output's shape", name, "image_too_large")
    if "mask" in images and "image" in images and images["mask"].size != images["image"].size:
        (mw, mh), (iw, ih) = images["mask"].size, images["image"].size
        raise JobError(f"mask is {mw}x{mh} but image is {iw}x{ih}: they must be the same size", "mask",
                       "invalid_image_dimensions")


def strip_lora_tags(field_name: str, text: str) -> tuple[str, list[tuple[str, float]]]:
    """A prompt without its `<lora:name>` / `<lora:name:weight>` tags (A1111's syntax), and the tags."""
    tags = []
    for match in _LORA_TAG_RE.finditer(text):
        name, _, weight = match[1].partition(":")
        if not name.strip() or ":" in weight:
            raise JobError(f"LoRA tag {shown(match[0])} must be <lora:name> or <lora:name:weight>", field_name,
                           "invalid_value")
        tags.append((name.strip(), _as_float(field_name, weight) if weight.strip() else 1.0))
    return _LORA_TAG_RE.sub("", text), tags


def _parse_loras(value: Any) -> list[tuple[str, float]]:
    """The `loras` field: [{"name": ..., "scale": ...}] (a form sends it as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise JobError("loras must be a JSON array of {\"name\": ..., \"scale\": ...}", "loras",
                           "invalid_type") from None
    if not isinstance(value, list):
        raise JobError(f"loras must be an array of {{name, scale}} objects, got {kind_of(value)}", "loras",
                       "invalid_type")
    loras = []
    for item in value:
        if not isinstance(item, dict) or "name" not in item:
            raise JobError(f"each of loras must be an object with a name (and a scale), got {kind_of(item)}", "loras",
                           "invalid_type")
        if unknown := set(item) - {"name", "scale"}:
            raise JobError(f"loras: unknown key {shown(sorted(unknown)[0])} (an item has name and scale)", "loras",
                           "unknown_field")
        name = _as_str("loras", item["name"]).strip()
        if not name:
            raise JobError("loras: a name must not be empty", "loras", "invalid_value")
        loras.append((name, _as_float("loras", item.get("scale", 1.0))))
    return loras


def _check_loras(loras: list[tuple[str, float, str]], limits: Limits, lora_family: Callable[[str], str] | None,
                 capabilities: Capabilities, model_name: str) -> tuple[tuple[str, float], ...]:
    """Each LoRA named once, weights in range, at most `max_loras`, and each one this model's family's."""
    if len(loras) > limits.max_loras:
        raise JobError(f"{len(loras)} LoRAs: over this server's limit of {limits.max_loras}", loras[-1][2],
                       "out_of_range")
    seen: set[str] = set()
    for name, weight, param in loras:
        if name in seen:
            raise JobError(f"LoRA {shown(name)} is given twice; give it once, with the weight you want", param,
                           "invalid_value")
        seen.add(name)
        if not -LORA_SCALE_LIMIT <= weight <= LORA_SCALE_LIMIT:
            raise JobError(f"LoRA {shown(name)}: weight must be between {-LORA_SCALE_LIMIT:g} and "
                           f"{LORA_SCALE_LIMIT:g}, got {shown(weight)}", param, "out_of_range")
        if lora_family is None:
            raise JobError("LoRAs cannot be used here: no LoRA folder is configured", param, "unsupported_parameter")
        try:
            family = lora_family(name)
        except JobError as error:  # unknown, or not a usable LoRA: name the field it came from
            raise JobError(error.message, param, error.code) from None
        if family != capabilities.family:
            raise JobError(f"LoRA {shown(name)} is for {family} models, and {model_name} is {capabilities.family}",
                           param, "lora_family_mismatch")
    return tuple((name, weight) for name, weight, _ in loras)


def build_job(
    fields: Mapping[str, Any],
    images: Mapping[str, Image.Image] | None = None,
    *,
    limits: Limits = Limits(),
    defaults: ModelDefaults = ModelDefaults(),
    capabilities: Capabilities = Capabilities(),
    model_name: str = "this model",
    lora_family: Callable[[str], str] | None = None,
) -> Job:
    """Validate raw request fields into a Job. Absent fields take the model's defaults; anything the model
    cannot do (per its `capabilities`) is refused here, before the job is queued. `lora_family(name)` is the
    family of LoRA `name`, or a JobError when there is no usable one of that name.

    `fields` must contain only JOB_FIELDS (callers reject or strip others first); values may be typed
    (JSON) or strings (multipart, command line). `images` maps IMAGE_FIELDS to decoded images.
    """
    unknown = set(fields) - set(JOB_FIELDS)
    if unknown:
        name = sorted(unknown)[0]
        raise JobError(f"unknown field {shown(name)}", name, "unknown_field")
    check_field_sizes(fields, limits)
    schema = request_schema(limits)
    images = dict(images or {})
    values: dict[str, Any] = {}

    prompt = fields.get("prompt")
    if prompt is None:
        raise JobError("prompt is required", "prompt", "missing_required_parameter")
    prompt = _as_str("prompt", prompt)
    if not prompt.strip():
        raise JobError("prompt must not be empty", "prompt", "invalid_value")
    values["prompt"] = prompt

    if fields.get("model") not in (None, ""):
        values["model"] = _as_str("model", fields["model"])
    if fields.get("negative_prompt") is not None:
        values["negative_prompt"] = _as_str("negative_prompt", fields["negative_prompt"])
    loras: list[tuple[str, float, str]] = []  # (name, weight, the field it came from)
    for name in ("prompt", "negative_prompt"):
        if name in values:
            values[name], tags = strip_lora_tags(name, values[name])
            loras += [(lora, weight, name) for lora, weight in tags]
            _check_prompt(name, values[name], limits)
    if not values["prompt"].strip():
        raise JobError("prompt must not be empty: it has only LoRA tags", "prompt", "invalid_value")
    if fields.get("loras") not in (None, ""):
        loras += [(lora, weight, "loras") for lora, weight in _parse_loras(fields["loras"])]
    values["loras"] = _check_loras(loras, limits, lora_family, capabilities, model_name)

    n = _as_int("n", fields.get("n", 1))
    _in_range("n", n, schema)
    values["n"] = n

    steps = _as_int("steps", fields.get("steps", defaults.steps))
    _in_range("steps", steps, schema)
    values["steps"] = steps

    cfg_scale = _as_float("cfg_scale", fields.get("cfg_scale", defaults.cfg_scale))
    _in_range("cfg_scale", cfg_scale, schema)
    values["cfg_scale"] = cfg_scale

    for name, choices, default in (
        ("sample_method", SAMPLE_METHODS, defaults.sample_method),
        ("scheduler", SCHEDULERS, defaults.scheduler),
    ):
        choice = _as_str(name, fields.get(name, default)).strip().lower()
        if name == "scheduler" and choice in UNSUPPORTED_SCHEDULERS:
            raise JobError(f"scheduler {shown(choice)} is not supported ({UNSUPPORTED_SCHEDULERS[choice]}); "
                           f"use one of {', '.join(capabilities.schedulers)}", name, "unsupported_scheduler")
        if choice not in choices:
            raise JobError(
                f"{name} must be one of {', '.join(choices)}; got {shown(choice)}", name, f"invalid_{name}"
            )
        supported = capabilities.samplers if name == "sample_method" else capabilities.schedulers
        if choice not in supported:
            raise JobError(f"{model_name} ({capabilities.family}) supports {name} {', '.join(supported)}; "
                           f"got {shown(choice)}", name, f"unsupported_{name}")
        values[name] = choice

    if "guidance" in fields:
        if not capabilities.guidance:
            raise JobError(f"{model_name} has no guidance embedding, so guidance cannot be honoured; "
                           "cfg_scale sets classifier-free guidance", "guidance", "unsupported_parameter")
        guidance = _as_float("guidance", fields["guidance"])
        _in_range("guidance", guidance, schema)
        values["guidance"] = guidance
    elif capabilities.guidance:
        values["guidance"] = defaults.guidance if defaults.guidance is not None else DEFAULT_GUIDANCE

    if fields.get("size") not in (None, ""):
        width, height = parse_size(fields["size"], defaults)
        size_param = "size"
        for name, side in (("width", width), ("height", height)):  # both given: they must say the same
            if name in fields and _as_int(name, fields[name]) != side:
                raise JobError(f"size {shown(fields['size'])} and {name} {shown(fields[name])} disagree; "
                               f"send one of them", name, "invalid_value")
    else:
        width = _as_int("width", fields.get("width", defaults.width))
        height = _as_int("height", fields.get("height", defaults.height))
        size_param = "width" if "width" in fields else "height"
    _check_dimensions(width, height, limits, size_param, capabilities.size_multiple)
    values["width"], values["height"] = width, height

    seed = _as_int("seed", fields.get("seed", 42))
    if seed > schema["seed"]["maximum"]:
        raise JobError(f"seed must be at most {MAX_SEED}, got {shown(seed)}", "seed", "out_of_range")
    values["seed"] = secrets.randbelow(2**32) if seed < 0 else seed

    if "strength" in fields and "image" not in images:
        raise JobError("strength is how much of an image an edit keeps, and this request has no image "
                       "(send it to /v1/images/edits with one)", "strength", "unsupported_parameter")
    strength = _as_float("strength", fields.get("strength", 0.75))
    _in_range("strength", strength, schema)
    values["strength"] = strength

    control_strength = _as_float("control_strength", fields.get("control_strength", 0.9))
    _in_range("control_strength", control_strength, schema)
    values["control_strength"] = control_strength

    preprocess = _as_str("control_preprocess", fields.get("control_preprocess", "none")).strip().lower()
    if preprocess not in schema["control_preprocess"]["enum"]:
        raise JobError(
            f"control_preprocess must be 'none' or 'canny', got {shown(preprocess)}",
            "control_preprocess", "invalid_value",
        )
    if "apply_canny_preprocessor" in fields:  # the reference's name for control_preprocess=canny
        canny = _as_bool("apply_canny_preprocessor", fields["apply_canny_preprocessor"])
        if "control_preprocess" in fields and (preprocess == "canny") != canny:
            raise JobError("apply_canny_preprocessor and control_preprocess disagree; send one of them",
                           "apply_canny_preprocessor", "invalid_value")
        preprocess = "canny" if canny else preprocess
    values["control_preprocess"] = preprocess

    if "style_ratio" in fields:
        raise JobError("style_ratio is PhotoMaker's, and this server has no PhotoMaker", "style_ratio",
                       "unsupported_parameter")
    for name, choices in OPENAI_HINTS.items():
        if name in fields:
            value = _as_str(name, fields[name])
            if choices is not None and value.strip().lower() not in choices:
                raise JobError(f"{name} must be one of {', '.join(choices)}; got {shown(value)}", name,
                               "invalid_value")
    if str(fields.get("background", "")).strip().lower() == "transparent":
        raise JobError("background 'transparent' cannot be honoured: no model here makes transparent images; "
                       "use auto or opaque", "background", "unsupported_parameter")

    unknown_images = set(images) - set(IMAGE_FIELDS)
    if unknown_images:
        name = sorted(unknown_images)[0]
        raise JobError(f"unknown image field {shown(name)}", name, "unknown_field")
    if "mask" in images and "image" not in images:
        raise JobError("mask needs an image to edit", "mask", "missing_required_parameter")
    for name, supported, what in (("image", capabilities.img2img, "image-to-image"),
                                  ("mask", capabilities.inpainting, "inpainting")):
        if name in images and not supported:
            raise JobError(f"{model_name} ({capabilities.family}) cannot do {what}", name, "unsupported_parameter")
    if "control_image" in images and not capabilities.controlnet:
        raise JobError(f"model {model_name!r} has no ControlNet attached (serve it with --control-net)",
                       "control_image", "controlnet_unavailable")
    _check_images(images, width, height, limits)
    values["init_image"] = images.get("image")
    values["mask"] = images.get("mask")
    values["control_image"] = images.get("control_image")
    return Job(**values)


def replace(job: Job, **changes: Any) -> Job:
    """A copy of `job` with some fields changed (jobs are immutable)."""
    return dataclasses.replace(job, **changes)
