"""`mlx-sd-server convert SRC DST`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from convert.model import SplitFiles, convert_model

SPLIT_OPTIONS = ("diffusion_model", "vae", "clip_l", "t5xxl", "t5_tokenizer")


def split_files(args: argparse.Namespace) -> SplitFiles | None:
    """The split-file options (`--diffusion-model`, `--vae`, ...) as one source, or None when none is given."""
    if getattr(args, "clip_g", None):
        raise ValueError("--clip-g: SD3 models are not supported yet")
    split = {name: Path(getattr(args, name)).expanduser() for name in SPLIT_OPTIONS if getattr(args, name, None)}
    if split and "diffusion_model" not in split:
        raise ValueError("split files need --diffusion-model (the transformer file)")
    return SplitFiles(**split) if split else None


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        split = split_files(args)
    except ValueError as exc:
        print(f"mlx-sd-server convert: {exc}", file=sys.stderr)
        return 2
    if len(args.paths) != (1 if split else 2):
        usage = "--diffusion-model FILE [--vae FILE --clip-l FILE --t5xxl FILE] DST" if split else "SRC DST"
        print(f"mlx-sd-server convert: expected {usage}", file=sys.stderr)
        return 2
    src = split or args.paths[0]
    dst = args.paths[-1]
    try:
        out = convert_model(
            src, dst, dtype=args.dtype, quantize=args.quantize, prediction_type=args.prediction_type,
            allow_pickle=args.allow_pickle, name=args.name, progress=sys.stderr.isatty(),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"mlx-sd-server convert: {exc}", file=sys.stderr)
        return 1
    print(f"converted {args.diffusion_model or args.paths[0]} -> {Path(out)}")
    return 0
