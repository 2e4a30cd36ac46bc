"""Tiny random-weight Qwen-Image references (diffusers' Qwen-Image pipelines' parts) built offline.

One place for what "a tiny Qwen-Image" is, so the component tests and (next) the pipeline tests agree:
- the transformer: a QwenImageTransformer2DModel of two dual-stream blocks, two heads of 32 channels (RoPE axes
  8 + 12 + 12), 64-channel packed tokens (the 16-channel latent's 2x2 patches), text states of TEXT_DIM channels;
- (next) the autoencoder and the Qwen2.5-VL text encoder, their builders beside it.
"""

from __future__ import annotations

import torch

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
