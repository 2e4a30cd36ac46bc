"""`build_job`: raw request fields -> a checked `Job`, or a `JobError` naming the field, before any queue.

Every field is read by the table (fields.py: type, choices, bounds); what involves more than one field, the
model or the images is a small named rule below. Everything that bounds a job's work (prompt length, image
sizes, the size of what an upload is scaled to, a schedule's step limit, the network's largest side) is
checked here, so no request can hold the worker for long or fail in it by its shape alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from PIL import Image

from mlx_sd_server.engine.errors import JobError, shown
from mlx_sd_server.engine.families.spec import DEFAULT_GUIDANCE, Capabilities, ModelDefaults
from mlx_sd_server.engine.hires import LATENT_UPSCALE_MODES
from mlx_sd_server.engine.sampling.schedules import step_limit
from mlx_sd_server.engine.text.prompt import check_prompt
from mlx_sd_server.job.fields import (
    FIELD,
    FIELDS,
    IMAGE_FIELDS,
    LORA_SCALE_LIMIT,
    PROMPT_FIELDS,
    Field,
    Job,
    Limits,
    as_float,
)

_LORA_TAG_RE = re.compile(r"(\s*)<lora:([^>]*)>(\s*)", re.IGNORECASE)
# A few-step LoRA by its released name (Qwen-Image-Lightning-8steps, SDXL-Lightning 4-step, Hyper-SD 8-steps): its
# step count; such LoRAs are distilled to run without CFG.
_FEW_STEP_LORA_RE = re.compile(r"(lightning|hyper|turbo).*?(\d{1,2})[-_ ]?steps?(?![a-z])", re.IGNORECASE)
_SIZE_RE = re.compile(r"^\s*(\d{1,9})\s*[xX×]\s*(\d{1,9})\s*$")
_JOB_ATTRIBUTES = frozenset(f.name for f in dataclasses.fields(Job))

LoRAFamily = Callable[[str], str]  # a LoRA's name -> its family, or a JobError when there is none usable


def build_job(
    fields: Mapping[str, Any],
    images: Mapping[str, Image.Image | Sequence[Image.Image]] | None = None,
    *,
    limits: Limits = Limits(),
    defaults: ModelDefaults = ModelDefaults(),
    capabilities: Capabilities = Capabilities(),
    model_name: str = "this model",
    lora_family: LoRAFamily | None = None,
    input_hashes: Sequence[tuple[str, str]] = (),
    optional: Collection[str] = (),
    upscalers: Collection[str] = (),
) -> Job:
    """Validate raw request fields into a Job. Absent fields take the model's `defaults`, else the table's;
    anything the model cannot do (per its `capabilities`) is refused here, before the job is queued.
    `lora_family(name)` is the family of LoRA `name`, or a JobError when there is no usable one of that name.

    `fields` may hold only JOB_FIELDS (typed JSON values, or strings from a form or the command line);
    `images` maps IMAGE_FIELDS to decoded images, `image` to one or, in order, several (IMAGE_LISTS);
    `input_hashes` are the uploads' (field, short sha256) for the metadata (images.py: short_sha256);
    `optional`: required fields this route lets be absent or blank (a variation's prompt); `upscalers`: the
    upscalers' names a hires fix may use (`hr_upscaler`) beside the latent modes.
    """
    inputs, other = split_images(images or {})
    present = {**other, **({"image": inputs[0]} if inputs else {})}
    given = given_fields(fields, present, optional)
    check_field_sizes(given, limits)
    refuse_unusable(given, present, capabilities, model_name)
    check_inputs(given, inputs, "mask" in other, limits, capabilities, model_name)
    values = read_fields({**overlay(defaults), **given}, limits, capabilities, model_name, optional)
    tags = strip_prompt_tags(values, limits)
    hires_tags = [tag for tag in tags if tag[2] in HIRES_PROMPTS]
    values["loras"] = check_loras(
        [tag for tag in tags if tag not in hires_tags]
        + [(name, weight, "loras") for name, weight in values.get("loras", [])],
        limits,
        lora_family,
        capabilities,
        model_name,
    )
    values.update({k: v for k, v in few_step_defaults(values["loras"]).items() if k not in given})
    values["guidance"] = guidance(values, capabilities)
    values["max_sequence_length"] = text_length(values, capabilities, model_name)
    first = inputs[0].size if inputs else None
    values["width"], values["height"] = image_size(given, values, defaults, limits, capabilities, first)
    check_step_limit(values)
    values["hr_width"], values["hr_height"] = hires(given, values, present, hires_tags, limits, capabilities, upscalers)
    values["seed"] = seed(values["seed"])
    values["control_preprocess"] = control_preprocess(given, values)
    if capabilities.references and "mask" not in other:  # an instruction edit: every input is a reference
        init_image, references = None, inputs
    else:  # img2img / inpainting; an instruction-edit model's inpainting reads the other inputs as references
        init_image, references = (inputs[0], inputs[1:]) if inputs else (None, ())
    check_images(labelled(inputs, init_image is not None, other), values["width"], values["height"], limits)
    return Job(
        **{name: value for name, value in values.items() if name in _JOB_ATTRIBUTES},
        init_image=init_image,
        mask=other.get("mask"),
        reference_images=references,
        control_image=other.get("control_image"),
        input_hashes=tuple(input_hashes),
    )


def split_images(
    images: Mapping[str, Image.Image | Sequence[Image.Image]],
) -> tuple[tuple[Image.Image, ...], dict[str, Image.Image]]:
    """The input images (`image`: one, or several in order) and the other image fields' one image each."""
    inputs: tuple[Image.Image, ...] = ()
    other: dict[str, Image.Image] = {}
    for name, value in images.items():
        if name == "image":
            inputs = (value,) if isinstance(value, Image.Image) else tuple(value)
        elif isinstance(value, Image.Image):
            other[name] = value
        else:
            raise TypeError(f"{name} is one image, not several")
    return inputs, other


def overlay(defaults: ModelDefaults) -> dict[str, Any]:
    """Every field's default: the model's over the table's (None: no default; a model's None: the table's)."""
    own = {name: value for name, value in dataclasses.asdict(defaults).items() if value is not None}
    return {**{f.name: f.default for f in FIELDS}, **own}


# --- the table's part ----------------------------------------------------------------------------------


def given_fields(
    fields: Mapping[str, Any], images: Mapping[str, Image.Image], optional: Collection[str] = ()
) -> dict[str, Any]:
    """The fields a request gives (None, and "" where the table says so, are absent), unknown names refused."""
    for names, known, what in ((fields, FIELD, "field"), (images, IMAGE_FIELDS, "image field")):
        if unknown := sorted(set(names) - set(known)):
            raise JobError(f"unknown {what} {shown(unknown[0])}", unknown[0], "unknown_field")
    given = {
        name: value
        for name, value in fields.items()
        if value is not None and not (value == "" and FIELD[name].blank_is_absent)
    }
    for f in FIELDS:
        if f.required and f.name not in given and f.name not in optional:
            raise JobError(f"{f.name} is required", f.name, "missing_required_parameter")
    return given


def check_field_sizes(fields: Mapping[str, Any], limits: Limits) -> None:
    """Text fields within their limits: prompts in `max_prompt_chars`, any other in `max_field_chars`.
    Cheap (lengths only), so callers may run it before anything else reads the fields."""
    for name, value in fields.items():
        if not isinstance(value, str):
            continue
        limit = limits.max_prompt_chars if name in PROMPT_FIELDS else limits.max_field_chars
        if len(value) > limit:
            raise JobError(
                f"{shown(name)} is {len(value)} characters, over this server's limit of {limit}",
                name,
                "string_above_max_length",
            )


def read_fields(
    raw: Mapping[str, Any], limits: Limits, capabilities: Capabilities, model_name: str, optional: Collection[str] = ()
) -> dict[str, Any]:
    """Each present field coerced to its type and checked against its choices and bounds, in table order."""
    return {
        f.name: read_field(f, raw[f.name], limits, capabilities, model_name, f.name in optional)
        for f in FIELDS
        if raw.get(f.name) is not None
    }


def read_field(
    f: Field, value: Any, limits: Limits, capabilities: Capabilities, model_name: str, optional: bool = False
) -> Any:
    value = f.coerce(value)
    if f.required and not optional and isinstance(value, str) and not value.strip():
        raise JobError(f"{f.name} must not be empty", f.name, "invalid_value")
    if f.choices is not None:
        value = value.strip().lower()
        check_choice(f, value, capabilities, model_name)
    if f.ranged:
        check_range(f, value, limits)
    return value


def check_choice(f: Field, value: str, capabilities: Capabilities, model_name: str) -> None:
    supported = f.supported(capabilities) if f.supported else f.choices or ()
    if value in f.refused:
        raise JobError(
            f"{f.name} {shown(value)} is not supported ({f.refused[value]}); use one of {', '.join(supported)}",
            f.name,
            f"unsupported_{f.name}",
        )
    if value not in (f.choices or ()):
        raise JobError(
            f"{f.name} must be one of {', '.join(f.choices or ())}; got {shown(value)}", f.name, f.invalid_choice
        )
    if value not in supported:
        raise JobError(
            f"{model_name} ({capabilities.family}) supports {f.name} {', '.join(supported)}; got {shown(value)}",
            f.name,
            f"unsupported_{f.name}",
        )


def check_range(f: Field, value: float, limits: Limits) -> None:
    low, high = f.bounds(limits)
    if low is None and high is None:
        return
    if not (-math.inf if low is None else low) <= value <= (math.inf if high is None else high):
        allowed = (
            f"at most {high}" if low is None else f"at least {low}" if high is None else f"between {low} and {high}"
        )
        raise JobError(f"{f.name} must be {allowed}, got {shown(value)}", f.name, "out_of_range")


# --- rules across fields, the model and the images --------------------------------------------------------


def refuse_unusable(
    given: Mapping[str, Any], images: Mapping[str, Image.Image], capabilities: Capabilities, model_name: str
) -> None:
    """Fields and images this request or model cannot use, whatever their value."""
    if "style_ratio" in given:
        raise JobError(
            "style_ratio is PhotoMaker's, and this server has no PhotoMaker", "style_ratio", "unsupported_parameter"
        )
    if "guidance" in given and not capabilities.guidance:
        raise JobError(
            f"{model_name} has no guidance embedding, so guidance cannot be honoured; "
            "cfg_scale sets classifier-free guidance",
            "guidance",
            "unsupported_parameter",
        )
    if "max_sequence_length" in given and capabilities.text_length is None:
        raise JobError(
            f"{model_name} has no T5 text encoder, so max_sequence_length (T5's tokens per prompt) cannot be honoured",
            "max_sequence_length",
            "unsupported_parameter",
        )
    if "strength" in given and "image" not in images:
        raise JobError(
            "strength is how much of an image an edit keeps, and this request has no image "
            "(send it to /v1/images/edits with one)",
            "strength",
            "unsupported_parameter",
        )
    if "input_fidelity" in given and "image" not in images:
        raise JobError(
            "input_fidelity is about an edit's input images, and this request has none "
            "(send it to /v1/images/edits with them)",
            "input_fidelity",
            "unsupported_parameter",
        )
    if str(given.get("background", "")).strip().lower() == "transparent":
        raise JobError(
            "background 'transparent' cannot be honoured: no model here makes transparent images; use auto or opaque",
            "background",
            "unsupported_parameter",
        )
    if "mask" in images and "image" not in images:
        raise JobError("mask needs an image to edit", "mask", "missing_required_parameter")
    if capabilities.mask_required and "mask" not in images:
        missing = "mask" if "image" in images else "image"
        raise JobError(
            f"{model_name} ({capabilities.family}) only inpaints: it repaints the masked part of an image, so it "
            f"needs an image and a mask (white where it repaints), and this request has no {missing} (send both to "
            "/v1/images/edits)",
            missing,
            "missing_required_parameter",
        )
    for name, supported, what in (  # (an image with a mask is inpainting's)
        ("image", capabilities.img2img or capabilities.references > 0 or "mask" in images, "image-to-image"),
        ("mask", capabilities.inpainting, "inpainting"),
    ):
        if name in images and not supported:
            raise JobError(f"{model_name} ({capabilities.family}) cannot do {what}", name, "unsupported_parameter")
    if "control_image" in images and not capabilities.controlnet:
        raise JobError(
            f"model {model_name!r} has no ControlNet of its own: name one with control_net (GET /v1/controlnets "
            "lists them), or serve the model with --control-net",
            "control_image",
            "controlnet_unavailable",
        )
    if "control_net" in given and "control_image" not in images:
        raise JobError(
            "control_net names the ControlNet that reads a control_image, and this request has none",
            "control_net",
            "missing_required_parameter",
        )


def check_inputs(
    given: Mapping[str, Any],
    inputs: Sequence[Image.Image],
    masked: bool,
    limits: Limits,
    capabilities: Capabilities,
    model_name: str,
) -> None:
    """How many input images the model takes, and what an instruction edit cannot use. What an edit is,
    the model says: one with references (FLUX.2 klein, Kontext) reads its inputs beside the instruction
    (`strength` is then meaningless, unless a mask makes it inpainting); any other edits one image."""
    count = len(inputs)
    if count > limits.max_images:
        raise JobError(
            f"{count} input images: over this server's limit of {limits.max_images}", "image", "invalid_value"
        )
    if not capabilities.references:
        if count > 1:
            raise JobError(
                f"{count} input images, and {model_name} ({capabilities.family}) takes 1: its edits are img2img "
                "and inpainting; several input images are for instruction-edit models",
                "image",
                "invalid_value",
            )
        return
    if count > capabilities.references:
        raise JobError(
            f"{count} input images, and {model_name} ({capabilities.family}) takes at most {capabilities.references}",
            "image",
            "invalid_value",
        )
    if "strength" in given and not masked:
        raise JobError(
            f"{model_name} ({capabilities.family}) edits by instruction: it reads the input images whole, beside "
            "the prompt, and has no strength (how much of an image img2img re-runs); leave strength out, or "
            "send a mask to inpaint",
            "strength",
            "unsupported_parameter",
        )


def strip_lora_tags(field_name: str, text: str) -> tuple[str, list[tuple[str, float]]]:
    """A prompt without its `<lora:name>` / `<lora:name:weight>` tags (A1111's syntax), and the tags."""
    tags = []
    for match in _LORA_TAG_RE.finditer(text):
        name, _, weight = match[2].partition(":")
        if not name.strip() or ":" in weight:
            raise JobError(
                f"LoRA tag {shown(match[0].strip())} must be <lora:name> or <lora:name:weight>",
                field_name,
                "invalid_value",
            )
        tags.append((name.strip(), as_float(field_name, weight) if weight.strip() else 1.0))
    return _LORA_TAG_RE.sub(tag_gap, text), tags


def tag_gap(match: re.Match[str]) -> str:
    """What a removed tag and the whitespace around it leave: one space where there was some between two
    words, nothing at either end of the prompt (an LLM text encoder reads a stray space as a token; CLIP
    does not) or where it touched the words on both sides."""
    inside = match.start() > 0 and match.end() < len(match.string)
    return " " if inside and (match[1] or match[3]) else ""


def strip_prompt_tags(values: dict[str, Any], limits: Limits) -> list[tuple[str, float, str]]:
    """The prompts in `values` stripped of their LoRA tags (in place) and checked (emphasis syntax, at most
    `max_prompt_chunks` 75-token windows; engine/text/prompt.py); the tags as (name, weight, their field)."""
    loras: list[tuple[str, float, str]] = []
    had_text = bool(values["prompt"].strip())  # (blank only where the route lets it be: a variation's)
    for name in PROMPT_FIELDS:
        if values.get(name) is None:  # (the hires prompts: absent unless given)
            continue
        values[name], tags = strip_lora_tags(name, values[name])
        loras += [(lora, weight, name) for lora, weight in tags]
        check_prompt(values[name], name, limits.max_prompt_chunks)
    if had_text and not values["prompt"].strip():
        raise JobError("prompt must not be empty: it has only LoRA tags", "prompt", "invalid_value")
    return loras


def few_step_defaults(loras: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """The defaults a few-step LoRA brings (its steps, no CFG), for what the request leaves unset: Lightning
    LoRAs are used that way, and the model's own 50 steps with CFG would only make them slow and burnt."""
    for name, _ in loras:
        if match := _FEW_STEP_LORA_RE.search(name.rsplit("/", 1)[-1]):
            return {"steps": int(match[2]), "cfg_scale": 1.0}
    return {}


def check_loras(
    loras: list[tuple[str, float, str]],
    limits: Limits,
    lora_family: LoRAFamily | None,
    capabilities: Capabilities,
    model_name: str,
) -> tuple[tuple[str, float], ...]:
    """Each LoRA named once, weights in range, at most `max_loras`, and each one this model's family's."""
    if len(loras) > limits.max_loras:
        raise JobError(
            f"{len(loras)} LoRAs: over this server's limit of {limits.max_loras}", loras[-1][2], "out_of_range"
        )
    if loras and not capabilities.lora:  # (the family's, or the engine's: the torch engine takes none)
        raise JobError(
            f"{model_name} takes no LoRAs: not supported for its family, or on this engine (--engine torch)",
            loras[0][2],
            "unsupported_parameter",
        )
    seen: set[str] = set()
    for name, weight, param in loras:
        if name in seen:
            raise JobError(
                f"LoRA {shown(name)} is given twice; give it once, with the weight you want", param, "invalid_value"
            )
        seen.add(name)
        if not -LORA_SCALE_LIMIT <= weight <= LORA_SCALE_LIMIT:
            raise JobError(
                f"LoRA {shown(name)}: weight must be between {-LORA_SCALE_LIMIT:g} and "
                f"{LORA_SCALE_LIMIT:g}, got {shown(weight)}",
                param,
                "out_of_range",
            )
        if lora_family is None:
            raise JobError("LoRAs cannot be used here: no LoRA folder is configured", param, "unsupported_parameter")
        try:
            family = lora_family(name)
        except JobError as error:  # unknown, or not a usable LoRA: name the field it came from
            raise JobError(error.message, param, error.code) from None
        if family != capabilities.family:
            raise JobError(
                f"LoRA {shown(name)} is for {family} models, and {model_name} is {capabilities.family}",
                param,
                "lora_family_mismatch",
            )
    return tuple((name, weight) for name, weight, _ in loras)


def guidance(values: Mapping[str, Any], capabilities: Capabilities) -> float | None:
    """Distilled guidance: only models with a guidance embedding have it (refuse_unusable refuses it on the
    others); theirs is the request's, else the model's, else DEFAULT_GUIDANCE."""
    return values.get("guidance", DEFAULT_GUIDANCE) if capabilities.guidance else None


def text_length(values: Mapping[str, Any], capabilities: Capabilities, model_name: str) -> int | None:
    """T5's tokens per prompt: the request's, up to the model's maximum, else the model's own; None on a model
    without T5 (refuse_unusable refuses the field there)."""
    length = capabilities.text_length
    if length is None:
        return None
    value: int = values.get("max_sequence_length", length.default)
    if not 1 <= value <= length.maximum:
        raise JobError(
            f"max_sequence_length must be between 1 and {length.maximum} for {model_name}, got {shown(value)}",
            "max_sequence_length",
            "out_of_range",
        )
    return value


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def parse_size(value: Any, defaults: ModelDefaults) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height), as the reference documents (not as it parses); OpenAI's "auto" is
    the model's native size."""
    if is_auto(value):
        return defaults.width, defaults.height
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise JobError(f"size must be WIDTHxHEIGHT, got {shown(value)}", "size", "invalid_size")
    return int(match.group(1)), int(match.group(2))


def auto_size(
    source: tuple[int, int], defaults: ModelDefaults, limits: Limits, capabilities: Capabilities
) -> tuple[int, int]:
    """An edit's size when it gives none (or "auto"): the first input's aspect ratio at the model's native area
    (its default width x height), each side a multiple of the model's, within the server's and the model's
    bounds on a side (a thin input is widened or narrowed to them rather than refused)."""
    multiple = capabilities.size_multiple
    width, height = source
    longest = min(limits.max_side, capabilities.largest_side or limits.max_side)
    scale = math.sqrt(defaults.width * defaults.height / (width * height))
    scale = max(min(scale, longest / max(width, height)), limits.min_side / min(width, height))
    low = max(multiple, math.ceil(limits.min_side / multiple) * multiple)
    high = max(low, longest // multiple * multiple)

    def side(length: int) -> int:
        return min(max(round(length * scale / multiple) * multiple, low), high)

    out = [side(width), side(height)]
    while out[0] * out[1] > limits.max_pixels and max(out) - multiple >= low:  # rounding up can pass the budget
        out[out.index(max(out))] -= multiple
    return out[0], out[1]


def image_size(
    given: Mapping[str, Any],
    values: Mapping[str, Any],
    defaults: ModelDefaults,
    limits: Limits,
    capabilities: Capabilities,
    source: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """`size`, or `width` and `height` (both given: they must agree), checked against the limits and the model.
    An edit (`source`: its first input's size) with no size, or size "auto", keeps that input's aspect ratio."""
    if source is not None and (is_auto(given.get("size")) or not {"size", "width", "height"} & set(given)):
        width, height = auto_size(source, defaults, limits, capabilities)
        param = "size"
    elif "size" in given:
        width, height = parse_size(values["size"], defaults)
        for name, side in (("width", width), ("height", height)):
            if name in given and values[name] != side:
                raise JobError(
                    f"size {shown(given['size'])} and {name} {shown(given[name])} disagree; send one of them",
                    name,
                    "invalid_value",
                )
        param = "size"
    else:
        width, height = values["width"], values["height"]
        param = "width" if "width" in given else "height"
    check_dimensions(width, height, limits, param, capabilities)
    return width, height


def check_dimensions(width: int, height: int, limits: Limits, param: str, capabilities: Capabilities) -> None:
    multiple = capabilities.size_multiple
    for side_name, side in (("width", width), ("height", height)):
        if side % multiple:
            raise JobError(
                f"{side_name} must be a multiple of {multiple} for this model, got {shown(side)}", param, "invalid_size"
            )
        if not limits.min_side <= side <= limits.max_side:
            raise JobError(
                f"{side_name} must be between {limits.min_side} and {limits.max_side}, got {shown(side)}",
                param,
                "invalid_size",
            )
    if width * height > limits.max_pixels:
        raise JobError(
            f"{width}x{height} is {width * height} pixels, over this server's limit of {limits.max_pixels}",
            param,
            "invalid_size",
        )
    largest = capabilities.largest_side
    if largest is not None and max(width, height) > largest:  # e.g. SD3's position embeddings
        raise JobError(
            f"this model makes images of at most {largest} pixels a side, got {width}x{height}", "size", "invalid_size"
        )


def check_step_limit(values: Mapping[str, Any]) -> None:
    """A schedule's own bound on steps (lcm: the grid its models were distilled on)."""
    limit = step_limit(values["scheduler"])
    for name in ("steps", "hr_steps"):
        if limit is not None and (values.get(name) or 0) > limit:
            raise JobError(
                f"{name} must be at most {limit} with the {values['scheduler']} scheduler, got {shown(values[name])}",
                name,
                "out_of_range",
            )


HIRES_PROMPTS = ("hr_prompt", "hr_negative_prompt")


def hires(
    given: Mapping[str, Any],
    values: dict[str, Any],
    images: Mapping[str, Image.Image],
    tags: Sequence[tuple[str, float, str]],
    limits: Limits,
    capabilities: Capabilities,
    upscalers: Collection[str],
) -> tuple[int, int] | tuple[None, None]:
    """The hires fix's second-pass size (hr_scale x the size, on the model's size grid), or (None, None) when
    off: a txt2img's, on a model with img2img, by a latent mode or an upscaler the server has. LoRA `tags` in
    the hires prompts must be the job's own LoRAs (both passes run with them)."""
    if "hr_scale" not in given:
        if stray := sorted(name for name in given if name.startswith("hr_")):
            raise JobError(
                f"{stray[0]} is a hires fix setting: it needs hr_scale", stray[0], "missing_required_parameter"
            )
        return None, None
    if not capabilities.hires or not capabilities.img2img:
        why = (
            "img2img, which its second pass is"
            if capabilities.hires
            else "a hires fix under this engine (--engine torch)"
        )
        raise JobError(f"{capabilities.family or 'this'} models have no {why}", "hr_scale", "unsupported_parameter")
    if edited := sorted(name for name in images if name != "control_image"):
        raise JobError(
            f"the hires fix is for generations: this request has an {edited[0]} (it is an edit)",
            "hr_scale",
            "unsupported_parameter",
        )
    upscaler = values["hr_upscaler"].strip()
    if upscaler.lower() in LATENT_UPSCALE_MODES:
        upscaler = upscaler.lower()
    elif upscaler not in upscalers:
        known = ", ".join([*LATENT_UPSCALE_MODES, *upscalers])
        raise JobError(
            f"hr_upscaler {shown(upscaler)} is not an upscaler here; use one of {known}",
            "hr_upscaler",
            "upscaler_not_found",
        )
    values["hr_upscaler"] = upscaler
    for name, weight, param in tags:
        if (name, weight) not in values["loras"]:
            raise JobError(
                f"LoRA <lora:{name}:{weight:g}> in {param}: both passes run with the job's LoRAs, so a hires prompt "
                "may only repeat the prompt's (or loras') tags",
                param,
                "invalid_value",
            )
    multiple = capabilities.size_multiple
    scale = values["hr_scale"]
    width, height = (
        max(multiple, round(side * scale / multiple) * multiple) for side in (values["width"], values["height"])
    )
    check_dimensions(width, height, limits, "hr_scale", capabilities)
    return width, height


def seed(value: int) -> int:
    """A negative seed is a random one."""
    return secrets.randbelow(2**32) if value < 0 else value


def control_preprocess(given: Mapping[str, Any], values: Mapping[str, Any]) -> str:
    """control_preprocess, or the reference's apply_canny_preprocessor (both given: they must agree)."""
    preprocess: str = values["control_preprocess"]
    if "apply_canny_preprocessor" not in values:
        return preprocess
    canny = values["apply_canny_preprocessor"]
    if "control_preprocess" in given and (preprocess == "canny") != canny:
        raise JobError(
            "apply_canny_preprocessor and control_preprocess disagree; send one of them",
            "apply_canny_preprocessor",
            "invalid_value",
        )
    return "canny" if canny else preprocess


def cover_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The size an image of `size` is resized to before being centre-cropped to width x height (scaled to
    cover the output): the largest intermediate the pipeline's `fit_image` makes."""
    scale = max(width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def labelled(
    inputs: Sequence[Image.Image], first_fitted: bool, other: Mapping[str, Image.Image]
) -> list[tuple[str, str, Image.Image, bool]]:
    """Each image as (its field, its name in messages: `image 2` where there are several inputs, the image,
    whether the pipeline fits it to the output: an edit's first input, unless it is a reference, and the mask
    and control image; an engine scales references to its own area, never beyond their size)."""
    named = [
        ("image", "image" if len(inputs) == 1 else f"image {i + 1}", image, first_fitted and not i)
        for i, image in enumerate(inputs)
    ]
    return named + [(name, name, image, True) for name, image in other.items()]


def check_images(
    images: Collection[tuple[str, str, Image.Image, bool]], width: int, height: int, limits: Limits
) -> None:
    """Images (field, label, image, fitted) within the aspect ratio limit, those fitted to the output without a
    giant intermediate; a mask the size of the image it masks (the first input)."""
    for param, label, image, fitted in images:
        w, h = image.size
        if max(w, h) > limits.max_upload_aspect * min(w, h):
            raise JobError(
                f"{label} is {w}x{h}: its aspect ratio is over this server's limit of {limits.max_upload_aspect:g}:1",
                param,
                "invalid_image_dimensions",
            )
        cover_w, cover_h = cover_size((w, h), width, height)
        if fitted and cover_w * cover_h > limits.max_fit_pixels:
            raise JobError(
                f"{label} ({w}x{h}) would be scaled to {cover_w}x{cover_h} to cover {width}x{height}: "
                f"over this server's limit of {limits.max_fit_pixels} pixels; send an image closer "
                "to the output's shape",
                param,
                "image_too_large",
            )
    sizes: dict[str, tuple[int, int]] = {}
    for param, _, image, _ in images:
        sizes.setdefault(param, image.size)  # the first input's
    if "mask" in sizes and "image" in sizes and sizes["mask"] != sizes["image"]:
        (mw, mh), (iw, ih) = sizes["mask"], sizes["image"]
        raise JobError(
            f"mask is {mw}x{mh} but image is {iw}x{ih}: they must be the same size", "mask", "invalid_image_dimensions"
        )
