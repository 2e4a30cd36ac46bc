"""Tiny random-weight SD3 / SD3.5 pipelines built offline with diffusers/transformers (torch).

Transformer variants, after the released configs: "sd3" (SD3-medium: no query/key norm, no dual attention),
"sd35-medium" (RMS query/key norms, MMDiT-X dual attention in blocks 0 and 1), "sd35-large" (RMS norms
only). Each has three blocks (odd depth; the last is context_pre_only), 2x2 patches and a 12x12 position
table (the pipeline tests' 8x10 latents use its centre 4x5 patches). The CLIPs are tiny_diffusers' (CLIP-L
style padding with <|endoftext|>, CLIP-G style with "!", both with projections: 32 + 32 = the 64 pooled
features); the T5 is tiny_t5's, 80 wide (joint_attention_dim), so the 64 CLIP features are zero-padded as the
real 2048 are to 4096; the VAE is tiny_flux's 16-channel one with SD3's scale and shift.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import tiny_diffusers
import tiny_flux
import tiny_t5

VARIANTS = {
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd35-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd35-large": dict(qk_norm="rms_norm", dual_attention_layers=()),
}
T5_WIDTH = 80
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # every SD3/SD3.5 release's


def transformer(variant: str = "sd3", seed: int = 1, num_layers: int = 3, pos_embed_max_size: int = 12):
    """All weights N(0, 0.2^2), as tiny_flux's (the position table is diffusers' own: a buffer): a prompt and
    CFG 5 move the image by ~20/255 and ~39/255 on average, so image parity checks the conditioning."""
    from diffusers import SD3Transformer2DModel

    return tiny_flux.randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=2 * tiny_diffusers.TEXT_DIM, out_channels=16, pos_embed_max_size=pos_embed_max_size,
        **VARIANTS[variant],
    ), seed=seed, scale=0.2)


def vae(seed: int = 3):
    model = tiny_flux.vae(seed)
    model.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    return model


def make_pipeline(dst: Path, variant: str = "sd3", t5: bool = True):
    """Build a tiny SD3 pipeline (without T5: text_encoder_3=None), save it as a diffusers folder at `dst`, and
    return the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_l_dir = tiny_diffusers.write_tokenizer(Path(tempfile.mkdtemp()), pad_token="<|endoftext|>")
    clip_g_dir = tiny_diffusers.write_tokenizer(Path(tempfile.mkdtemp()), pad_token="!")
    t5_dir = tiny_t5.write_t5_tokenizer(Path(tempfile.mkdtemp()))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer(variant),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae(),
        text_encoder=tiny_diffusers.text_encoder("sd1", with_projection=True, seed=4),
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_l_dir)),
        text_encoder_2=tiny_diffusers.text_encoder("sdxl2", with_projection=True, seed=5),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(clip_g_dir)),
        text_encoder_3=tiny_t5.t5_encoder(seed=6, d_model=T5_WIDTH) if t5 else None,
        tokenizer_3=T5TokenizerFast(tokenizer_file=str(t5_dir / "tokenizer.json")) if t5 else None,
    )
    dst = Path(dst)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    for folder, source in (("tokenizer", clip_l_dir), ("tokenizer_2", clip_g_dir)):
        for name in ("vocab.json", "merges.txt"):  # as hub repos carry them (transformers 5 writes tokenizer.json)
            (dst / folder / name).write_bytes((source / name).read_bytes())
    if t5:  # the T5 tokenizer exactly as built (hub repos ship their tokenizer.json as is)
        (dst / "tokenizer_3" / "tokenizer.json").write_bytes((t5_dir / "tokenizer.json").read_bytes())
    pipe.set_progress_bar_config(disable=True)
    return pipe
