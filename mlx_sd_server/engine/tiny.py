"""The built-in `tiny-random-sd` model: SD 1.x-shaped, a few MB, RANDOM WEIGHTS (it draws noise).

It exists so clients and integrations can be tested offline without downloading gigabytes; it is
labelled as such in its name, in /v1/models and in the README. Built deterministically on first use.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sd_server.engine.model_io import MANIFEST, component_kind, save_component, write_manifest
from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path

log = logging.getLogger(__name__)

SEED = 0
TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": 32,
}
UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    # attention only at the lower resolution keeps 512x512 requests quick on a CPU
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "block_out_channels": [8, 16, 16, 16],
    "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def ensure_tiny_model(folder: Path) -> Path:
    """Build the tiny model into `folder` unless it is already there; returns the folder."""
    if (folder / MANIFEST).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        mx.random.seed(SEED)
        components = {}
        for name, config in (("text_encoder", TEXT_ENCODER), ("unet", UNET), ("vae", VAE)):
            module = component_kind(name, config).build(config)
            # a list of pairs: mlx annotates tree_flatten's result as list | dict, with no overload for destination=None
            params = tree_flatten(module.parameters())
            components[name] = save_component(work, name, config, params, mx.float32)  # type: ignore[arg-type]
        CLIPTokenizer.from_bpe_file(default_vocab_path(), pad_token="<|endoftext|>").save(work / "tokenizer")
        components["text_encoder"]["tokenizer"] = "tokenizer"
        write_manifest(
            work,
            {
                "name": folder.name,
                "family": "sd1",
                "prediction_type": "epsilon",
                "scheduler": {
                    "num_train_timesteps": 1000,
                    "beta_start": 0.00085,
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                },
                "defaults": {
                    "steps": 20,
                    "cfg_scale": 7.0,
                    "sample_method": "euler_a",
                    "scheduler": "discrete",
                    "width": 512,
                    "height": 512,
                },
                "dtype": "float32",
                "quantization": None,
                "random_weights": True,
                "components": components,
            },
        )
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if (folder / MANIFEST).exists():  # another process built it first: theirs is the same model
            return folder
        raise
    log.warning("built %s: RANDOM WEIGHTS, for testing clients only (it draws noise)", folder)
    return folder
