"""`mlx-sd-server convert SRC [NAME]`: into the model directory by name (a lone ControlNet into its `controlnets/`
folder, an upscaler file into `upscalers/`), or to a folder given as a path."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from convert.diffusers_folder import CONTROLNET
from convert.model import SplitFiles, convert_model
from mlx_sd_server.engine.model_io import read_manifest
from mlx_sd_server.engine.source import ArchitectureHints
from mlx_sd_server.paths import CONTROLNET_FOLDER, model_dir
from mlx_sd_server.upscale.library import UPSCALER_FOLDER, UpscalerLibrary
from mlx_sd_server.upscale.weights import convert_upscaler, is_upscaler_file

SPLIT_OPTIONS = ("diffusion_model", "vae", "clip_l", "clip_g", "t5xxl", "t5_tokenizer", "llm", "llm_tokenizer")


def split_files(args: argparse.Namespace) -> SplitFiles | None:
    """The split-file options (`--diffusion-model`, `--vae`, ...) as one source, or None when none is given."""
    split = {name: Path(getattr(args, name)).expanduser() for name in SPLIT_OPTIONS if getattr(args, name, None)}
    if split and "diffusion_model" not in split:
        raise ValueError("split files need --diffusion-model (the transformer file)")
    return SplitFiles(**split) if split else None


def given_hints(args: argparse.Namespace) -> ArchitectureHints:
    """The architecture options (`--text-head-dim`, ...: one per hint); those not given are None, guessed."""
    return ArchitectureHints(**{hint.name: getattr(args, hint.name, None) for hint in fields(ArchitectureHints)})


def is_path(text: str) -> bool:
    """A DST that names a folder (`./out`, `~/models/x`, `out/`) rather than a model name (`dreamshaper`)."""
    return "/" in text or os.sep in text or text.startswith((".", "~"))


def destination(args: argparse.Namespace, source: Path, given: str | None) -> tuple[Path, str | None]:
    """(the output folder, the manifest name or None for the folder's name). A bare NAME goes into the model
    directory; a path is the folder itself; --output DIR is the folder, and NAME then only names the model."""
    output = getattr(args, "output", None)
    if output:
        return Path(output).expanduser(), args.name or (given if given and not is_path(given) else None)
    if given and is_path(given):
        return Path(given).expanduser(), args.name
    name = given or (source.stem if source.is_file() else source.name).lower()
    return model_dir(getattr(args, "model_dir", None)) / name, args.name or name


def controlnet_folder(models: Path, name: str) -> Path:
    """Where a lone ControlNet converted into the model directory by name lives."""
    return models / CONTROLNET_FOLDER / name


def file_controlnet(folder: Path) -> str | None:
    """A conversion into the model directory by name that turns out a lone ControlNet moves into `controlnets/`,
    where the server lists it (GET /v1/controlnets) and requests name it (`control_net`): its name there, or
    None for any other model. (What a source is shows once it is read: it is written beside the models first.)"""
    manifest = read_manifest(folder)
    if manifest.get("family") != CONTROLNET:
        return None
    target = controlnet_folder(folder.parent, folder.name)
    target.parent.mkdir(exist_ok=True)
    try:
        os.rename(folder, target)  # (refused where a ControlNet of that name appeared meanwhile)
    except OSError:
        shutil.rmtree(folder)  # as a failed conversion, nothing is left
        raise
    return str(manifest.get("name", folder.name))


def upscaler_main(args: argparse.Namespace, source: Path, dst: Path, name: str | None, by_name: bool) -> int:
    """An ESRGAN-family upscaler file: into the model directory's `upscalers/NAME` (by name), or at `dst`."""
    try:
        if args.quantize:
            raise ValueError("upscalers are not quantized: leave --quantize out")
        folder = UpscalerLibrary(dst.parent / UPSCALER_FOLDER).folder_for(name or dst.name) if by_name else dst
        out = convert_upscaler(source, folder, dtype=args.dtype, allow_pickle=args.allow_pickle)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"mlx-sd-server convert: {exc}", file=sys.stderr)
        return 1
    print(f"converted {source} -> {out} (an upscaler: requests name it with upscaler={out.name})")
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        split = split_files(args)
    except ValueError as exc:
        print(f"mlx-sd-server convert: {exc}", file=sys.stderr)
        return 2
    least = 0 if split else 1  # SRC, unless split files are the source; then an optional NAME or DST
    if not least <= len(args.paths) <= least + 1:
        usage = (
            "--diffusion-model FILE [--vae FILE --clip-l FILE --clip-g FILE --t5xxl FILE --llm FILE] [NAME]"
            if split
            else "SRC [NAME]"
        )
        print(f"mlx-sd-server convert: expected {usage}", file=sys.stderr)
        return 2
    src = split or args.paths[0]
    source_path = Path(split.diffusion_model if split else args.paths[0]).expanduser()
    dst, name = destination(args, source_path, args.paths[least] if len(args.paths) > least else None)
    by_name = dst.parent == model_dir(getattr(args, "model_dir", None))
    if not split and is_upscaler_file(source_path, args.allow_pickle):
        return upscaler_main(args, source_path, dst, name, by_name)
    if by_name and controlnet_folder(dst.parent, dst.name).exists():
        print(
            f"mlx-sd-server convert: a ControlNet named {dst.name} is in {dst.parent / CONTROLNET_FOLDER}",
            file=sys.stderr,
        )
        return 1
    try:
        out = convert_model(
            src,
            dst,
            dtype=args.dtype,
            quantize=args.quantize,
            prediction_type=args.prediction_type,
            allow_pickle=args.allow_pickle,
            name=name,
            progress=sys.stderr.isatty(),
            with_t5=not args.no_t5,
            hints=given_hints(args),
        )
        controlnet = file_controlnet(out) if by_name else None
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"mlx-sd-server convert: {exc}", file=sys.stderr)
        return 1
    given = args.diffusion_model or args.paths[0]
    if controlnet is not None:
        folder = controlnet_folder(dst.parent, dst.name)
        print(f"converted {given} -> {folder} (a ControlNet: requests name it with control_net={controlnet})")
    else:
        print(f"converted {given} -> {Path(out)}")
    return 0
