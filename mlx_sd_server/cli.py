"""The `mlx-sd-server` command: argument parsing only; each subcommand lives in its own module.

Option names mirror the API's field names (`sample_method` -> `--sample-method`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mlx_sd_server import store

# subcommand -> "module:function" taking the parsed arguments; imported lazily so `--help` is instant.
HANDLERS = {
    "serve": "mlx_sd_server.api.server:main",
    "generate": "mlx_sd_server.generate:main",
    "convert": "convert.cli:main",
    "pull": "convert.pull:main",
    "models": "mlx_sd_server.registry:print_models",
    "service": "mlx_sd_server.service:main",
}


def add_model_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir", help="where converted models live (default: $MLX_SD_MODEL_DIR or the user data dir)"
    )


def add_split_file_options(parser: argparse.ArgumentParser) -> None:
    """A model given as separate component files, as stable-diffusion.cpp takes them (FLUX.1)."""
    split = parser.add_argument_group("split files (FLUX.1, as stable-diffusion.cpp takes them)")
    split.add_argument("--diffusion-model", metavar="FILE", help="the transformer, e.g. flux1-dev.safetensors or .gguf")
    split.add_argument("--vae", metavar="FILE", help="the autoencoder, e.g. ae.safetensors")
    split.add_argument("--clip-l", metavar="FILE", help="CLIP-L, e.g. clip_l.safetensors")
    split.add_argument("--t5xxl", metavar="FILE", help="T5-XXL, e.g. t5xxl_fp16.safetensors or t5xxl-Q8_0.gguf")
    split.add_argument("--clip-g", metavar="FILE", help="CLIP-G (SD3; not supported yet: refused)")
    split.add_argument("--t5-tokenizer", metavar="PATH",
                       help="T5's tokenizer.json (or its folder); default: downloaded from FLUX.1-schnell's repo")


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Options of `serve`, shared with `service install` (which writes them into the service file). The
    reference's (sd-api-server's) flags are accepted as it documents them."""
    add_model_dir(parser)
    parser.add_argument("--model", action="append", default=[], metavar="NAME_OR_PATH",
                        help="a model to serve: a name, a converted folder, a diffusers folder, a .safetensors or "
                             ".gguf file, a Hugging Face id (repeatable; the first is the default)")
    parser.add_argument("--model-name", metavar="NAME", help="the API name of the default model (the reference's)")
    parser.add_argument("--strict-model-names", action="store_true",
                        help="a request's model must name a served model (default: unknown names and OpenAI's "
                             "dall-e-*/gpt-image-* are served by the default model while only one is served)")
    add_split_file_options(parser)
    parser.add_argument("--control-net", metavar="NAME_OR_PATH", help="a ControlNet attached to the default model")
    parser.add_argument("--lora-model-dir", metavar="DIR",
                        help="LoRA folder (accepted; LoRAs are not applied yet: prompts with <lora:...> tags get 400)")
    parser.add_argument("--task", "--context-type", choices=["full", "text2image", "image2image"], default="full",
                        help="which endpoints are on: both, /v1/images/generations only, or /v1/images/edits only")
    # None, not "127.0.0.1": `service install` writes only options that differ from their defaults, so an
    # explicit --host 127.0.0.1 stays in the service file.
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every "
                             "interface: then set --api-key)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--socket-addr", metavar="HOST:PORT", help="host and port in one (the reference's)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads (Linux: the cores this process uses)")
    for flag, what in (("--clip-on-cpu", "text encoders"), ("--vae-on-cpu", "VAE"), ("--control-net-cpu", "ControlNet")):
        parser.add_argument(flag, action="store_true", help=f"the reference's: keep the {what} on the CPU "
                            "(no effect with MLX: CPU and GPU share unified memory)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $API_KEY)")
    parser.add_argument("--download-url-prefix", metavar="URL",
                        help="public prefix of image urls, e.g. behind a proxy (default: the address the server "
                             "listens on)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API from a browser "
                             "(repeatable; '*' for any page). Default: none, browsers' cross-origin calls are refused")
    parser.add_argument("--store-dir", help="where generated images are kept")
    parser.add_argument("--store-max-age", type=_checked(store.max_age), metavar="AGE",
                        help="remove stored images older than AGE: 90s, 30m, 12h, 7d (a bare number is hours; "
                             "default: keep until deleted)")
    parser.add_argument("--store-max-gb", type=_checked(store.max_gb), metavar="GB",
                        help="keep the stored images under GB in all, removing the oldest first (default: no limit)")
    parser.add_argument("--max-queue", type=int, default=8, help="jobs waiting beyond this get 429")
    parser.add_argument("--max-n", type=int, default=10, help="largest n per request")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048, help="largest width*height")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="compute dtype (default: float16 on GPU, float32 on CPU)")
    parser.add_argument("--engine", choices=["mlx", "torch", "auto"], default="mlx",
                        help="mlx, the diffusers/torch fallback, or auto (torch where MLX cannot load a model)")
    add_low_memory_option(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


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


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """Options of `generate`: one per job field."""
    add_model_dir(parser)
    parser.add_argument("--model", required=True, metavar="NAME_OR_PATH")
    parser.add_argument("--control-net", metavar="NAME_OR_PATH")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("-n", "--n", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg-scale", type=float)
    parser.add_argument("--guidance", type=float, help="distilled guidance (FLUX.1-dev; default: the model's)")
    parser.add_argument("--sample-method")
    parser.add_argument("--scheduler")
    parser.add_argument("--size", metavar="WxH")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--image", metavar="PATH", help="image to edit (img2img)")
    parser.add_argument("--strength", type=float)
    parser.add_argument("--mask", metavar="PATH", help="inpainting mask (white or transparent = repaint)")
    parser.add_argument("--control-image", metavar="PATH")
    parser.add_argument("--control-strength", type=float)
    parser.add_argument("--control-preprocess", choices=["none", "canny"])
    parser.add_argument("--output", "-o", default=".", metavar="PATH_OR_DIR",
                        help="a file name (.png/.jpg/.webp) or a directory")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--engine", choices=["mlx", "torch", "auto"], default="mlx")
    add_low_memory_option(parser)


def add_low_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--low-memory", action="store_true", default=None,
                        help="free the text encoders after each prompt is encoded (re-read from disk per job) and "
                             "decode images above 512x512 in tiles; on by itself with 8 GB of memory or less")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-sd-server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_serve_options(sub.add_parser("serve", help="run the HTTP server"))
    add_job_options(sub.add_parser("generate", help="generate images from the command line"))

    convert = sub.add_parser(
        "convert", help="convert Hugging Face weights to this server's MLX format",
        usage="%(prog)s [options] SRC DST\n       %(prog)s [options] --diffusion-model FILE --vae FILE --clip-l FILE "
              "--t5xxl FILE DST")
    convert.add_argument("paths", nargs="+", metavar="SRC DST",
                         help="SRC: a diffusers folder or a single-file .safetensors checkpoint (SD, or an all-in-one "
                              "FLUX file); DST: the output folder. With split files, DST only")
    add_split_file_options(convert)
    convert.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    convert.add_argument("--quantize", type=int, choices=[4, 8], help="quantize linear layers to N bits")
    convert.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                         help="override what the checkpoint says (single-file SD 2.x checkpoints do not say)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="accept .ckpt/.bin pickle files (they can run arbitrary code: trusted files only)")
    convert.add_argument("--name", help="model name in the manifest (default: the folder name)")

    pull = sub.add_parser("pull", help="download a model from Hugging Face and convert it")
    pull.add_argument("repo_id", metavar="HF_REPO_ID_OR_NAME")
    add_model_dir(pull)
    pull.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    pull.add_argument("--quantize", type=int, choices=[4, 8])
    pull.add_argument("--name", help="name to save it under (default: derived from the repo id)")

    add_model_dir(sub.add_parser("models", help="list the models this machine can serve"))

    service = sub.add_parser("service", help="run the server as a login service (launchd / systemd --user)")
    service.add_argument("action", choices=["install", "uninstall", "status"])
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
    if argv is None and args.command in ("serve", "generate"):  # only a real command line is re-executed
        from mlx_sd_server.blas import ensure_fast_blas

        ensure_fast_blas()  # Linux: re-executes once with OpenBLAS preloaded (MLX's bundled BLAS is ~50x slower)
    module_name, function_name = HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
