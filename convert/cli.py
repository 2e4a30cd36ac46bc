"""`mlx-sd-server convert SRC DST`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from convert.model import convert_model


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = convert_model(
            args.src, args.dst, dtype=args.dtype, quantize=args.quantize, prediction_type=args.prediction_type,
            allow_pickle=args.allow_pickle, name=args.name, progress=sys.stderr.isatty(),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"mlx-sd-server convert: {exc}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {Path(out)}")
    return 0
