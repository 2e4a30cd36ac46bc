"""`mlx-sd-server generate`: one job from the command line, through the same job type and engine as the server."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mlx_sd_server.cli import flag_for
from mlx_sd_server.engine.model_io import write_atomically
from mlx_sd_server.engine.pipeline import drive
from mlx_sd_server.images import (
    a1111_parameters,
    encode_image,
    flatten,
    mask_from_upload,
    model_hash,
    open_upload,
    short_sha256,
)
from mlx_sd_server.job import IMAGE_FIELDS, IMAGE_LISTS, JOB_FIELDS, Job, JobError, build_job
from mlx_sd_server.registry import ModelLoadError, ModelNotFoundError, ModelRegistry, model_dir, physical_memory
from mlx_sd_server.upscale.library import UPSCALER_FOLDER, UpscalerLibrary

log = logging.getLogger(__name__)

MAX_INPUT_BYTES = 200 * 2**20
MAX_INPUT_PIXELS = 64 * 2**20
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def cli_message(exc: JobError) -> str:
    """A job error as the command line says it: naming `--cfg-scale`, not the API's `cfg_scale`."""
    if not exc.param:
        return str(exc)
    flag = flag_for(exc.param)
    if len(exc.param) > 1:
        message, found = re.subn(rf"(?<![\w\-\[]){re.escape(exc.param)}(?![\w\-])", flag, str(exc))
    else:  # a one-letter field (n) only where it starts the message
        message, found = re.subn(rf"^{re.escape(exc.param)}(?=\W)", flag, str(exc))
    return message if found else f"{flag}: {message}"


def _read_image(path: str, param: str, hashes: list[tuple[str, str]]) -> Image.Image:
    """An input image file, decoded as an upload is; its short hash added to `hashes` (for the metadata)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise JobError(f"cannot read {param} {path}: {exc.strerror}", param, "invalid_image") from None
    image = open_upload(data, param, max_bytes=MAX_INPUT_BYTES, max_pixels=MAX_INPUT_PIXELS, label=f"{param} {path}")
    hashes.append((param, short_sha256(data)))
    return image


def job_from_args(args: argparse.Namespace, registry: ModelRegistry) -> Job:
    fields = {name: getattr(args, name) for name in JOB_FIELDS if getattr(args, name, None) is not None}
    fields["model"] = registry.default_name
    if args.lora:  # NAME[:WEIGHT]; build_job reads the weight
        named = [lora.rpartition(":") if ":" in lora else (lora, "", "1") for lora in args.lora]
        fields["loras"] = [{"name": name, "scale": weight} for name, _, weight in named]
    hashes: list[tuple[str, str]] = []
    images: dict[str, Image.Image | list[Image.Image]] = {}
    for name in IMAGE_FIELDS:
        if paths := getattr(args, name):
            prepare = mask_from_upload if name == "mask" else flatten
            if name in IMAGE_LISTS:  # --image, repeated: the inputs in order
                images[name] = [prepare(_read_image(path, name, hashes)) for path in paths]
            else:
                images[name] = prepare(_read_image(paths, name, hashes))
    info = registry.info()
    return build_job(
        fields,
        images,
        defaults=info.defaults,
        capabilities=info.capabilities,
        model_name=info.name,
        lora_family=registry.loras.family,
        input_hashes=hashes,
        upscalers=registry.upscalers.names(),
    )


def output_format(args: argparse.Namespace) -> str:
    """--output-format, else --output's suffix, else png; a suffix that disagrees with --output-format is an error."""
    suffix_format = SUFFIX_FORMATS.get(Path(args.output).suffix.lower())
    chosen = getattr(args, "output_format", None)
    if chosen and suffix_format and chosen != suffix_format and not Path(args.output).is_dir():
        raise JobError(f"--output {args.output} is a .{suffix_format} name but --output-format is {chosen}")
    return chosen or suffix_format or "png"


def is_directory_output(output: str) -> bool:
    target = Path(output)
    return target.is_dir() or target.suffix.lower() not in SUFFIX_FORMATS


def file_outputs(output: str, n: int) -> list[Path]:
    """--output FILE: that name, or with n > 1 `NAME-1.png`, `NAME-2.png`..."""
    target = Path(output)
    if n == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{i + 1}{target.suffix}") for i in range(n)]


def claim_new_file(folder: Path, stem: str, suffix: str) -> Path:
    """A path in `folder` that did not exist, created empty (exclusively, so that two runs at once cannot pick the
    same one): `stem.png`, else `stem-2.png`, `stem-3.png`..."""
    for i in range(1, 100000):
        path = folder / (f"{stem}{suffix}" if i == 1 else f"{stem}-{i}{suffix}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free file name for {stem}{suffix} in {folder}")


def output_paths(output: str, job: Job, model_name: str, fmt: str = "png", force: bool = False) -> list[Path]:
    """Where a job's images go. A directory gets a new `<model>-<seed>.<ext>` file per image (`-2`, `-3`...
    added when that name is taken: nothing is ever replaced); a file name is used as given (`-1`, `-2`...
    suffixes when n > 1) and an existing file is replaced only with `force`."""
    if is_directory_output(output):
        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        return [claim_new_file(folder, f"{model_name}-{seed}", FORMAT_SUFFIXES[fmt]) for seed in job.seeds()]
    paths = file_outputs(output, job.n)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(existing)} already exists (--force replaces it; a directory as --output gets new file names)"
        )
    return paths


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    force = getattr(args, "force", False)
    try:
        fmt = output_format(args)
        quality = getattr(args, "output_compression", None)
        if quality is not None and not 0 <= quality <= 100:
            raise JobError(f"--output-compression must be 0..100, got {quality}")
        if not is_directory_output(args.output) and not force:
            existing = [str(p) for p in file_outputs(args.output, args.n or 1) if p.exists()]
            if existing:  # checked before loading the model, and again once the images are made
                raise FileExistsError(
                    f"{', '.join(existing)} already exists (--force replaces it; a directory as "
                    "--output gets new file names)"
                )
        registry = ModelRegistry(
            [args.model],
            model_dir(args.model_dir),
            control_net=args.control_net,
            dtype=args.dtype,
            engine=args.engine,
            low_memory=args.low_memory,
            lora_dir=args.lora_model_dir,
            lora_fuse_budget=int(args.lora_fuse_gb * 2**30),
            max_memory=physical_memory(),  # one job: the model may take what the machine has
        )
        job = job_from_args(args, registry)
        pipeline = registry.pipeline()
        with tqdm(total=pipeline.total_steps(job), unit="step", disable=not sys.stderr.isatty()) as bar:
            images = drive(pipeline.generate(job), lambda step: bar.update())
        name = registry.default_name
        paths = output_paths(args.output, job, name, fmt, force)
    except JobError as exc:
        print(f"mlx-sd-server generate: {cli_message(exc)}", file=sys.stderr)
        return 2
    except (ModelNotFoundError, ModelLoadError) as exc:
        print(f"mlx-sd-server generate: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"mlx-sd-server generate: {exc}", file=sys.stderr)
        return 1
    hashed = model_hash(registry.info().folder)
    lora_hashes = {lora: registry.loras.short_hash(lora) for lora, _ in job.loras}
    for image, seed, path in zip(images, job.seeds(), paths):
        parameters = a1111_parameters(job, seed, name, model_hash=hashed, lora_hashes=lora_hashes)
        data = encode_image(image, fmt, quality=quality, parameters=parameters)

        def write(tmp: str, data: bytes = data) -> None:  # bound now (B023), though it is called at once
            Path(tmp).write_bytes(data)

        write_atomically(path, write)
        print(path)
    return 0


# `upscale`: the output's pixels at most (a 4096x4096 image, as /v1/images/upscale)
MAX_UPSCALE_PIXELS = 4096 * 4096


def upscale(args: argparse.Namespace) -> int:
    """`mlx-sd-server upscale IN -o OUT`: one image enlarged by an upscaler (upscale.library)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    library = UpscalerLibrary(model_dir(args.model_dir) / UPSCALER_FOLDER)
    try:
        fmt = output_format(args)
        target = Path(args.output)
        if target.exists() and not args.force:
            raise FileExistsError(f"{target} already exists (--force replaces it)")
        name = args.upscaler or default_upscaler(library)
        scale = args.scale if args.scale is not None else library.info(name).scale
        image = flatten(_read_image(args.input, "image", []))
        width, height = round(image.width * scale), round(image.height * scale)
        if scale <= 0 or width * height > MAX_UPSCALE_PIXELS:
            raise JobError(f"--scale {scale:g} would make {width}x{height}: at most {MAX_UPSCALE_PIXELS} pixels")
        result = library.upscale(name, image, scale)
        data = encode_image(result, fmt, quality=args.output_compression)
    except JobError as exc:
        print(f"mlx-sd-server upscale: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"mlx-sd-server upscale: {exc}", file=sys.stderr)
        return 1
    write_atomically(target, lambda tmp: Path(tmp).write_bytes(data))
    print(target)
    return 0


def default_upscaler(library: UpscalerLibrary) -> str:
    """The one converted upscaler; else --upscaler must say which."""
    converted = [name for name in library.names() if library.info(name).folder is not None]
    if len(converted) == 1:
        return converted[0]
    choices = ", ".join(library.names())
    raise JobError(f"name one with --upscaler ({choices}); convert one with `mlx-sd-server convert FILE`")
