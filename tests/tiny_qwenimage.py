"""Tiny random-weight Qwen-Image references (diffusers' Qwen-Image pipelines' parts) built offline.

One place for what "a tiny Qwen-Image" is, so the component tests and (next) the pipeline tests agree:
- the transformer: a QwenImageTransformer2DModel of two dual-stream blocks, two heads of 32 channels (RoPE axes
  8 + 12 + 12), 64-channel packed tokens (the 16-channel latent's 2x2 patches), text states of TEXT_DIM channels;
- the autoencoder: AutoencoderKLQwenImage at the released structure, base_dim 8 (`vae`);
- a whole QwenImagePipeline with tiny_qwen25vl's text encoder, saved as a diffusers folder (`make_pipeline`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import tiny_qwen25vl

LATENT_CHANNELS = 16  # the autoencoder's z_dim: the transformer's out_channels
PATCH = 2
TEXT_DIM = 64  # the text encoder's hidden size: the transformer's joint_attention_dim


def transformer_config(num_layers: int = 2, zero_cond_t: bool = False, **changes) -> dict:
    """diffusers' QwenImageTransformer2DModel arguments of the tiny transformer; widths multiples of 64, so that
    nn.quantize's default groups fit every Linear."""
    config = dict(
        patch_size=PATCH, in_channels=LATENT_CHANNELS * PATCH * PATCH, out_channels=LATENT_CHANNELS,
        num_layers=num_layers, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12), zero_cond_t=zero_cond_t,
    )  # fmt: skip
    return {**config, **changes}


def transformer(seed: int = 0, scale: float = 0.2, **config):
    """Every weight random (diffusers zero-initialises none here, but the norms start at 1): linear weights and
    biases N(0, scale^2), the RMSNorm scales 1 + N(0, scale^2), so that every part of the model matters."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**transformer_config(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            is_norm_scale = param.ndim == 1 and "norm" in name.split(".")[-2]  # not norm_out's linear
            param.copy_(1.0 + noise if is_norm_scale else noise)
    return model.eval()


def vae(seed: int = 3, base_dim: int = 8):
    """The released structure (dim_mult 1, 2, 4, 4; two residual blocks a level; temporal downsampling on the last
    two levels; 16 latent channels with the released latents_mean/std) at base_dim 8 (the release: 96). Every
    weight random: the RMS norms' gammas around 1, the biases nonzero, the time convs (unused on one frame) too, so
    that using them would show."""
    from diffusers import AutoencoderKLQwenImage as Reference

    torch.manual_seed(seed)
    model = Reference(
        base_dim=base_dim,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
    ).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


# The released Qwen/Qwen-Image scheduler_config.json's settings
SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
)  # fmt: skip


def make_pipeline(dst: Path):
    """Build a tiny QwenImagePipeline, save it as a diffusers folder at `dst`, and return the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2TokenizerFast

    tokenizer_dir = tiny_qwen25vl.write_qwen25vl_tokenizer(Path(tempfile.mkdtemp()))
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae(),
        text_encoder=tiny_qwen25vl.qwen25vl_model(seed=4),
        tokenizer=Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir)),
        transformer=transformer(seed=5),
    )
    dst = Path(dst)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    (dst / "tokenizer" / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_only_processor(cls, image_processor, tokenizer):
    """transformers' Qwen2VLProcessor without a video processor: its constructor resolves the video processor's
    class, which needs torchvision (not installed here); the edit pipelines pass images only."""
    from unittest import mock

    from transformers.processing_utils import ProcessorMixin

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return cls(image_processor=image_processor, tokenizer=tokenizer)


def make_edit_pipeline(dst: Path, plus: bool = True):
    """A tiny QwenImageEditPlusPipeline (plus) or QwenImageEditPipeline with the released processor settings (the
    PIL image processor, which ours matches bit for bit), saved as a diffusers folder at `dst`."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer_dir = tiny_qwen25vl.write_qwen25vl_tokenizer(Path(tempfile.mkdtemp()))
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    cls = diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae(),
        text_encoder=tiny_qwen25vl.qwen25vl_model(seed=6),
        tokenizer=tokenizer,
        processor=None,  # set after saving: transformers cannot save it without its video processor
        transformer=transformer(seed=7, zero_cond_t=plus),
    )
    dst = Path(dst)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    (dst / "tokenizer" / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    pipe.processor = image_only_processor(Qwen2VLProcessor, image_processor, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
