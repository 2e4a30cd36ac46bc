"""Tiny random-weight FLUX.1 pipelines built offline with diffusers/transformers (torch).

Variants (the released repos' schedulers): "dev" — guidance embedding, dynamic (token-count) shift, one
double and three single blocks; "schnell" — no guidance embedding, fixed shift 1, two double blocks and one
single block. The CLIP is tiny_diffusers' (hidden 32 = pooled_projection_dim), the T5 tiny_t5's (d_model 32
= joint_attention_dim); the autoencoder has FLUX's 16 latent channels, scale/shift and no quant convs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import tiny_diffusers
import tiny_t5
from mlx_sd_server.engine.families.flux.single_file import (
    DEV_SCHEDULER as FLUX_DEV_SCHEDULER, SCHNELL_SCHEDULER as FLUX_SCHNELL_SCHEDULER,
)

AXES = (4, 6, 6)  # the rotary split of the tiny transformer's 16-dim heads
VARIANTS = {"dev": dict(guidance=True, num_layers=1, num_single_layers=3),
            "schnell": dict(guidance=False, num_layers=2, num_single_layers=1)}


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Every parameter random: zero-initialised layers and all-ones norms would hide swapped or mixed-up weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def transformer(guidance: bool, num_layers: int = 2, num_single_layers: int = 3, seed: int | None = None):
    """All weights N(0, 0.2^2): large enough that prompt and guidance change the image by ~16/255 and
    ~28/255 on average, so image parity checks the whole conditioning path."""
    from diffusers import FluxTransformer2DModel

    return randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance, axes_dims_rope=AXES,
    ), seed=seed if seed is not None else (1 if guidance else 2), scale=0.2)


def vae(seed: int = 3):
    """diffusers' own initialisation (images with contrast: pixel std ~0.15), zero-initialised layers randomised."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    tiny_diffusers._randomize_zero_init(model)
    return model


def make_pipeline(dst: Path, variant: str = "dev"):
    """Build a tiny FLUX pipeline, save it as a diffusers folder at `dst`, and return the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    options = VARIANTS[variant]
    clip_dir = tiny_diffusers.write_tokenizer(Path(tempfile.mkdtemp()), pad_token="<|endoftext|>")
    t5_dir = tiny_t5.write_t5_tokenizer(Path(tempfile.mkdtemp()))
    scheduler = FLUX_DEV_SCHEDULER if options["guidance"] else FLUX_SCHNELL_SCHEDULER
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=vae(),
        text_encoder=tiny_diffusers.text_encoder("sd1", seed=4),
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_dir)),
        text_encoder_2=tiny_t5.t5_encoder(seed=5),
        tokenizer_2=T5TokenizerFast(tokenizer_file=str(t5_dir / "tokenizer.json")),
        transformer=transformer(**options),
    )
    dst = Path(dst)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # as hub repos carry them (transformers 5 writes tokenizer.json)
        (dst / "tokenizer" / name).write_bytes((clip_dir / name).read_bytes())
    # Keep the T5 tokenizer exactly as built (the hub's FLUX repos ship their tokenizer.json as is).
    (dst / "tokenizer_2" / "tokenizer.json").write_bytes((t5_dir / "tokenizer.json").read_bytes())
    pipe.set_progress_bar_config(disable=True)
    return pipe
