"""`mlx-sd-server pull REPO_ID`: download a diffusers model from Hugging Face, then convert it."""

from __future__ import annotations

import argparse
import logging
import sys

from convert.model import convert_model
from mlx_sd_server.paths import model_dir

# Only what conversion reads: configs, tokenizers and safetensors weights (never pickles, never fp16 copies
# of what we already take in full precision, never the single files that many repos also carry: the .ckpt
# of SD repos, FLUX repos' flux1-*.safetensors and ae.safetensors beside their diffusers folders).
ALLOW_PATTERNS = [
    "model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*", "*/*.safetensors.index.json",
    "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    "config.json", "diffusion_pytorch_model.safetensors",
    # FLUX: the transformer (~24 GB) and T5 (~9.5 GB) are sharded
    "transformer/diffusion_pytorch_model*.safetensors", "text_encoder_2/model-*-of-*.safetensors",
]


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
        src = snapshot_download(args.repo_id, allow_patterns=ALLOW_PATTERNS)
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
    convert_model(src, dst, dtype=args.dtype, quantize=args.quantize, name=name, progress=sys.stderr.isatty())
    print(f"pulled {args.repo_id} as {name} ({dst})")
    return 0
