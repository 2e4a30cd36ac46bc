"""`mlx-sd-server generate`: one job from the command line, through the same job type and engine as the server."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mlx_sd_server.engine.model_io import write_atomically
from mlx_sd_server.engine.pipeline import drive
from mlx_sd_server.images import a1111_parameters, encode_image, flatten, mask_from_upload, open_upload
from mlx_sd_server.job import JOB_FIELDS, Job, JobError, build_job
from mlx_sd_server.registry import ModelLoadError, ModelNotFoundError, ModelRegistry, model_dir

log = logging.getLogger(__name__)

MAX_INPUT_BYTES = 200 * 2**20
MAX_INPUT_PIXELS = 64 * 2**20
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _read_image(path: str, param: str) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise JobError(f"cannot read {param} {path}: {exc.strerror}", param, "invalid_image") from None
    return open_upload(data, param, max_bytes=MAX_INPUT_BYTES, max_pixels=MAX_INPUT_PIXELS)


def job_from_args(args: argparse.Namespace, registry: ModelRegistry) -> Job:
    fields = {name: getattr(args, name) for name in JOB_FIELDS if getattr(args, name, None) is not None}
    fields["model"] = registry.default_name
    images = {}
    if args.image:
        images["image"] = flatten(_read_image(args.image, "image"))
    if args.mask:
        images["mask"] = mask_from_upload(_read_image(args.mask, "mask"))
    if args.control_image:
        images["control_image"] = flatten(_read_image(args.control_image, "control_image"))
    info = registry.info()
    return build_job(fields, images, defaults=info.defaults, capabilities=info.capabilities, model_name=info.name)


def output_paths(output: str, job: Job, model_name: str) -> list[Path]:
    """A directory gets `<model>-<seed>.png` files; a file name gets `-1`, `-2`... suffixes when n > 1."""
    target = Path(output)
    if target.is_dir() or target.suffix.lower() not in SUFFIX_FORMATS:
        target.mkdir(parents=True, exist_ok=True)
        return [target / f"{model_name}-{seed}.png" for seed in job.seeds()]
    target.parent.mkdir(parents=True, exist_ok=True)
    if job.n == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{i + 1}{target.suffix}") for i in range(job.n)]


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        registry = ModelRegistry([args.model], model_dir(args.model_dir), control_net=args.control_net,
                                 dtype=args.dtype, engine=args.engine, low_memory=args.low_memory)
        job = job_from_args(args, registry)
        pipeline = registry.pipeline()
        with tqdm(total=pipeline.total_steps(job), unit="step", disable=not sys.stderr.isatty()) as bar:
            images = drive(pipeline.generate(job), lambda step: bar.update())
    except (JobError, ModelNotFoundError, ModelLoadError) as exc:
        print(f"mlx-sd-server generate: {exc}", file=sys.stderr)
        return 2
    name = registry.default_name
    for image, seed, path in zip(images, job.seeds(), output_paths(args.output, job, name)):
        data = encode_image(image, SUFFIX_FORMATS.get(path.suffix.lower(), "png"), parameters=a1111_parameters(job, seed, name))
        write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
        print(path)
    return 0
