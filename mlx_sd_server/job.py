"""The one job type: every generation request, from HTTP or the command line, becomes a `Job`.

This module is the single place where request defaults and limits live. `build_job` takes raw field
values (typed JSON values or multipart strings) plus already-decoded images and returns an immutable,
fully-validated `Job`, or raises `JobError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from PIL import Image

SAMPLE_METHODS = (
    "euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "ipndm", "ipndm_v", "lcm",
)
SCHEDULERS = ("discrete", "karras", "exponential", "ays", "sgm_uniform", "simple", "trailing", "lcm")

MAX_SEED = 2**63 - 1
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's, and stable-diffusion.cpp's --guidance default


class JobError(ValueError):
    """A request field is invalid. Carries what the HTTP layer needs for OpenAI's error envelope."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Server-configurable bounds on a job."""

    max_n: int = 10
    max_steps: int = 150
    max_pixels: int = 2048 * 2048
    min_side: int = 64
    max_side: int = 4096


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model defaults (turbo/LCM models need few steps and little guidance; FLUX.1-dev has `guidance`)."""

    steps: int = 20
    cfg_scale: float = 7.0
    sample_method: str = "euler_a"
    scheduler: str = "discrete"
    width: int = 512
    height: int = 512
    guidance: float | None = None  # distilled guidance, for models with a guidance embedding


@dataclass(frozen=True)
class Capabilities:
    """What a model can do, declared by its family (engine/families) and checked before a job is queued.
    The defaults constrain nothing beyond Stable Diffusion's rules."""

    family: str = "sd1"
    samplers: tuple[str, ...] = SAMPLE_METHODS
    schedulers: tuple[str, ...] = SCHEDULERS
    guidance: bool = False  # has a distilled guidance embedding (the `guidance` field)
    img2img: bool = True
    inpainting: bool = True
    controlnet: bool = True  # a ControlNet is attached
    size_multiple: int = 8  # image sides must be multiples of this (VAE factor x patch size)


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

    def seeds(self) -> list[int]:
        """Image i of the batch uses seed + i, so any single image can be reproduced with n=1."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]


# OpenAI fields accepted with the values OpenAI documents, and without effect: the model's own settings
# decide quality and style; `user` is for the client's abuse tracking.
OPENAI_HINTS = {"quality": ("auto", "standard", "hd", "low", "medium", "high"), "style": ("vivid", "natural"),
                "user": None}
# The reference's schedulers that we do not have, and why (stable-diffusion.cpp's names).
UNSUPPORTED_SCHEDULERS = {"gits": "GITS needs its paper's precomputed per-model step tables, which are not implemented"}

# Fields a request may carry, with the job attribute each feeds. Images arrive separately, decoded.
JOB_FIELDS = (
    "model", "prompt", "negative_prompt", "n", "steps", "cfg_scale", "sample_method", "scheduler",
    "size", "width", "height", "seed", "strength", "control_strength", "control_preprocess", "guidance",
    "apply_canny_preprocessor", "style_ratio", *OPENAI_HINTS,
)
IMAGE_FIELDS = ("image", "mask", "control_image")

_LORA_TAG_RE = re.compile(r"<lora:[^>]*>", re.IGNORECASE)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise JobError(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise JobError(f"{name} must be an integer, got {value!r}", name, "invalid_type")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise JobError(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise JobError(f"{name} must be a number, got {value!r}", name, "invalid_type") from None
    else:
        raise JobError(f"{name} must be a number, got {value!r}", name, "invalid_type")
    if not math.isfinite(out):
        raise JobError(f"{name} must be finite, got {value!r}", name, "invalid_value")
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
    raise JobError(f"{name} must be true or false, got {value!r}", name, "invalid_type")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise JobError(f"{name} must be a string, got {type(value).__name__}", name, "invalid_type")
    return value


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise JobError(f"{name} must be between {lo} and {hi}, got {value}", name, "out_of_range")


def parse_size(value: Any, defaults: ModelDefaults = _DEFAULTS) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height), as the reference documents (not as it parses); OpenAI's "auto" is
    the model's native size."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return defaults.width, defaults.height
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise JobError(f"size must be WIDTHxHEIGHT, got {value!r}", "size", "invalid_size")
    return int(match.group(1)), int(match.group(2))


def _check_dimensions(width: int, height: int, limits: Limits, param: str, multiple: int) -> None:
    for side_name, side in (("width", width), ("height", height)):
        if side % multiple:
            raise JobError(f"{side_name} must be a multiple of {multiple} for this model, got {side}", param,
                           "invalid_size")
        if not limits.min_side <= side <= limits.max_side:
            raise JobError(
                f"{side_name} must be between {limits.min_side} and {limits.max_side}, got {side}",
                param, "invalid_size",
            )
    if width * height > limits.max_pixels:
        raise JobError(
            f"{width}x{height} is {width * height} pixels, over this server's limit of {limits.max_pixels}",
            param, "invalid_size",
        )


def build_job(
    fields: Mapping[str, Any],
    images: Mapping[str, Image.Image] | None = None,
    *,
    limits: Limits = Limits(),
    defaults: ModelDefaults = ModelDefaults(),
    capabilities: Capabilities = Capabilities(),
    model_name: str = "this model",
) -> Job:
    """Validate raw request fields into a Job. Absent fields take the model's defaults; anything the model
    cannot do (per its `capabilities`) is refused here, before the job is queued.

    `fields` must contain only JOB_FIELDS (callers reject or strip others first); values may be typed
    (JSON) or strings (multipart, command line). `images` maps IMAGE_FIELDS to decoded images.
    """
    unknown = set(fields) - set(JOB_FIELDS)
    if unknown:
        name = sorted(unknown)[0]
        raise JobError(f"unknown field {name!r}", name, "unknown_field")
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
    for name in ("prompt", "negative_prompt"):
        if _LORA_TAG_RE.search(values.get(name, "")):  # rather than encode the tag as words
            raise JobError("LoRA tags (<lora:name:weight>) are not supported by this version", name,
                           "unsupported_parameter")

    n = _as_int("n", fields.get("n", 1))
    _in_range("n", n, 1, limits.max_n)
    values["n"] = n

    steps = _as_int("steps", fields.get("steps", defaults.steps))
    _in_range("steps", steps, 1, limits.max_steps)
    values["steps"] = steps

    cfg_scale = _as_float("cfg_scale", fields.get("cfg_scale", defaults.cfg_scale))
    _in_range("cfg_scale", cfg_scale, 0.0, 50.0)
    values["cfg_scale"] = cfg_scale

    for name, choices, default in (
        ("sample_method", SAMPLE_METHODS, defaults.sample_method),
        ("scheduler", SCHEDULERS, defaults.scheduler),
    ):
        choice = _as_str(name, fields.get(name, default)).strip().lower()
        if name == "scheduler" and choice in UNSUPPORTED_SCHEDULERS:
            raise JobError(f"scheduler {choice!r} is not supported ({UNSUPPORTED_SCHEDULERS[choice]}); "
                           f"use one of {', '.join(capabilities.schedulers)}", name, "unsupported_scheduler")
        if choice not in choices:
            raise JobError(
                f"{name} must be one of {', '.join(choices)}; got {choice!r}", name, f"invalid_{name}"
            )
        supported = capabilities.samplers if name == "sample_method" else capabilities.schedulers
        if choice not in supported:
            raise JobError(f"{model_name} ({capabilities.family}) supports {name} {', '.join(supported)}; "
                           f"got {choice!r}", name, f"unsupported_{name}")
        values[name] = choice

    if "guidance" in fields:
        if not capabilities.guidance:
            raise JobError(f"{model_name} has no guidance embedding, so guidance cannot be honoured; "
                           "cfg_scale sets classifier-free guidance", "guidance", "unsupported_parameter")
        guidance = _as_float("guidance", fields["guidance"])
        _in_range("guidance", guidance, 0.0, 100.0)
        values["guidance"] = guidance
    elif capabilities.guidance:
        values["guidance"] = defaults.guidance if defaults.guidance is not None else DEFAULT_GUIDANCE

    if fields.get("size") not in (None, ""):
        width, height = parse_size(fields["size"], defaults)
        size_param = "size"
    else:
        width = _as_int("width", fields.get("width", defaults.width))
        height = _as_int("height", fields.get("height", defaults.height))
        size_param = "width" if "width" in fields else "height"
    _check_dimensions(width, height, limits, size_param, capabilities.size_multiple)
    values["width"], values["height"] = width, height

    seed = _as_int("seed", fields.get("seed", 42))
    if seed > MAX_SEED:
        raise JobError(f"seed must be at most {MAX_SEED}, got {seed}", "seed", "out_of_range")
    values["seed"] = secrets.randbelow(2**32) if seed < 0 else seed

    strength = _as_float("strength", fields.get("strength", 0.75))
    _in_range("strength", strength, 0.0, 1.0)
    values["strength"] = strength

    control_strength = _as_float("control_strength", fields.get("control_strength", 0.9))
    _in_range("control_strength", control_strength, 0.0, 10.0)
    values["control_strength"] = control_strength

    preprocess = _as_str("control_preprocess", fields.get("control_preprocess", "none")).strip().lower()
    if preprocess not in ("none", "canny"):
        raise JobError(
            f"control_preprocess must be 'none' or 'canny', got {preprocess!r}",
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
                raise JobError(f"{name} must be one of {', '.join(choices)}; got {value!r}", name, "invalid_value")

    unknown_images = set(images) - set(IMAGE_FIELDS)
    if unknown_images:
        name = sorted(unknown_images)[0]
        raise JobError(f"unknown image field {name!r}", name, "unknown_field")
    if "mask" in images and "image" not in images:
        raise JobError("mask needs an image to edit", "mask", "missing_required_parameter")
    for name, supported, what in (("image", capabilities.img2img, "image-to-image"),
                                  ("mask", capabilities.inpainting, "inpainting")):
        if name in images and not supported:
            raise JobError(f"{model_name} ({capabilities.family}) cannot do {what}", name, "unsupported_parameter")
    if "control_image" in images and not capabilities.controlnet:
        raise JobError(f"model {model_name!r} has no ControlNet attached (serve it with --control-net)",
                       "control_image", "controlnet_unavailable")
    values["init_image"] = images.get("image")
    values["mask"] = images.get("mask")
    values["control_image"] = images.get("control_image")
    return Job(**values)


def replace(job: Job, **changes: Any) -> Job:
    """A copy of `job` with some fields changed (jobs are immutable)."""
    return dataclasses.replace(job, **changes)
