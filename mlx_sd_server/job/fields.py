"""The one table of request fields, and what is made from it.

Each `Field` says a request field's name, JSON type, default, bounds, choices and help once. From the table
come the `Job` dataclass's defaults, the request's JSON Schema (`request_schema`, published at /openapi.json),
`generate`'s command-line options (cli.py) and the coercion `build_job` applies (`COERCE`, per type). A
model's `ModelDefaults` (from its manifest, else its family variant's) overlay the table's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from PIL import Image

from mlx_sd_server.engine.errors import JobError, kind_of, shown
from mlx_sd_server.engine.families.spec import T5_TOKEN_LIMIT, Capabilities, ModelDefaults
from mlx_sd_server.engine.hires import LATENT_UPSCALE_MODES
from mlx_sd_server.engine.sampling.samplers import SAMPLE_METHODS
from mlx_sd_server.engine.sampling.schedules import SCHEDULERS

MAX_SEED = 2**63 - 1
LORA_SCALE_LIMIT = 10.0  # |weight|: A1111's LoRAs are used from about -2 to 2
HIRES_MAX_SCALE = 4.0  # A1111's slider ends at 4


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
    max_images: int = 16  # input images of one edit (`image` given several times): gpt-image-1's limit


# --- coercion: a JSON value or a form's / command line's text -> the field's type ------------------------

_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_text(name: str, value: str) -> str:
    """Refuse a string that is not Unicode text: JSON's `\\ud800` escape gives a lone surrogate, which no
    encoder (tokenizer, PNG text, log) can write."""
    if not value.isascii() and (surrogate := _SURROGATE_RE.search(value)):
        raise JobError(
            f"{name} is not valid Unicode text: it contains a lone surrogate ({shown(surrogate[0])})",
            name,
            "invalid_value",
        )
    return value


def as_int(name: str, value: Any) -> int:
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


def as_float(name: str, value: Any) -> float:
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


def as_bool(name: str, value: Any) -> bool:
    """A JSON boolean, or a form field's true/false (also 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise JobError(f"{name} must be true or false, got {shown(value)}", name, "invalid_type")


def as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise JobError(f"{name} must be a string, got {kind_of(value)}", name, "invalid_type")
    return check_text(name, value)


_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")


def as_keep_alive(name: str, value: Any) -> float:
    """Ollama's keep_alive: seconds as a number (or its text), or a Go duration ("5m", "1h30m", "90s");
    negative: kept until unloaded (math.inf); 0: unloaded when the job ends."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART_RE.findall(body)
            if not parts or "".join(a + b for a, b in parts) != body:
                raise JobError(
                    f'{name} must be seconds or a duration such as "5m", "1h" or "90s" (-1: keep loaded), '
                    f"got {shown(value)}",
                    name,
                    "invalid_value",
                ) from None
            units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
            seconds = sign * sum(float(number) * units[unit] for number, unit in parts)
    else:
        raise JobError(
            f"{name} must be a number of seconds or a duration string, got {kind_of(value)}", name, "invalid_type"
        )
    if math.isnan(seconds):
        raise JobError(f"{name} must be a number, got {shown(value)}", name, "invalid_value")
    return math.inf if seconds < 0 else seconds


COERCE: dict[str, Callable[[str, Any], Any]] = {
    "integer": as_int,
    "number": as_float,
    "boolean": as_bool,
    "string": as_str,
    "duration": as_keep_alive,
}
# JSON Schema's type for ours, where they differ
JSON_TYPES: dict[str, Any] = {"duration": ["string", "number"]}


# --- the table ---------------------------------------------------------------------------------------

# A bound: a number, or the name of the `Limits` attribute that sets it on this server.
Bound = int | float | str | None


@dataclass(frozen=True)
class Field:
    """One request field. `type` is its JSON Schema type; `choices` are compared stripped and lower-cased."""

    name: str
    type: str  # string | integer | number | boolean | array | duration (seconds, or text such as "5m")
    help: str
    default: Any = None  # None: absent unless a rule or the model gives one
    minimum: Bound = None
    maximum: Bound = None  # for an array: its most items
    choices: tuple[str, ...] | None = None
    invalid_choice: str = "invalid_value"  # the error code of a value not in `choices`
    # Of `choices`, what this model can do; the rest are refused as `unsupported_<name>`.
    supported: Callable[[Capabilities], tuple[str, ...]] | None = None
    refused: Mapping[str, str] = field(default_factory=dict)  # choices we know and do not have: value -> why
    required: bool = False  # and, for a string, not blank
    prompt: bool = False  # a prompt: Limits.max_prompt_chars, else Limits.max_field_chars (strings)
    blank_is_absent: bool = False  # "" means absent (a form's empty input)
    ranged: bool = True  # build_job checks minimum/maximum itself; False: a rule does (sizes, LoRA counts)
    multiple_of: int | None = None  # published; the model's size multiple is checked (Capabilities)
    items: Callable[[Limits], dict[str, Any]] | None = None  # an array's item schema
    parse: Callable[[str, Any], Any] | None = None  # coercion, where the type's (COERCE) is not enough
    cli: bool = True  # `generate` has an option for it (`--` + the name with dashes)

    def coerce(self, value: Any) -> Any:
        return (self.parse or COERCE[self.type])(self.name, value)

    def bounds(self, limits: Limits) -> tuple[float | None, float | None]:
        def resolve(bound: Bound) -> float | None:
            return getattr(limits, bound) if isinstance(bound, str) else bound

        return resolve(self.minimum), resolve(self.maximum)

    def schema(self, limits: Limits) -> dict[str, Any]:
        """This field as JSON Schema, with this server's limits."""
        out: dict[str, Any] = {"type": JSON_TYPES.get(self.type, self.type)}
        if self.type == "string":
            out["maxLength"] = limits.max_prompt_chars if self.prompt else limits.max_field_chars
            if self.required:
                out["minLength"] = 1
        low, high = self.bounds(limits)
        if self.type == "array":
            out.update({"maxItems": high, "items": self.items(limits) if self.items else {}})
        else:
            out.update({key: bound for key, bound in (("minimum", low), ("maximum", high)) if bound is not None})
        if self.multiple_of:
            out["multipleOf"] = self.multiple_of
        if self.choices is not None:
            out["enum"] = list(self.choices)
        if self.name in MODEL_FIELDS:
            out["description"] = f"{self.help} (default: the model's)"
        else:
            out["description"] = self.help
            if self.default is not None:
                out["default"] = self.default
        return out


MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelDefaults))  # fields a model's defaults set
GENERIC = ModelDefaults()  # what a model without its own defaults uses


def parse_loras(name: str, value: Any) -> list[tuple[str, float]]:
    """The `loras` field: [{"name": ..., "scale": ...}] (a form sends it as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise JobError(
                f'{name} must be a JSON array of {{"name": ..., "scale": ...}}', name, "invalid_type"
            ) from None
    if not isinstance(value, list):
        raise JobError(
            f"{name} must be an array of {{name, scale}} objects, got {kind_of(value)}", name, "invalid_type"
        )
    loras = []
    for item in value:
        if not isinstance(item, dict) or "name" not in item:
            raise JobError(
                f"each of {name} must be an object with a name (and a scale), got {kind_of(item)}", name, "invalid_type"
            )
        if unknown := set(item) - {"name", "scale"}:
            raise JobError(
                f"{name}: unknown key {shown(sorted(unknown)[0])} (an item has name and scale)", name, "unknown_field"
            )
        lora = as_str(name, item["name"]).strip()
        if not lora:
            raise JobError(f"{name}: a name must not be empty", name, "invalid_value")
        loras.append((lora, as_float(name, item.get("scale", 1.0))))
    return loras


def lora_items(limits: Limits) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "maxLength": limits.max_field_chars, "minLength": 1},
            "scale": {"type": "number", "minimum": -LORA_SCALE_LIMIT, "maximum": LORA_SCALE_LIMIT, "default": 1.0},
        },
    }


# OpenAI fields accepted with the values OpenAI documents, and without effect: the model's own settings
# decide quality and style; `user` is for the client's abuse tracking; no moderation is performed;
# images are opaque (`background: transparent` is refused: no model here makes an alpha channel);
# `input_fidelity` (edits) asks gpt-image-1 for effort on the inputs' faces and details, and no model here
# has such a setting: every input image is read as it is (it is refused without one, see validation.py).
OPENAI_HINTS: dict[str, tuple[str, ...] | None] = {
    "quality": ("auto", "standard", "hd", "low", "medium", "high"),
    "style": ("vivid", "natural"),
    "user": None,
    "moderation": ("auto", "low"),
    "background": ("auto", "opaque", "transparent"),
    "input_fidelity": ("high", "low"),
}

FIELDS: tuple[Field, ...] = (
    Field(
        "model",
        "string",
        "a served model's name (default: the server's default model)",
        blank_is_absent=True,
        cli=False,
    ),  # `generate --model` names a model to load instead
    Field(
        "prompt",
        "string",
        "what the image shows; A1111 emphasis syntax, <lora:name:weight> tags",
        required=True,
        prompt=True,
    ),
    Field("negative_prompt", "string", "what it should not show", "", prompt=True),
    Field("n", "integer", "how many images", 1, 1, "max_n"),
    Field("steps", "integer", "sampling steps", GENERIC.steps, 1, "max_steps"),
    Field("cfg_scale", "number", "classifier-free guidance; <= 1 is off", GENERIC.cfg_scale, 0, 50),
    Field(
        "sample_method",
        "string",
        "the sampler",
        GENERIC.sample_method,
        choices=SAMPLE_METHODS,
        invalid_choice="invalid_sample_method",
        supported=attrgetter("samplers"),
    ),
    Field(
        "scheduler",
        "string",
        "the noise schedule",
        GENERIC.scheduler,
        choices=SCHEDULERS,
        invalid_choice="invalid_scheduler",
        supported=attrgetter("schedulers"),
        refused={"gits": "GITS needs its paper's precomputed per-model step tables, which are not implemented"},
    ),
    Field("size", "string", "WIDTHxHEIGHT, e.g. 512x768, or auto (the model's size)", blank_is_absent=True),
    Field("width", "integer", "image width", GENERIC.width, "min_side", "max_side", ranged=False, multiple_of=8),
    Field("height", "integer", "image height", GENERIC.height, "min_side", "max_side", ranged=False, multiple_of=8),
    Field("seed", "integer", "the first image's seed; image i gets seed + i; negative: random", 42, maximum=MAX_SEED),
    Field(
        "guidance",
        "number",
        "distilled guidance, for models with a guidance embedding (FLUX.1-dev)",
        GENERIC.guidance,
        0,
        100,
    ),
    Field(
        "max_sequence_length",
        "integer",
        "T5's tokens per prompt, for models with a T5 text encoder (FLUX.1, SD3): a longer prompt is cut there, "
        "a shorter one padded (default: the model's, as converted)",
        minimum=1,
        maximum=T5_TOKEN_LIMIT,
        ranged=False,  # the model's own maximum is checked (Capabilities.text_length)
    ),
    Field(
        "strength", "number", "edits: how much of the image is repainted (the share of the schedule re-run)", 0.75, 0, 1
    ),
    Field(
        "hr_scale",
        "number",
        "hires fix (A1111's enable_hr): the image is made at the requested size, upscaled by this factor and "
        "refined by img2img at the larger size; absent: off",
        minimum=1,
        maximum=HIRES_MAX_SCALE,
    ),
    Field(
        "hr_upscaler",
        "string",
        "hires fix: how the first image is enlarged: an upscaler (GET /v1/upscalers lists them), or "
        + ", ".join(LATENT_UPSCALE_MODES)
        + " (the latents, interpolated, as A1111's Latent modes)",
        "latent",
        blank_is_absent=True,
    ),
    Field(
        "hr_steps",
        "integer",
        "hires fix: the second pass's steps (0 or absent: the job's steps)",
        minimum=0,
        maximum="max_steps",
    ),
    Field(
        "hr_strength",
        "number",
        "hires fix: how much of the enlarged image the second pass repaints (A1111's denoising strength)",
        0.7,
        0,
        1,
    ),
    Field("hr_prompt", "string", "hires fix: the second pass's prompt (default: the prompt)", prompt=True),
    Field(
        "hr_negative_prompt",
        "string",
        "hires fix: the second pass's negative prompt (default: the negative prompt)",
        prompt=True,
    ),
    Field(
        "control_net",
        "string",
        "the ControlNet to steer with (GET /v1/controlnets lists them; default: the model's own, if it has one)",
        blank_is_absent=True,
        cli=False,  # `generate --control-net` names one to load
    ),
    Field("control_strength", "number", "how strongly the ControlNet steers", 0.9, 0, 10),
    Field(
        "control_preprocess",
        "string",
        "how the control image is prepared (canny: a photo's edges are found)",
        "none",
        choices=("none", "canny"),
    ),
    Field("apply_canny_preprocessor", "boolean", "the reference's control_preprocess=canny", cli=False),
    Field("style_ratio", "number", "PhotoMaker's: refused (400), there is none here", cli=False),
    Field(
        "loras",
        "array",
        "LoRAs to apply (GET /v1/loras lists them), besides <lora:name:weight> prompt tags",
        maximum="max_loras",
        blank_is_absent=True,
        ranged=False,
        items=lora_items,
        parse=parse_loras,
        cli=False,
    ),
    Field(
        "keep_alive",
        "duration",
        'how long the model stays loaded after this job, as Ollama\'s: seconds or "5m", "1h"; 0: unload it '
        "when the job ends; -1: keep it loaded (default: the server's --keep-alive)",
        cli=False,
    ),
    *(
        Field(name, "string", "OpenAI's: accepted, without effect", choices=choices, cli=False)
        for name, choices in OPENAI_HINTS.items()
    ),
)
FIELD: dict[str, Field] = {f.name: f for f in FIELDS}
JOB_FIELDS = tuple(FIELD)  # the fields a request may carry (images arrive separately, decoded)
IMAGE_FIELDS: dict[str, str] = {  # image fields, with their help
    "image": "the image to edit (img2img; with a mask, inpainting); on an instruction-edit model, the input "
    "images (repeat it, up to the model's limit), which the prompt speaks of",
    "mask": "inpainting mask: white (or transparent) is repainted",
    "control_image": "the ControlNet's input image",
}
IMAGE_LISTS = ("image",)  # the image fields a request may give several times, in order (max_images)
PROMPT_FIELDS = tuple(f.name for f in FIELDS if f.prompt)


def request_schema(limits: Limits = Limits()) -> dict[str, dict[str, Any]]:
    """Every job field a request may carry as JSON Schema. build_job checks values against these bounds
    and choices, and /openapi.json publishes them (api/openapi.py): one description, so they cannot drift."""
    return {f.name: f.schema(limits) for f in FIELDS}


def default(name: str) -> Any:
    """A field's default where no model says otherwise."""
    return FIELD[name].default


@dataclass(frozen=True)
class Job:
    """A fully resolved generation request. Images are RGB (`mask`: L, 255 = repaint)."""

    prompt: str
    model: str | None = default("model")
    negative_prompt: str = default("negative_prompt")
    n: int = default("n")
    steps: int = default("steps")
    cfg_scale: float = default("cfg_scale")
    sample_method: str = default("sample_method")
    scheduler: str = default("scheduler")
    width: int = default("width")
    height: int = default("height")
    seed: int = default("seed")
    guidance: float | None = default("guidance")
    max_sequence_length: int | None = default("max_sequence_length")  # T5 models only: None on the others
    # img2img / inpainting (edits)
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float = default("strength")
    mask: Image.Image | None = field(default=None, repr=False)
    # Instruction edits: the input images the model reads as references (in order), beside the prompt
    reference_images: tuple[Image.Image, ...] = field(default=(), repr=False)
    # The uploaded inputs as (image field, short sha256 of the file), in order, for the results' metadata
    input_hashes: tuple[tuple[str, str], ...] = ()
    # ControlNet
    control_image: Image.Image | None = field(default=None, repr=False)
    control_strength: float = default("control_strength")
    control_preprocess: str = default("control_preprocess")
    control_net: str | None = default("control_net")  # by name; None: the model's own, if it has one
    # Hires fix: None, or the second pass's size (hr_scale x the first's, on the model's size grid)
    hr_scale: float | None = default("hr_scale")
    hr_upscaler: str = default("hr_upscaler")
    hr_steps: int | None = default("hr_steps")  # None or 0: `steps`
    hr_strength: float = default("hr_strength")
    hr_prompt: str | None = default("hr_prompt")  # None: `prompt`
    hr_negative_prompt: str | None = default("hr_negative_prompt")
    hr_width: int | None = None
    hr_height: int | None = None
    # seconds the model stays loaded after this job (math.inf: kept); None: the server's --keep-alive
    keep_alive: float | None = default("keep_alive")
    # LoRAs (name in the LoRA folder, weight), from `<lora:name:weight>` tags (stripped from the prompts
    # above) and the `loras` field
    loras: tuple[tuple[str, float], ...] = ()

    def seeds(self) -> list[int]:
        """Image i of the batch uses seed + i, so any single image can be reproduced with n=1."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]

    def first_pass(self) -> Job:
        """A hires job's first pass: the job at its own size, without the hires fix."""
        return dataclasses.replace(self, hr_scale=None, hr_width=None, hr_height=None)

    def second_pass(self, index: int, init_image: Image.Image | None) -> Job:
        """A hires job's second pass for image `index`: one img2img of `init_image` (None: the pipeline starts
        from upscaled latents) at the hires size, with that image's seed."""
        assert self.hr_width is not None and self.hr_height is not None, "build_job sets them with hr_scale"
        return dataclasses.replace(
            self.first_pass(),
            n=1,
            seed=self.seeds()[index],
            width=self.hr_width,
            height=self.hr_height,
            steps=self.hr_steps or self.steps,
            strength=self.hr_strength,
            prompt=self.prompt if self.hr_prompt is None else self.hr_prompt,
            negative_prompt=self.negative_prompt if self.hr_negative_prompt is None else self.hr_negative_prompt,
            init_image=init_image,
        )
