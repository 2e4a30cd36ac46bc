"""`mlx-sd-server pull REPO_ID`: download a diffusers model from Hugging Face, then convert it."""

from __future__ import annotations

import argparse
import logging
import sys

from convert.model import convert_model
from mlx_sd_server.paths import model_dir

# Only what conversion reads: configs, tokenizers and safetensors weights (never pickles, never fp16 copies
# of what we already take in full precision, never the single files that many repos also carry: the .ckpt
# of SD repos, FLUX repos' flux1-*.safetensors and ae.safetensors, SD3.5 repos' sd3.5_*.safetensors and
# text_encoders/ folder, beside their diffusers folders).
ALLOW_PATTERNS = [
    "model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*", "*/*.safetensors.index.json",
    "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "text_encoder_3/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors", "config.json", "diffusion_pytorch_model.safetensors",
    # FLUX's and SD3.5-large's transformer (~24 GB, ~16 GB) and T5 (~9.5 GB: FLUX's text_encoder_2, SD3's
    # text_encoder_3) are sharded
    "transformer/diffusion_pytorch_model-*-of-*.safetensors", "text_encoder_2/model-*-of-*.safetensors",
    "text_encoder_3/model-*-of-*.safetensors",
]

T5_FOLDERS = ("text_encoder_3/*", "tokenizer_3/*")  # SD3's

# Single-file weights that diffusers repositories often also carry as `*.fp16.safetensors` (half the size).
# (Sharded weights keep full precision: their fp16 index files are named in a way the reader does not take.)
SINGLE_WEIGHTS = [p for p in ALLOW_PATTERNS if p.endswith(".safetensors") and "*" not in p]


def allow_patterns(repo_files: list[str], dtype: str) -> list[str]:
    """What to download of a repository holding `repo_files`: ALLOW_PATTERNS, except that for float16 each
    single-file weight with an fp16 variant beside it (`unet/diffusion_pytorch_model.fp16.safetensors`) is
    taken instead of the full-precision file, which conversion would only halve."""
    if dtype != "float16":
        return list(ALLOW_PATTERNS)
    present = set(repo_files)
    patterns = []
    for pattern in ALLOW_PATTERNS:
        variant = pattern.removesuffix(".safetensors") + ".fp16.safetensors"
        patterns.append(variant if pattern in SINGLE_WEIGHTS and variant in present else pattern)
    return patterns


def repo_files(repo_id: str) -> list[str] | None:
    """The repository's file names, or None when the hub cannot say (offline): then full precision is asked."""
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(repo_id)
    except Exception:  # offline, gated, unknown: snapshot_download reports it (or serves the cache)
        return None


def name_for(repo_id: str) -> str:
    return repo_id.rstrip("/").split("/")[-1].lower()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    name = args.name or name_for(args.repo_id)
    dst = model_dir(args.model_dir) / name
    if dst.exists():
        print(f"{name} is already in {dst.parent}")
        return 0
    try:
        files = repo_files(args.repo_id)
        patterns = allow_patterns(files, args.dtype) if files is not None else ALLOW_PATTERNS
        # --no-t5: SD3's T5 (text_encoder_3, ~9.5 GB) is neither downloaded nor converted
        ignore = list(T5_FOLDERS) if args.no_t5 else None
        src = snapshot_download(args.repo_id, allow_patterns=patterns, ignore_patterns=ignore)
    except LocalEntryNotFoundError:
        print(
            f"mlx-sd-server pull: cannot download {args.repo_id}: offline (HF_HUB_OFFLINE is set or the hub is "
            "unreachable) and it is not in the Hugging Face cache. Connect and retry, or download the model "
            "elsewhere and run `mlx-sd-server convert FOLDER_OR_FILE DST`.", file=sys.stderr,
        )
        return 1
    except Exception as exc:  # the hub's errors (404, gated repo, network) all end the command the same way
        print(f"mlx-sd-server pull: cannot download {args.repo_id}: {exc}", file=sys.stderr)
        return 1
    convert_model(src, dst, dtype=args.dtype, quantize=args.quantize, name=name, progress=sys.stderr.isatty(),
                  origin=f"huggingface:{args.repo_id}", with_t5=not args.no_t5)
    print(f"pulled {args.repo_id} as {name} ({dst})")
    return 0
