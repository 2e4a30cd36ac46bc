"""`mlx-sd-server pull REPO_ID`: download a diffusers model from Hugging Face, then convert it."""

from __future__ import annotations

import argparse
import logging
import sys

from convert.cli import controlnet_folder, file_controlnet
from convert.diffusers_folder import tokenizer_folder
from convert.model import convert_model
from mlx_sd_server.engine.families import FAMILIES
from mlx_sd_server.paths import model_dir


def _weight_patterns() -> list[str]:
    """Every family's components' weights: transformers' `model.safetensors` for the text encoders (which carry
    tokenizers), diffusers' `diffusion_pytorch_model.safetensors` for the rest; large ones are sharded."""
    patterns = []
    for spec in FAMILIES:
        for component in spec.components:
            stem = "model" if component.name in spec.text_encoders() else "diffusion_pytorch_model"
            patterns += [f"{component.name}/{stem}.safetensors", f"{component.name}/{stem}-*-of-*.safetensors"]
    return list(dict.fromkeys(patterns))


# Only what conversion reads: configs, tokenizers and safetensors weights (never pickles, never fp16 copies
# of what we already take in full precision, never the single files that many repos also carry: the .ckpt
# of SD repos, FLUX repos' flux1-*.safetensors and ae.safetensors, SD3.5 repos' sd3.5_*.safetensors and
# text_encoders/ folder, beside their diffusers folders). A repo of one component (a ControlNet) has its
# config and weights at the top.
ALLOW_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer*/*",
    "*/*.safetensors.index.json",
    "config.json",
    "diffusion_pytorch_model.safetensors",
    *_weight_patterns(),
]

# The text encoders a model may go without (SD3's T5, ~9.5 GB), and their tokenizers: what --no-t5 leaves out.
OPTIONAL_FOLDERS = [
    f"{folder}/*"
    for spec in FAMILIES
    for name in spec.optional_text_encoders
    for folder in (name, tokenizer_folder(name))
]

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
    for there in (dst, controlnet_folder(dst.parent, name)):  # a model, or a ControlNet (see file_controlnet)
        if there.exists():
            print(f"{name} is already in {there.parent}")
            return 0
    try:
        files = repo_files(args.repo_id)
        patterns = allow_patterns(files, args.dtype) if files is not None else ALLOW_PATTERNS
        # --no-t5: the optional text encoders (SD3's T5, ~9.5 GB) are neither downloaded nor converted
        ignore = OPTIONAL_FOLDERS if args.no_t5 else None
        src = snapshot_download(args.repo_id, allow_patterns=patterns, ignore_patterns=ignore)
    except LocalEntryNotFoundError:
        print(
            f"mlx-sd-server pull: cannot download {args.repo_id}: offline (HF_HUB_OFFLINE is set or the hub is "
            "unreachable) and it is not in the Hugging Face cache. Connect and retry, or download the model "
            "elsewhere and run `mlx-sd-server convert FOLDER_OR_FILE DST`.",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # the hub's errors (404, gated repo, network) all end the command the same way
        print(f"mlx-sd-server pull: cannot download {args.repo_id}: {exc}", file=sys.stderr)
        return 1
    convert_model(
        src,
        dst,
        dtype=args.dtype,
        quantize=args.quantize,
        name=name,
        progress=sys.stderr.isatty(),
        origin=f"huggingface:{args.repo_id}",
        with_t5=not args.no_t5,
    )
    controlnet = file_controlnet(dst)
    if controlnet is not None:
        folder = controlnet_folder(dst.parent, name)
        print(
            f"pulled {args.repo_id} as {name} ({folder}), a ControlNet: requests name it with control_net={controlnet}"
        )
    else:
        print(f"pulled {args.repo_id} as {name} ({dst})")
    return 0
