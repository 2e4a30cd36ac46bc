"""The `mlx-sd-server` command: argument parsing only; each subcommand lives in its own module.

Option names mirror the API's field names (`sample_method` -> `--sample-method`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing

from mlx_sd_server import store
from mlx_sd_server.client import API_KEY_ENV, DEFAULT_URL, URL_ENV, normalized_url
from mlx_sd_server.engine.source import ArchitectureHints, hint_option
from mlx_sd_server.job.fields import (
    FIELDS,
    IMAGE_FIELDS,
    IMAGE_LISTS,
    MODEL_FIELDS,
    Field,
    JobError,
    Limits,
    as_keep_alive,
)

DESCRIPTION = (
    "Generate images with Stable Diffusion and FLUX.1 models on Apple silicon (MLX): serve an "
    "OpenAI-compatible image API, generate from the command line, and download, convert and manage models."
)

# subcommand -> "module:function" taking the parsed arguments; imported lazily so `--help` is instant.
HANDLERS = {
    "serve": "mlx_sd_server.api.server:main",
    "generate": "mlx_sd_server.generate:main",
    "upscale": "mlx_sd_server.generate:upscale",
    "convert": "convert.cli:main",
    "pull": "convert.pull:main",
    "models": "mlx_sd_server.registry:print_models",
    "rm": "mlx_sd_server.registry:remove_model",
    "ps": "mlx_sd_server.registry:print_loaded",
    "stop": "mlx_sd_server.registry:stop_model",
    "service": "mlx_sd_server.service:main",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has a meaningful one (not None, False or an empty list) and its
    help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action) or ""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-sd-server")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def add_model_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir", help="where converted models live (default: $MLX_SD_MODEL_DIR or the user data dir)"
    )


def add_server_address(parser: argparse.ArgumentParser) -> None:
    """Where the running server is, for the commands that talk to it."""
    parser.add_argument(
        "--url",
        type=_checked(normalized_url),
        help=f"the running server's address (default: ${URL_ENV}, else {DEFAULT_URL}, where serve listens by default)",
    )
    parser.add_argument(
        "--api-key", help=f"the server's --api-key, if it was started with one (default: ${API_KEY_ENV})"
    )


def add_no_t5(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-t5",
        action="store_true",
        help="SD3/SD3.5: leave T5-XXL out (4.7B parameters less to download, store and run; prompts "
        "then reach the model through the CLIPs alone, as diffusers allows)",
    )


def add_lora_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora-model-dir",
        metavar="DIR",
        help="where LoRAs (.safetensors) are, named in prompts as <lora:NAME:WEIGHT> (default: "
        "the loras folder in the model directory)",
    )
    parser.add_argument(
        "--lora-fuse-gb",
        type=float,
        default=0.0,
        metavar="GB",
        help="fuse a job's LoRAs into copies of the float layers they adapt, up to GB of weights "
        "(default 0: low-rank side branches, no copies; bench/lora.py measures both)",
    )


def add_split_file_options(parser: argparse.ArgumentParser) -> None:
    """A model given as separate component files, as stable-diffusion.cpp takes them (FLUX.1, SD3/SD3.5, Z-Image,
    FLUX.2 klein)."""
    split = parser.add_argument_group(
        "split files (FLUX.1, SD3/SD3.5, Z-Image, FLUX.2 klein, as stable-diffusion.cpp takes them)"
    )
    split.add_argument(
        "--diffusion-model",
        metavar="FILE",
        help="the transformer, e.g. flux1-dev.safetensors or .gguf, sd3.5_large.safetensors, "
        "z_image_turbo_bf16.safetensors, flux-2-klein-4b.safetensors",
    )
    split.add_argument(
        "--vae", metavar="FILE", help="the autoencoder, e.g. ae.safetensors (FLUX.2: flux2-vae.safetensors)"
    )
    split.add_argument("--clip-l", metavar="FILE", help="CLIP-L, e.g. clip_l.safetensors")
    split.add_argument("--t5xxl", metavar="FILE", help="T5-XXL, e.g. t5xxl_fp16.safetensors or t5xxl-Q8_0.gguf")
    split.add_argument("--clip-g", metavar="FILE", help="CLIP-G (SD3/SD3.5), e.g. clip_g.safetensors")
    split.add_argument(
        "--t5-tokenizer",
        metavar="PATH",
        help="T5's tokenizer.json (or its folder); default: downloaded from FLUX.1-schnell's repo",
    )
    split.add_argument(
        "--llm",
        metavar="FILE",
        help="the Qwen3 text encoder (Z-Image; FLUX.2 klein 4B: Qwen3-4B, 9B: Qwen3-8B), e.g. "
        "qwen_3_4b.safetensors or Qwen3-4B-Instruct-2507-Q4_K_M.gguf",
    )
    split.add_argument(
        "--llm-tokenizer",
        metavar="PATH",
        help="Qwen3's tokenizer.json (or its folder); default: a GGUF file's own, else downloaded from "
        "Z-Image-Turbo's repo",
    )


def positive_int(text: str) -> int:
    value = int(text)  # (argparse reports a ValueError as an invalid value)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    return tuple(positive_int(part) for part in text.split(","))


def add_architecture_options(parser: argparse.ArgumentParser) -> None:
    """One option per ArchitectureHints field (`--text-head-dim N`, `--axes-dims-rope 16,56,56`, ...): what a
    single file cannot tell, for models whose shapes are not the released ones."""
    group = parser.add_argument_group(
        "what a single file cannot tell",
        "default: the released models' values, taken as guesses, which are logged (a warning where the shapes "
        "are not a released model's) and recorded in the manifest's `guessed`",
    )
    types = typing.get_type_hints(ArchitectureHints)
    for hint in dataclasses.fields(ArchitectureHints):
        several = typing.get_origin(typing.get_args(types[hint.name])[0]) is tuple  # (the type is `X | None`)
        group.add_argument(
            hint_option(hint.name),
            type=positive_ints if several else positive_int,
            metavar="N,N,N" if several else "N",
            help=hint.metadata["help"],
        )


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Options of `serve`, shared with `service install` (which writes them into the service file). The
    reference's (sd-api-server's) flags are accepted as it documents them."""
    add_model_dir(parser)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="a model to serve: a name, a converted folder, a diffusers folder, a .safetensors or "
        ".gguf file, a Hugging Face id (repeatable; the first is the default)",
    )
    parser.add_argument("--model-name", metavar="NAME", help="the API name of the default model (the reference's)")
    parser.add_argument(
        "--strict-model-names",
        action="store_true",
        help="a request's model must name a served model (default: unknown names and OpenAI's "
        "dall-e-*/gpt-image-* are served by the default model while only one is served)",
    )
    add_split_file_options(parser)
    parser.add_argument(
        "--control-net",
        metavar="NAME_OR_PATH",
        help="the default model's ControlNet (a request picks any with control_net; GET /v1/controlnets)",
    )
    add_lora_dir(parser)
    parser.add_argument(
        "--max-memory",
        type=_checked(memory_size),
        metavar="GB",
        help="memory the loaded models may take together; loading one unloads the least recently used "
        "(default: 60%% of this machine's memory)",
    )
    parser.add_argument(
        "--keep-alive",
        type=_checked(keep_alive),
        metavar="DURATION",
        help="how long a model stays loaded after its last job, as Ollama's: 30s, 5m, 1h; 0: unload after "
        "each job; -1: keep loaded (default: 5m; a request's keep_alive overrides it)",
    )
    parser.add_argument(
        "--task",
        "--context-type",
        choices=["full", "text2image", "image2image"],
        default="full",
        help="which endpoints are on: both, /v1/images/generations only, or /v1/images/edits only",
    )
    # None, not "127.0.0.1": `service install` writes only options that differ from their defaults, so an
    # explicit --host 127.0.0.1 stays in the service file.
    parser.add_argument(
        "--host",
        default=None,
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every "
        "interface: then set --api-key)",
    )
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--socket-addr", metavar="HOST:PORT", help="host and port in one (the reference's)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads (Linux: the cores this process uses)")
    for flag, what in (
        ("--clip-on-cpu", "text encoders"),
        ("--vae-on-cpu", "VAE"),
        ("--control-net-cpu", "ControlNet"),
    ):
        parser.add_argument(
            flag,
            action="store_true",
            help=f"the reference's: keep the {what} on the CPU (no effect with MLX: CPU and GPU share unified memory)",
        )
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $API_KEY)")
    parser.add_argument(
        "--download-url-prefix",
        metavar="URL",
        help="public prefix of image urls, e.g. behind a proxy (default: the address the server listens on)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API from a browser "
        "(repeatable; '*' for any page). Default: none, browsers' cross-origin calls are refused",
    )
    parser.add_argument("--store-dir", help="where generated images are kept")
    parser.add_argument(
        "--store-max-age",
        type=_checked(store.max_age),
        metavar="AGE",
        help="remove stored images older than AGE: 90s, 30m, 12h, 7d (a bare number is hours; "
        "default: keep until deleted)",
    )
    parser.add_argument(
        "--store-max-gb",
        type=_checked(store.max_gb),
        metavar="GB",
        help="keep the stored images under GB in all, removing the oldest first (default: no limit)",
    )
    parser.add_argument(
        "--store",
        type=_checked(store.s3_location),
        metavar="s3://BUCKET/PREFIX",
        help=f"keep the images in an S3-compatible bucket instead of --store-dir (default: ${store.STORE_ENV}); "
        "endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION "
        "(needs the s3 extra: pip install 'mlx-sd-server[s3]')",
    )
    parser.add_argument(
        "--store-urls",
        choices=["files", "presigned"],
        default="files",
        help="image urls: through this server's /v1/files (default), or presigned urls clients fetch from the "
        "S3 bucket directly",
    )
    parser.add_argument(
        "--store-url-expiry",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="how long a presigned image url is valid (default: 3600; at most 604800, 7 days)",
    )
    parser.add_argument("--max-queue", type=int, default=8, help="jobs waiting beyond this get 429")
    parser.add_argument("--max-n", type=int, default=Limits.max_n, help="largest n per request")
    parser.add_argument("--max-steps", type=int, default=Limits.max_steps, help="most steps per request")
    parser.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="largest width*height")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    parser.add_argument(
        "--write-timeout",
        type=float,
        metavar="SECONDS",
        help="give up on a client that has read nothing of its answer for this long: a stalled "
        "stream (default: 30; 0: never)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="compute dtype (default: float16 on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--engine",
        choices=["mlx", "torch", "auto"],
        default="mlx",
        help="mlx, the diffusers/torch fallback, or auto (torch where MLX cannot load a model)",
    )
    add_low_memory_option(parser)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="how much the server logs"
    )
    ray = parser.add_argument_group("Ray Serve (several replicas behind one address; docs/cluster.md)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: the HTTP app as its ingress, one deployment per model (needs the "
        "cluster extra: pip install 'mlx-sd-server[cluster]')",
    )
    ray.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas per model (default: 1)")
    scale.add_argument(
        "--autoscale", type=autoscale_range, metavar="MIN:MAX", help="replicas per model, scaled with the load"
    )
    ray.add_argument("--ingress-replicas", type=int, default=1, metavar="N", help="HTTP replicas (default: 1)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, metavar="N", help="CPUs each model replica takes")
    ray.add_argument("--replica-gpus", type=float, default=0.0, metavar="N", help="GPUs each model replica takes")


def autoscale_range(text: str) -> str:
    """--autoscale MIN:MAX (0 <= MIN <= MAX, MAX >= 1), checked; kept as written."""
    low, colon, high = text.partition(":")
    if not colon or not low.isdigit() or not high.isdigit() or int(low) > int(high) or int(high) < 1:
        raise argparse.ArgumentTypeError(f"must be MIN:MAX replicas (0 <= MIN <= MAX, MAX >= 1), got {text!r}")
    return text


def memory_size(text: str) -> int:
    """--max-memory: a positive size in GB (GiB; fractions allowed), in bytes."""
    return store.max_gb(text)


def keep_alive(text: str) -> float:
    """--keep-alive: seconds (math.inf: kept), as a request's keep_alive reads it."""
    try:
        return as_keep_alive("--keep-alive", text)
    except JobError as error:
        raise ValueError(error.message) from None


def _checked(convert):
    """An argparse type that checks a value with `convert` but keeps the text as given, so that `service
    install` writes back what the user wrote (7d, not 604800.0, which would read back as hours)."""

    def check(text: str) -> str:
        try:
            convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    check.__name__ = convert.__name__  # argparse names the option's type in its error messages
    return check


# API field -> this command's option, where the option is not simply `--` + the field with dashes.
FLAG_NAMES = {"n": "-n", "image[]": "--image"}
OPTION_TYPES = {"integer": int, "number": float}  # by the field's JSON type; any other is taken as text


def flag_for(param: str) -> str:
    return FLAG_NAMES.get(param, "--" + param.replace("_", "-"))


def field_help(field: Field) -> str:
    """A job field's help with its choices and its default, as the API's schema says them."""
    choices = f"; one of {', '.join(field.choices)}" if field.choices else ""
    default = "the model's" if field.name in MODEL_FIELDS else field.default
    return field.help + choices + (f" (default: {default})" if default not in (None, "") else "")


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """Options of `generate`: one per job field the command line takes (job/fields.py), and its images."""
    add_model_dir(parser)
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_PATH",
        help="a model name (see `mlx-sd-server models`), a converted folder, a diffusers folder, a "
        ".safetensors file or a Hugging Face id",
    )
    parser.add_argument("--control-net", metavar="NAME_OR_PATH", help="a ControlNet to attach")
    add_lora_dir(parser)
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME[:WEIGHT]",
        help="a LoRA to apply (repeatable), as a <lora:NAME:WEIGHT> prompt tag would",
    )
    for field in FIELDS:
        if field.cli:  # no default here: build_job applies the model's, and knows what was given
            parser.add_argument(
                *dict.fromkeys((flag_for(field.name), "--" + field.name.replace("_", "-"))),
                type=OPTION_TYPES.get(field.type, str),
                required=field.required,
                help=field_help(field),
            )
    for name, help_text in IMAGE_FIELDS.items():
        if name in IMAGE_LISTS:  # repeated: an instruction edit's input images, in order
            parser.add_argument(flag_for(name), metavar="PATH", action="append", help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag_for(name), metavar="PATH", help=help_text)
    parser.add_argument(
        "--output",
        "-o",
        default=".",
        metavar="PATH_OR_DIR",
        help="a directory (each image gets a new file, <model>-<seed>.<ext>, never replacing one) "
        "or a file name (.png/.jpg/.webp; with -n 2 or more, NAME-1.png, NAME-2.png...)",
    )
    parser.add_argument("--force", action="store_true", help="let --output FILE replace an existing file")
    parser.add_argument(
        "--output-format",
        choices=["png", "jpeg", "webp"],
        help="image format (default: from --output's suffix, else png)",
    )
    parser.add_argument("--output-compression", type=int, metavar="0-100", help="jpeg/webp quality")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="compute dtype")
    parser.add_argument(
        "--engine",
        choices=["mlx", "torch", "auto"],
        default="mlx",
        help="mlx, the diffusers/torch fallback, or auto (torch where MLX cannot load a model)",
    )
    add_low_memory_option(parser)


def add_low_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--low-memory",
        action="store_true",
        default=None,
        help="free the text encoders after each prompt is encoded (re-read from disk per job) and "
        "decode images above 512x512 in tiles; on by itself with 8 GB of memory or less",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-sd-server", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    add_serve_options(command("serve", help="run the HTTP server"))
    add_job_options(command("generate", help="generate images from the command line"))

    upscale = command("upscale", help="enlarge an image with an upscaler (ESRGAN, Real-ESRGAN...) or Lanczos")
    upscale.add_argument("input", metavar="IN", help="the image (.png, .jpg, .webp)")
    upscale.add_argument(
        "--upscaler",
        help="an upscaler in the model directory's upscalers/ (`mlx-sd-server convert FILE` puts it there), or "
        "lanczos / nearest (default: the only converted one)",
    )
    upscale.add_argument("--scale", type=float, help="how many times larger (default: the upscaler's own factor)")
    upscale.add_argument("--output", "-o", required=True, metavar="FILE", help="where to write it (.png/.jpg/.webp)")
    upscale.add_argument("--force", action="store_true", help="replace --output if it exists")
    upscale.add_argument("--output-format", choices=["png", "jpeg", "webp"], help="default: from --output's suffix")
    upscale.add_argument("--output-compression", type=int, metavar="0-100", help="jpeg/webp quality")
    add_model_dir(upscale)

    convert = command(
        "convert",
        help="convert Hugging Face weights into a model (by default into the model directory)",
        usage="%(prog)s [options] SRC [NAME | DST/]\n       %(prog)s [options] --diffusion-model FILE --vae FILE "
        "--clip-l FILE [--clip-g FILE] --t5xxl FILE [NAME | DST/]",
    )
    convert.add_argument(
        "paths",
        nargs="*",
        metavar="SRC NAME",
        help="SRC: a diffusers folder or a single-file .safetensors checkpoint (SD, SD3/SD3.5, or an "
        "all-in-one FLUX file). NAME: the model's name, written into the model directory "
        "(default: SRC's file or folder name); a path with a slash (./out, ~/models/x) is the "
        "output folder itself. With split files, NAME only",
    )
    add_split_file_options(convert)
    add_model_dir(convert)
    convert.add_argument("--output", metavar="DIR", help="write the model folder at DIR instead of the model directory")
    convert.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"], help="weight dtype")
    convert.add_argument("--quantize", type=int, choices=[4, 8], help="quantize linear layers to N bits")
    convert.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="override what the checkpoint says (single-file SD 2.x checkpoints do not say)",
    )
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .ckpt/.bin pickle files (they can run arbitrary code: trusted files only)",
    )
    convert.add_argument("--name", help="model name in the manifest (default: NAME, else the output folder's name)")
    add_no_t5(convert)
    add_architecture_options(convert)

    pull = command("pull", help="download a model from Hugging Face and convert it into the model directory")
    pull.add_argument("repo_id", metavar="HF_REPO_ID", help="e.g. stabilityai/sd-turbo")
    add_model_dir(pull)
    pull.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "float32", "bfloat16"],
        help="weight dtype (float16 downloads a repository's .fp16 files where it has them)",
    )
    pull.add_argument("--quantize", type=int, choices=[4, 8], help="quantize linear layers to N bits")
    pull.add_argument("--name", help="name to save it under (default: derived from the repo id)")
    add_no_t5(pull)

    add_model_dir(command("models", help="list the models this machine can serve"))

    rm = command(
        "rm",
        help="delete a model or a ControlNet from the model directory (a running server unloads the model first)",
    )
    rm.add_argument("name", metavar="NAME", help="a name `mlx-sd-server models` lists")
    add_model_dir(rm)
    add_server_address(rm)

    add_server_address(command("ps", help="list the models the running server holds in memory, and until when"))
    stop = command("stop", help="unload a model from the running server's memory")
    stop.add_argument("name", metavar="NAME", help="a model `mlx-sd-server ps` lists")
    add_server_address(stop)

    service = command("service", help="run the server as a login service (launchd / systemd --user)")
    service.add_argument("action", choices=["install", "uninstall", "status", "logs"])
    service.add_argument("-f", "--follow", action="store_true", help="logs: keep following")
    add_serve_options(service)
    return parser


def limit_threads(threads: int | None) -> None:
    """--threads N: run on N of this process's cores (Linux), which bounds OpenBLAS, MLX's CPU threads and
    our numpy kernels alike; it carries over the BLAS re-exec."""
    if threads is None:
        return
    if threads < 1:
        raise SystemExit("mlx-sd-server: --threads must be at least 1")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    else:
        print("mlx-sd-server: --threads has no effect on this platform", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_threads(getattr(args, "threads", None))
    if argv is None and args.command in ("serve", "generate", "upscale"):  # only a real command line is re-executed
        from mlx_sd_server.blas import ensure_fast_blas

        ensure_fast_blas()  # Linux: re-executes once with OpenBLAS preloaded (MLX's bundled BLAS is ~50x slower)
    module_name, function_name = HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
