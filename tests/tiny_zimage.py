"""A tiny random-weight Z-Image pipeline (diffusers' ZImagePipeline) built offline and saved as a diffusers folder.

The text encoder is tiny_qwen3's Qwen3Model (hidden 64 = the transformer's cap_feat_dim) with its Qwen-style
tokenizer and Qwen3's chat template; the transformer a two-layer ZImageTransformer2DModel (dim 64, two heads,
2x2 patches); the autoencoder tiny_flux's (FLUX.1's 16 channels, scale and shift); the scheduler Z-Image-Turbo's
(FlowMatchEulerDiscreteScheduler, fixed shift 3).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import tiny_flux
import tiny_qwen3

# Z-Image-Turbo's scheduler_config.json
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def transformer(seed: int = 1, scale: float = 0.2):
    """Every weight random (the pad tokens and zero-initialised layers included), the RMSNorm scales around 1:
    large enough that the prompt and the guidance visibly change the image."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=tiny_qwen3.qwen3_config().hidden_size,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64],
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(1.0 + noise if "norm" in name and param.ndim == 1 else noise)
    return model.eval()


def make_pipeline(dst: Path):
    """Build a tiny Z-Image pipeline, save it as a diffusers folder at `dst`, and return the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen2TokenizerFast

    tokenizer_dir = tiny_qwen3.write_qwen3_tokenizer(Path(tempfile.mkdtemp()))
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=tiny_flux.vae(),
        text_encoder=tiny_qwen3.qwen3_model(seed=4),
        tokenizer=Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir)),
        transformer=transformer(),
    )
    dst = Path(dst)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    # Keep the tokenizer exactly as built (the hub's Z-Image repos ship their tokenizer.json as is).
    (dst / "tokenizer" / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    pipe.set_progress_bar_config(disable=True)
    return pipe
