"""AUTOMATIC1111's web API (1.10) in our terms: its request fields as a Job's, its sampler, scheduler and
upscaler names as ours, the `info` it answers with, its options, and its infotext read back (png-info).

The contract is A1111's own `modules/api/models.py`: a request model per route, built from the fields of
`StableDiffusionProcessingTxt2Img` / `Img2Img` (their defaults, less API_NOT_ALLOWED) and a few API-only
fields. Every field it defines is accepted: translated into the job where we do what it asks, or accepted
where its value asks for what we do anyway (its default, or a value with the same effect), and refused
(400, naming it and why) where it asks for something we do not do. A field it does not define is refused as
unknown, except CLIENT_EXTRAS (which A1111's model silently drops and some clients send).
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import importlib.metadata
import json
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from mlx_sd_server.engine.hires import LATENT_UPSCALE_MODES
from mlx_sd_server.engine.pipeline import MASK_FEATHER_PX
from mlx_sd_server.images import (
    A1111_SAMPLERS,
    A1111_SCHEDULES,
    A1111_UPSCALERS,
    EXIF_IFD,
    OUTPUT_FORMATS,
    UNICODE_PREFIX,
    USER_COMMENT,
    has_transparency,
)
from mlx_sd_server.job import Job, JobError, as_bool, as_float, as_int, as_str, shown
from mlx_sd_server.registry import ModelInfo

log = logging.getLogger("mlx_sd_server.api")

# --- the request models ------------------------------------------------------------------------------

# StableDiffusionProcessing's __init__ fields as the API takes them, with A1111's defaults, and the API's own
_COMMON: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "styles": None,
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": None,
    "scheduler": None,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "s_min_uncond": None,
    "s_churn": None,
    "s_tmax": None,
    "s_tmin": None,
    "s_noise": None,
    "override_settings": None,
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "comments": None,
    # the API's own
    "sampler_index": "Euler",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
    "force_task_id": None,
    "infotext": None,
}
FIELDS: dict[str, dict[str, Any]] = {
    "txt2img": {
        **_COMMON,
        "enable_hr": False,
        "denoising_strength": 0.75,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "hr_scale": 2.0,
        "hr_upscaler": None,
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "hr_checkpoint_name": None,
        "hr_sampler_name": None,
        "hr_scheduler": None,
        "hr_prompt": "",
        "hr_negative_prompt": "",
        "firstpass_image": None,
    },
    "img2img": {
        **_COMMON,
        "init_images": None,
        "resize_mode": 0,
        "denoising_strength": 0.75,
        "image_cfg_scale": None,
        "mask": None,
        "mask_blur_x": 4,
        "mask_blur_y": 4,
        "mask_blur": None,
        "mask_round": True,
        "inpainting_fill": 0,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0,
        "initial_noise_multiplier": None,
        "latent_mask": None,
        "include_init_images": False,
    },
}
# Fields whose JSON value is an array or an object (the body reader takes these nested); images apart.
STRUCTURED = ("styles", "script_args", "override_settings", "alwayson_scripts", "comments")
IMAGE_FIELDS = {"txt2img": (), "img2img": ("init_images", "mask")}
IMAGE_LISTS = ("init_images",)
# Not A1111's, and sent by clients A1111 serves (its request model drops unknown keys): SillyTavern's server
# posts its own request body on, with the url and the credentials it was given; SD.Next's `clip_skip`.
CLIENT_EXTRAS = ("url", "auth", "clip_skip")
# Enough for a client that sends every field (A1111's img2img model has about 70)
MAX_FIELDS = 128


# --- samplers and schedulers -------------------------------------------------------------------------------

# A1111's name -> our sample_method (images.py's map inverted; where two of ours have one name, the first)
SAMPLERS: dict[str, str] = {}
for _ours, _theirs in A1111_SAMPLERS.items():
    SAMPLERS.setdefault(_theirs, _ours)
# A1111's aliases and options for its samplers we have (modules/sd_samplers_kdiffusion.py, sd_samplers_lcm.py);
# options.scheduler is the schedule its "Automatic" means for that sampler.
SAMPLER_DETAILS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "DPM++ 2M": (["k_dpmpp_2m"], {"scheduler": "karras"}),
    "DPM++ 2S a": (["k_dpmpp_2s_a"], {"scheduler": "karras", "uses_ensd": True, "second_order": True}),
    "Euler a": (["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    "Euler": (["k_euler"], {}),
    "Heun": (["k_heun"], {"second_order": True}),
    "DPM2": (["k_dpm_2"], {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}),
    "LCM": (["k_lcm"], {}),
}
ANCESTRAL = ("euler_a", "dpm++2s_a")  # the samplers A1111's `eta` (ancestral noise) applies to
# A1111's samplers we do not have: a request naming one is told so
MISSING_SAMPLERS = (
    "LMS",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "DPM2 a",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "DDIM",
    "DDIM CFG++",
    "PLMS",
    "UniPC",
)


@dataclass(frozen=True)
class Schedule:
    """One of A1111's schedulers (modules/sd_schedulers.py): its name, label, aliases, and ours (None: we lack it)."""

    name: str
    label: str
    ours: str | None
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


_OURS = {label: ours for ours, label in A1111_SCHEDULES.items()}  # images.py's map, inverted
SCHEDULES = (
    Schedule("automatic", "Automatic", None),
    Schedule("uniform", "Uniform", _OURS["Uniform"], need_inner_model=True),
    Schedule("karras", "Karras", _OURS["Karras"], default_rho=7.0),
    Schedule("exponential", "Exponential", _OURS["Exponential"]),
    Schedule("polyexponential", "Polyexponential", None, default_rho=1.0),
    Schedule("sgm_uniform", "SGM Uniform", _OURS["SGM Uniform"], ("SGMUniform",), need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal", None),
    Schedule("align_your_steps", "Align Your Steps", _OURS["Align Your Steps"]),
    Schedule("simple", "Simple", _OURS["Simple"], need_inner_model=True),
    # A1111's "Normal" (sgm=False) is linspace(t_max, 0, n) over the timesteps, which is "Uniform" again
    Schedule("normal", "Normal", _OURS["Uniform"], need_inner_model=True),
    Schedule("ddim", "DDIM", None, need_inner_model=True),
    Schedule("beta", "Beta", None, need_inner_model=True),
    # ours, which A1111 does not have (its infotext readers keep the label)
    Schedule("trailing", "Trailing", _OURS["Trailing"]),
    Schedule("lcm", "LCM", _OURS["LCM"]),
)
_SCHEDULE_BY_NAME = {
    key.lower(): schedule for schedule in SCHEDULES for key in (schedule.name, schedule.label, *schedule.aliases)
}


def find_schedule(value: str, param: str) -> Schedule:
    schedule = _SCHEDULE_BY_NAME.get(value.strip().lower())
    if schedule is None:
        known = ", ".join(s.label for s in SCHEDULES if s.ours or s.name == "automatic")
        raise JobError(f"unknown scheduler {shown(value)}; use one of {known}", param, "invalid_scheduler")
    if schedule.name != "automatic" and schedule.ours is None:
        raise JobError(f"A1111's {schedule.label} schedule is not implemented here", param, "unsupported_scheduler")
    return schedule


def find_sampler(value: str, param: str) -> tuple[str, Schedule | None]:
    """An A1111 sampler name (or alias, or ours) -> (our sample_method, the schedule its name ends with, as in
    "DPM++ 2M Karras", which A1111 1.9+ reads as sampler and scheduler)."""
    name = value.strip()
    suffix = None
    for schedule in SCHEDULES:
        for option in (schedule.label, schedule.name, *schedule.aliases):
            if name.lower().endswith(" " + option.lower()) and _sampler(name[: -len(option) - 1]) is not None:
                name, suffix = name[: -len(option) - 1], schedule
                break
        if suffix is not None:
            break
    ours = _sampler(name)
    if ours is None:
        if name.lower() in (missing.lower() for missing in MISSING_SAMPLERS):
            raise JobError(f"A1111's {shown(name)} sampler is not implemented here", param, "unsupported_sample_method")
        raise JobError(
            f"unknown sampler {shown(value)}; use one of {', '.join(SAMPLERS)}", param, "invalid_sample_method"
        )
    if suffix is not None and suffix.name != "automatic" and suffix.ours is None:
        raise JobError(f"A1111's {suffix.label} schedule is not implemented here", param, "unsupported_scheduler")
    return ours, suffix


def _sampler(name: str) -> str | None:
    wanted = name.strip().lower()
    for theirs, ours in SAMPLERS.items():
        aliases = SAMPLER_DETAILS.get(theirs, ([], {}))[0]
        if wanted in (theirs.lower(), ours, *aliases):
            return ours
    return None


def sampler_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111's shape, for the samplers we have."""
    return [
        {
            "name": theirs,
            "aliases": SAMPLER_DETAILS.get(theirs, ([ours], {}))[0],
            "options": SAMPLER_DETAILS.get(theirs, ([], {}))[1],
        }
        for theirs, ours in SAMPLERS.items()
    ]


def scheduler_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: A1111's shape, for Automatic and the schedules we have."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) or None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULES
        if s.ours is not None or s.name == "automatic"
    ]


# --- upscalers -----------------------------------------------------------------------------------------

# A1111's upscaler names -> ours: its Latent modes (images.py's map inverted; "antialiased" bilinear equals
# bilinear when enlarging), its resamplers, and "None" (no network: the LANCZOS resize that follows it)
_A1111_UPSCALERS = {theirs: ours for ours, theirs in A1111_UPSCALERS.items()}
UPSCALER_NAMES = {**_A1111_UPSCALERS, "Latent (antialiased)": "latent", "None": "lanczos"}
LATENT_MODES = [name for name, ours in UPSCALER_NAMES.items() if ours in LATENT_UPSCALE_MODES]


def upscaler_name(value: Any, param: str, names: Collection[str], latent: bool) -> str:
    """An A1111 upscaler name (a Latent mode where `latent`) -> ours: its own spelling, else one of `names`
    (the server's upscalers), by name in any case."""
    text = as_str(param, value).strip()
    ours = UPSCALER_NAMES.get(text)
    if ours is not None and (latent or ours not in LATENT_UPSCALE_MODES):
        return ours
    if text.startswith("Latent"):
        raise JobError(f"A1111's {shown(text)} upscaling is not implemented here", param, "upscaler_not_found")
    if text in names:
        return text
    found = [name for name in names if name.lower() == text.lower()]
    return found[0] if len(found) == 1 else text  # an unknown name: refused, with the list, by its reader


def a1111_upscaler(ours: str) -> str:
    """Our upscaler's name as A1111 lists it."""
    return A1111_UPSCALERS.get(ours, ours)


# --- the request --------------------------------------------------------------------------------------


@dataclass
class Translated:
    """An A1111 request in our terms."""

    fields: dict[str, Any]  # job fields (the model apart)
    n_iter: int
    send_images: bool
    save_images: bool
    output_format: str
    task_id: str | None
    stretch: bool  # resize_mode 0: the image (and mask) resized to the output size, not cropped
    invert_mask: bool
    hr_size: tuple[int, int]  # hr_resize_x, hr_resize_y (0: not given)
    parameters: dict[str, Any]  # the request as A1111 echoes it
    keep_overrides: bool  # override_settings_restore_afterwards false: the overrides stay (the model: the default)
    filled: dict[str, str] = field(
        default_factory=dict
    )  # echo field -> job attribute, where the model's default filled it


def requested_model(raw: Mapping[str, Any]) -> str | None:
    """override_settings.sd_model_checkpoint, if the request picks a model."""
    overrides = raw.get("override_settings")
    if isinstance(overrides, dict) and overrides.get("sd_model_checkpoint") not in (None, ""):
        return checkpoint_name(overrides["sd_model_checkpoint"], "override_settings")
    return None


def checkpoint_name(value: Any, param: str) -> str:
    """An A1111 checkpoint reference -> a model name: a title ("name [hash]") or a file name ("name.safetensors")
    read as the name."""
    text = as_str(param, value).strip()
    text = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", text)
    return re.sub(r"\.(safetensors|ckpt|gguf|pt|pth|sft)$", "", text, flags=re.IGNORECASE)


def translate(
    mode: str,
    raw: Mapping[str, Any],
    info: ModelInfo,
    options: Mapping[str, Any],
    upscalers: Collection[str],
    masked: bool = False,
) -> Translated:
    """Check an A1111 request's fields (`raw`, images apart) and translate them. `options`: the server's
    A1111 options (what override_settings may keep); `upscalers`: the server's upscaler names; `masked`: the
    request has a mask."""
    known = FIELDS[mode]
    if unknown := sorted(set(raw) - set(known) - set(CLIENT_EXTRAS)):
        raise JobError(
            f"unknown field {shown(unknown[0])}: A1111's /sdapi/v1/{mode} has no such field",
            unknown[0],
            "unknown_field",
        )
    given = {name: value for name, value in raw.items() if value is not None}  # null: the default, as absent
    _refuse_unsupported(given, masked)
    fields: dict[str, Any] = {
        "prompt": as_str("prompt", given.get("prompt", "")),
        "negative_prompt": as_str("negative_prompt", given.get("negative_prompt", "")),
        "seed": given.get("seed", -1),
        "n": given.get("batch_size", 1),
    }
    filled = {}
    for theirs, ours in (("steps", "steps"), ("cfg_scale", "cfg_scale"), ("width", "width"), ("height", "height")):
        if theirs in given:
            fields[ours] = given[theirs]
        else:
            filled[theirs] = ours  # the model's default, not A1111's
    fields.update(_sampling(given, info, filled))
    if mode == "img2img":
        if "denoising_strength" in given:
            fields["strength"] = given["denoising_strength"]
    elif as_bool("enable_hr", given.get("enable_hr", False)):
        fields.update(_hires(given, info, fields.get("sample_method"), upscalers))
    output_format = "png"
    overrides = given.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise JobError("override_settings must be an object of A1111 options", "override_settings", "invalid_type")
    for key, value in overrides.items():
        if key == "samples_format":
            output_format = _samples_format(value, "override_settings")
        elif key != "sd_model_checkpoint":
            check_option(key, value, options, "override_settings")
    n_iter = as_int("n_iter", given.get("n_iter", 1))
    if n_iter < 1:
        raise JobError(f"n_iter must be at least 1, got {n_iter}", "n_iter", "out_of_range")
    task_id = given.get("force_task_id")
    stretch = False
    if mode == "img2img":
        resize_mode = as_int("resize_mode", given.get("resize_mode", 0))
        if resize_mode not in (0, 1):
            raise JobError(
                f"resize_mode {resize_mode} is not implemented here: 0 (just resize) and 1 (crop and resize) are",
                "resize_mode",
                "unsupported_parameter",
            )
        stretch = resize_mode == 0
    echo = {**known, **{name: value for name, value in raw.items() if name in known}}
    if mode == "img2img" and not as_bool("include_init_images", given.get("include_init_images", False)):
        echo["init_images"] = echo["mask"] = None
    return Translated(
        fields=fields,
        n_iter=n_iter,
        send_images=as_bool("send_images", given.get("send_images", True)),
        save_images=as_bool("save_images", given.get("save_images", False)),
        output_format=output_format,
        task_id=None if task_id in (None, "") else as_str("force_task_id", task_id),
        stretch=stretch,
        invert_mask=as_int("inpainting_mask_invert", given.get("inpainting_mask_invert", 0)) == 1,
        hr_size=(
            as_int("hr_resize_x", given.get("hr_resize_x", 0)),
            as_int("hr_resize_y", given.get("hr_resize_y", 0)),
        ),
        parameters=echo,
        keep_overrides=not as_bool(
            "override_settings_restore_afterwards", given.get("override_settings_restore_afterwards", True)
        ),
        filled=filled,
    )


def _sampling(given: Mapping[str, Any], info: ModelInfo, filled: dict[str, str]) -> dict[str, Any]:
    """sampler_name (or sampler_index) and scheduler -> sample_method and scheduler. Neither given: the
    model's own; a sampler with scheduler Automatic (or none): A1111's schedule for that sampler, else the
    model's."""
    param = "sampler_name" if given.get("sampler_name") not in (None, "") else "sampler_index"
    requested = given.get(param)
    out: dict[str, Any] = {}
    suffix = None
    if requested not in (None, ""):
        out["sample_method"], suffix = find_sampler(as_str(param, requested), param)
    else:
        filled["sampler_name"] = "sample_method"
    if given.get("scheduler") not in (None, ""):
        schedule: Schedule | None = find_schedule(as_str("scheduler", given["scheduler"]), "scheduler")
    else:
        schedule = suffix
    if schedule is not None and schedule.ours is not None:
        out["scheduler"] = schedule.ours
    elif "sample_method" in out:  # Automatic
        theirs = A1111_SAMPLERS.get(out["sample_method"], "")
        automatic = SAMPLER_DETAILS.get(theirs, ([], {}))[1].get("scheduler")
        out["scheduler"] = _SCHEDULE_BY_NAME[automatic].ours if automatic else info.defaults.scheduler
    if schedule is None or schedule.name == "automatic":
        filled["scheduler"] = "scheduler"
    eta = given.get("eta")
    ancestral = out.get("sample_method", info.defaults.sample_method) in ANCESTRAL
    if eta is not None and ancestral and as_float("eta", eta) != 1.0:
        raise JobError(
            f"eta {shown(eta)}: the ancestral samplers here add noise as eta 1 does (A1111's default)",
            "eta",
            "unsupported_parameter",
        )
    return out


def _hires(
    given: Mapping[str, Any], info: ModelInfo, sampler: str | None, upscalers: Collection[str]
) -> dict[str, Any]:
    """enable_hr's fields -> the hires fix's."""
    out: dict[str, Any] = {"hr_scale": given.get("hr_scale", 2.0)}
    out["hr_upscaler"] = upscaler_name(given.get("hr_upscaler") or "Latent", "hr_upscaler", upscalers, latent=True)
    if as_int("hr_second_pass_steps", given.get("hr_second_pass_steps", 0)):
        out["hr_steps"] = given["hr_second_pass_steps"]
    out["hr_strength"] = given.get("denoising_strength", 0.75)  # A1111's default, not ours
    for name in ("hr_prompt", "hr_negative_prompt"):
        if as_str(name, given.get(name, "")):  # "": the first pass's
            out[name] = given[name]
    for name, same, what in (
        ("hr_checkpoint_name", "Use same checkpoint", info.name),
        ("hr_sampler_name", "Use same sampler", None),
        ("hr_scheduler", "Use same scheduler", None),
    ):
        value = given.get(name)
        if value in (None, "", same) or value == what:
            continue
        if name == "hr_sampler_name" and sampler is not None and find_sampler(as_str(name, value), name)[0] == sampler:
            continue
        raise JobError(
            f"{name} {shown(value)}: the second pass runs with the first pass's model, sampler and scheduler here",
            name,
            "unsupported_parameter",
        )
    x, y = (as_int(name, given.get(name, 0)) for name in ("hr_resize_x", "hr_resize_y"))
    if x or y:  # a size, as a scale: x over the width, else y over the height
        width = as_int("width", given.get("width", info.defaults.width))
        height = as_int("height", given.get("height", info.defaults.height))
        out["hr_scale"] = x / max(width, 1) if x else y / max(height, 1)  # (a width under 1 is refused later)
    return out


# What a field's value must be, when given, for the request to ask for what we do: a predicate and why not.
def _off(value: Any) -> bool:
    return value in (False, 0, "", [], {}, "None") or value is None


def _equals(*values: Any) -> Callable[[Any], bool]:
    return lambda value: any(value == wanted for wanted in values)


_ACCEPTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "restore_faces": (_off, "face restoration (GFPGAN, CodeFormer) is not implemented here"),
    "tiling": (_off, "tiling (seamless textures) is not implemented here"),
    "styles": (_off, "this server has no prompt styles"),
    "subseed_strength": (_equals(0), "variation seeds (subseed_strength) are not implemented here"),
    "seed_resize_from_h": (lambda v: as_int("seed_resize_from_h", v) <= 0, "seed resizing is not implemented here"),
    "seed_resize_from_w": (lambda v: as_int("seed_resize_from_w", v) <= 0, "seed resizing is not implemented here"),
    "s_min_uncond": (_equals(0), "s_min_uncond (skipping the negative prompt's steps) is not implemented here"),
    "s_churn": (_equals(0), "the samplers here take no s_churn (A1111's default 0 only)"),
    "s_tmin": (_equals(0), "the samplers here take no s_tmin (A1111's default 0 only)"),
    "s_tmax": (_equals(0, float("inf")), "the samplers here take no s_tmax (A1111's default only)"),
    "s_noise": (_equals(1), "the samplers here add noise as s_noise 1 does (A1111's default)"),
    "refiner_checkpoint": (_off, "refiner models are not implemented here"),
    "disable_extra_networks": (_off, "<lora:...> tags are always applied here"),
    "firstpass_image": (_off, "a hires fix from a given first-pass image is not implemented here"),
    "script_name": (_off, "this server runs no A1111 scripts"),
    "infotext": (_off, "filling a request from an infotext is not implemented here"),
    "firstphase_width": (_equals(0), "firstphase_width is A1111's old hires fix: use hr_scale or hr_resize_x/y"),
    "firstphase_height": (_equals(0), "firstphase_height is A1111's old hires fix: use hr_scale or hr_resize_x/y"),
    "image_cfg_scale": (_off, "image CFG (instruct-pix2pix models) is not implemented here"),
    "initial_noise_multiplier": (_equals(1), "the initial noise is not scaled here (A1111's default 1 only)"),
    "latent_mask": (_off, "a separate latent mask is not implemented here"),
    "clip_skip": (_equals(1), "CLIP skip is not implemented here (1 only: the last layer)"),
    "inpainting_mask_invert": (_equals(0, 1), "inpainting_mask_invert is 0 or 1"),
}
# With a mask: what we do is A1111's "original" content, the whole picture, a mask blurred by MASK_FEATHER_PX
_WITH_MASK: dict[str, tuple[Callable[[Any], bool], str]] = {
    "inpainting_fill": (_equals(1), "the masked area starts from the original image here (inpainting_fill 1)"),
    "inpaint_full_res": (_off, "inpainting here is of the whole picture (inpaint_full_res false)"),
    "mask_blur": (_equals(MASK_FEATHER_PX), f"the mask is blurred by {MASK_FEATHER_PX} px here"),
    "mask_blur_x": (_equals(MASK_FEATHER_PX), f"the mask is blurred by {MASK_FEATHER_PX} px here"),
    "mask_blur_y": (_equals(MASK_FEATHER_PX), f"the mask is blurred by {MASK_FEATHER_PX} px here"),
    "mask_round": (_equals(True), "the mask is rounded (mask_round true) here"),
}


def _refuse_unsupported(given: Mapping[str, Any], masked: bool) -> None:
    rules = {**_ACCEPTED, **(_WITH_MASK if masked else {})}
    if "mask_blur" in given:  # A1111: mask_blur, when given, sets both of mask_blur_x and _y
        rules.pop("mask_blur_x", None)
        rules.pop("mask_blur_y", None)
    for name, (accepted, why) in rules.items():
        if name not in given:
            continue
        try:
            ok = accepted(given[name])
        except JobError:
            raise
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise JobError(f"{name} {shown(given[name])}: {why}", name, "unsupported_parameter")
    if given.get("refiner_switch_at") is not None and not _off(given.get("refiner_checkpoint")):
        raise JobError("refiner models are not implemented here", "refiner_switch_at", "unsupported_parameter")
    if given.get("alwayson_scripts"):
        names = given["alwayson_scripts"]
        log.info(
            "A1111 request: alwayson_scripts ignored (this server runs no scripts): %s",
            ", ".join(map(str, names)) if isinstance(names, dict) else type(names).__name__,
        )


def mask_reader(invert: bool) -> Callable[[Image.Image], Image.Image]:
    """A1111's reading of a mask (processing.create_binary_mask): an image with transparency is masked where
    it is opaque (alpha over 128), any other by brightness (white: repaint); inverted where asked."""

    def read(image: Image.Image) -> Image.Image:
        if has_transparency(image):
            mask = image.getchannel("A").point(lambda alpha: 255 if alpha > 128 else 0)
        else:
            mask = image.convert("L")
        return ImageOps.invert(mask) if invert else mask

    return read


def stretched(job: Job) -> Job:
    """resize_mode 0 ("Just resize"): the init image and mask resized to the output size, whatever their aspect."""
    size = (job.width, job.height)
    return dataclasses.replace(
        job,
        init_image=None if job.init_image is None else job.init_image.resize(size, Image.Resampling.LANCZOS),
        mask=None if job.mask is None else job.mask.resize(size, Image.Resampling.LANCZOS),
    )


def check_hires_size(job: Job, hr_size: tuple[int, int]) -> None:
    """hr_resize_x/y, given as a scale (translate): the size the hires pass makes must be the size asked."""
    x, y = hr_size
    if job.hr_width is None or job.hr_height is None or not (x or y):
        return
    if (x and x != job.hr_width) or (y and y != job.hr_height):
        raise JobError(
            f"hr_resize {x}x{y} does not have the first pass's aspect ({job.width}x{job.height}): the hires fix "
            f"here scales both sides alike (this scale makes {job.hr_width}x{job.hr_height}); crop-to-fit is not "
            "implemented",
            "hr_resize_x",
            "unsupported_parameter",
        )


def _samples_format(value: Any, param: str) -> str:
    text = as_str(param, value).strip().lower()
    text = "jpeg" if text == "jpg" else text
    if text not in OUTPUT_FORMATS:
        raise JobError(f"samples_format {shown(value)}: png, jpg or webp", param, "invalid_value")
    return text


# --- the answer -----------------------------------------------------------------------------------------


def info_text(
    translated: Translated,
    jobs: list[Job],
    seeds: list[int],
    infotexts: list[str],
    info: ModelInfo,
    model_hash: str | None,
    started: float,
    saved: list[str],
) -> str:
    """The response's `info`: what A1111's Processed.js() says, as a JSON string."""
    job = jobs[0]
    count = len(infotexts)
    if job.hr_scale is not None:
        strength: float | None = job.hr_strength
    else:
        strength = job.strength if job.init_image is not None else None
    extra: dict[str, Any] = {}
    if job.hr_scale is not None:
        extra = {"Hires upscale": job.hr_scale, "Hires upscaler": a1111_upscaler(job.hr_upscaler)}
        if job.hr_steps:
            extra["Hires steps"] = job.hr_steps
    body: dict[str, Any] = {
        "prompt": translated.fields["prompt"],
        "all_prompts": [translated.fields["prompt"]] * count,
        "negative_prompt": translated.fields["negative_prompt"],
        "all_negative_prompts": [translated.fields["negative_prompt"]] * count,
        "seed": seeds[0] if seeds else job.seed,
        "all_seeds": seeds[:count],
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": job.width,
        "height": job.height,
        "sampler_name": A1111_SAMPLERS.get(job.sample_method, job.sample_method),
        "scheduler": A1111_SCHEDULES.get(job.scheduler, job.scheduler),
        "cfg_scale": job.cfg_scale,
        "steps": job.steps,
        "batch_size": job.n,
        "n_iter": len(jobs),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": info.name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": extra,
        "index_of_first_image": 0,  # no grid image is made
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"mlx-sd-server {importlib.metadata.version('mlx-sd-server')}",
    }
    if saved:  # save_images: kept in our store too
        body["saved_images"] = saved
    return json.dumps(body)


def echo(translated: Translated, job: Job) -> dict[str, Any]:
    """The request as A1111 echoes it (`parameters`): its fields with A1111's defaults for those absent, except
    where the model's defaults filled them: those say what was used."""
    out = dict(translated.parameters)
    for theirs, attribute in translated.filled.items():
        value = getattr(job, attribute)
        if theirs == "sampler_name":
            value = A1111_SAMPLERS.get(value, value)
        elif theirs == "scheduler":
            value = A1111_SCHEDULES.get(value, value)
        out[theirs] = value
    return out


# --- options -------------------------------------------------------------------------------------------


def options(default_model: str, preview_every: int) -> dict[str, Any]:
    """GET /sdapi/v1/options: the A1111 options this server has (the rest of A1111's do not apply here)."""
    return {
        "sd_model_checkpoint": default_model,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "eta_noise_seed_delta": 0,
        "live_previews_enable": True,
        "show_progress_every_n_steps": preview_every,
    }


# sd_vae values that mean "the model's own VAE"
OWN_VAE = ("Automatic", "None", "")


def check_option(key: str, value: Any, current: Mapping[str, Any], param: str) -> None:
    """An option a request may set (POST /options, override_settings) when it changes nothing: the value it
    has here (what a client that read the options sends back), or for sd_vae the model's own VAE."""
    if key == "sd_vae" and value in OWN_VAE:
        return
    if key not in current:
        raise JobError(f"unknown option {shown(key)} (this server has: {', '.join(current)})", param, "unknown_field")
    have = current[key]
    if (value is have) if isinstance(value, bool) or isinstance(have, bool) else value == have:
        return
    raise JobError(
        f"option {key} cannot be changed here (it is {shown(have)}, the request says {shown(value)})",
        param,
        "unsupported_parameter",
    )


# --- png-info ------------------------------------------------------------------------------------------

# image.info keys A1111's read_info_from_image leaves out of `items`
IGNORED_INFO_KEYS = {
    "jfif",
    "jfif_version",
    "jfif_unit",
    "jfif_density",
    "dpi",
    "exif",
    "loop",
    "background",
    "timestamp",
    "duration",
    "progressive",
    "progression",
    "icc_profile",
    "chromaticity",
    "photoshop",
}


def read_image_info(image: Image.Image) -> tuple[str | None, dict[str, Any]]:
    """A1111's read_info_from_image: the `parameters` text (a PNG text chunk, else the EXIF UserComment of a
    JPEG or WebP) and the image's other info items (JSON-able ones)."""
    items = dict(image.info or {})
    geninfo = items.pop("parameters", None)
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment:
        prefix, text = comment[:8], comment[8:]
        codec = "utf_16_be" if prefix == UNICODE_PREFIX else "ascii" if prefix == b"ASCII\0\0\0" else "utf-8"
        geninfo = text.decode(codec, errors="ignore")
    out: dict[str, Any] = {}
    for key, value in items.items():
        if key in IGNORED_INFO_KEYS or not isinstance(key, str):
            continue
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (str, int, float, bool)) or (
            isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value)
        ):
            out[key] = value
    return (geninfo if isinstance(geninfo, str) else None), out


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
# What A1111's parse_generation_parameters fills in when an infotext does not say (modules/infotext_utils.py)
_MISSING = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's parse_generation_parameters: the prompt, the negative prompt, and each `Key: value` of the last
    line (values as text, a quoted one unquoted, a `WxH` one split into `Key-1` and `Key-2`), with A1111's
    values for the keys an infotext leaves out."""
    result: dict[str, Any] = {}
    prompt = negative = ""
    negative_started = False
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative_started = True
            line = line[16:].strip()
        if negative_started:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result["Prompt"] = prompt
    result["Negative prompt"] = negative
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    for key, value in _MISSING.items():
        result.setdefault(key, value)
    return result


# --- extra-single-image ---------------------------------------------------------------------------------

# ExtrasSingleImageRequest's fields (modules/api/models.py), with A1111's defaults
EXTRAS_FIELDS: dict[str, Any] = {
    "image": "",
    "resize_mode": 0,
    "show_extras_results": True,
    "gfpgan_visibility": 0,
    "codeformer_visibility": 0,
    "codeformer_weight": 0,
    "upscaling_resize": 2,
    "upscaling_resize_w": 512,
    "upscaling_resize_h": 512,
    "upscaling_crop": True,
    "upscaler_1": "None",
    "upscaler_2": "None",
    "extras_upscaler_2_visibility": 0,
    "upscale_first": False,
}


@dataclass(frozen=True)
class Extras:
    upscaler: str  # ours
    scale: float | None  # resize_mode 0: by this; None: to `size`
    size: tuple[int, int]  # resize_mode 1: to cover this size
    crop: bool  # resize_mode 1: cropped to `size` (centred)


def extras_request(raw: Mapping[str, Any], upscalers: Collection[str]) -> Extras:
    """An extra-single-image request (less its image) in our terms: the upscale of it we do; face restoration
    and a second upscaler blended in are refused."""
    if unknown := sorted(set(raw) - set(EXTRAS_FIELDS)):
        raise JobError(
            f"unknown field {shown(unknown[0])}: A1111's /sdapi/v1/extra-single-image has no such field",
            unknown[0],
            "unknown_field",
        )
    given = {name: value for name, value in raw.items() if value is not None}
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if as_float(name, given.get(name, 0)) != 0:
            raise JobError(f"{name}: face restoration is not implemented here", name, "unsupported_parameter")
    if as_float("extras_upscaler_2_visibility", given.get("extras_upscaler_2_visibility", 0)) != 0 and given.get(
        "upscaler_2", "None"
    ) not in (None, "", "None"):
        raise JobError(
            "upscaler_2: blending in a second upscaler is not implemented here", "upscaler_2", "unsupported_parameter"
        )
    upscaler = upscaler_name(given.get("upscaler_1") or "None", "upscaler_1", upscalers, latent=False)
    resize_mode = as_int("resize_mode", given.get("resize_mode", 0))
    if resize_mode not in (0, 1):
        raise JobError(f"resize_mode must be 0 or 1, got {resize_mode}", "resize_mode", "invalid_value")
    size = (
        as_int("upscaling_resize_w", given.get("upscaling_resize_w", 512)),
        as_int("upscaling_resize_h", given.get("upscaling_resize_h", 512)),
    )
    if resize_mode == 1 and min(size) < 1:
        raise JobError(
            f"upscaling_resize_w and _h must be at least 1, got {size}", "upscaling_resize_w", "out_of_range"
        )
    return Extras(
        upscaler=upscaler,
        scale=as_float("upscaling_resize", given.get("upscaling_resize", 2)) if resize_mode == 0 else None,
        size=size,
        crop=as_bool("upscaling_crop", given.get("upscaling_crop", True)),
    )


def extras_info(extras: Extras, scale: float) -> str:
    """extra-single-image's `html_info`: A1111's postprocessing infotext as its plaintext_to_html makes it."""
    name = html.escape(a1111_upscaler(extras.upscaler))
    return f"<p>Postprocess upscale by: {scale:g}, Postprocess upscaler: {name}</p>"
