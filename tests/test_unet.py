"""MLX UNet against diffusers' UNet2DConditionModel on tiny random-weight models (float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_diffusers
from mlx_sd_server.engine.families.sd.mapping import map_unet_weight
from mlx_sd_server.engine.families.sd.unet import UNetConfig, UNetModel
from mlx_sd_server.engine.ops import cpu_kernels
from parity import load_torch_weights, max_rel_err, nchw_to_nhwc

TOLERANCE = 1e-4

CASES = {
    "sd1": dict(family="sd1"),
    "sd2v": dict(family="sd2v"),
    "sdxl": dict(family="sdxl"),
    "sd1-lcm": dict(family="sd1", lcm=True),
    "sdxl-lcm": dict(family="sdxl", lcm=True),
    "sd1-inpaint": dict(family="sd1", inpaint=True),
    "sdxl-inpaint": dict(family="sdxl", inpaint=True),
}


def mlx_unet(reference) -> UNetModel:
    model = UNetModel(UNetConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_unet_weight)
    return model


def random_inputs(reference, height: int = 16, width: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch 2 with different, fractional timesteps, plus the conditioning the config asks for."""
    g = torch.Generator().manual_seed(seed)
    config = reference.config
    batch = 2
    inputs = {
        "sample": torch.randn(batch, config.in_channels, height, width, generator=g),
        "timestep": torch.tensor([999.0, 317.25]),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=g),
    }
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch, pooled_dim, generator=g)
        inputs["time_ids"] = torch.tensor([[128.0, 128, 0, 0, 128, 128], [96, 160, 8, 16, 128, 96]])
    if config.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = torch.randn(batch, config.time_cond_proj_dim, generator=g)
    return inputs


def run_reference(reference, inputs: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    with torch.no_grad():
        return reference(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
            timestep_cond=inputs.get("timestep_cond"), added_cond_kwargs=added or None, **extra,
        ).sample


def run_mlx(model: UNetModel, inputs: dict[str, torch.Tensor], **extra) -> mx.array:
    optional = {k: mx.array(inputs[k].numpy()) for k in ("text_embeds", "time_ids", "timestep_cond") if k in inputs}
    out = model(
        mx.array(nchw_to_nhwc(inputs["sample"]).astype(np.float32)),
        mx.array(inputs["timestep"].numpy()),
        mx.array(inputs["encoder_hidden_states"].numpy()),
        **optional,
        **extra,
    )
    mx.eval(out)
    return out


@pytest.mark.parametrize("case", CASES)
def test_unet_matches_diffusers(case):
    reference = tiny_diffusers.unet(**CASES[case])
    inputs = random_inputs(reference)
    err = max_rel_err(run_mlx(mlx_unet(reference), inputs), nchw_to_nhwc(run_reference(reference, inputs)))
    print(f"unet {case}: max_rel_err {err:.2e}")
    assert err <= TOLERANCE


def test_unet_matches_diffusers_through_winograd_convolutions():
    """At a 64x64 latent the resnets' 3x3 convolutions (and their GroupNorm + SiLU) take the CPU's Winograd
    path (engine/ops/winograd.py) at the first two levels; below 32x32 the tests above use MLX's convolution."""
    reference = tiny_diffusers.unet(**CASES["sd1"])
    model = mlx_unet(reference)
    assert model.down_blocks[0].resnets[0].conv1.takes_winograd(64, 64) == cpu_kernels.on_cpu()
    inputs = random_inputs(reference, 64, 64)
    err = max_rel_err(run_mlx(model, inputs), nchw_to_nhwc(run_reference(reference, inputs)))
    print(f"unet sd1 at 64x64: max_rel_err {err:.2e}")
    assert err <= TOLERANCE


def test_unet_odd_latent_size_upsamples_to_skip_size():
    """12x10 latents halve to 6x5 then 3x3: the up path must resize to the skips' sizes, as diffusers does."""
    reference = tiny_diffusers.unet("sd1")
    inputs = random_inputs(reference, height=12, width=10)
    err = max_rel_err(run_mlx(mlx_unet(reference), inputs), nchw_to_nhwc(run_reference(reference, inputs)))
    print(f"unet sd1 12x10: max_rel_err {err:.2e}")
    assert err <= TOLERANCE


def test_unet_scalar_timestep_broadcasts_over_batch():
    reference = tiny_diffusers.unet("sd1")
    model = mlx_unet(reference)
    inputs = random_inputs(reference)
    inputs["timestep"] = torch.tensor([417.5, 417.5])
    batched = run_mlx(model, inputs)
    scalar = model(mx.array(nchw_to_nhwc(inputs["sample"]).astype(np.float32)), 417.5,
                   mx.array(inputs["encoder_hidden_states"].numpy()))
    assert max_rel_err(scalar, batched) == 0.0


def test_unet_adds_controlnet_residuals_like_diffusers():
    reference = tiny_diffusers.unet("sd1")
    model = mlx_unet(reference)
    inputs = random_inputs(reference)
    # The residuals have the shapes of the skip connections and the mid output; values are random.
    x = mx.array(nchw_to_nhwc(inputs["sample"]).astype(np.float32))
    emb = mx.zeros((2, 4 * reference.config.block_out_channels[0]))
    mid, skips = model.encode(model.conv_in(x), emb, mx.array(inputs["encoder_hidden_states"].numpy()))
    g = torch.Generator().manual_seed(1)
    down = [torch.randn(s.shape[0], s.shape[3], s.shape[1], s.shape[2], generator=g) for s in skips]
    mid = torch.randn(mid.shape[0], mid.shape[3], mid.shape[1], mid.shape[2], generator=g)
    ours = run_mlx(
        model, inputs,
        down_block_additional_residuals=[mx.array(nchw_to_nhwc(r).astype(np.float32)) for r in down],
        mid_block_additional_residual=mx.array(nchw_to_nhwc(mid).astype(np.float32)),
    )
    ref = run_reference(reference, inputs, down_block_additional_residuals=tuple(down),
                        mid_block_additional_residual=mid)
    err = max_rel_err(ours, nchw_to_nhwc(ref))
    print(f"unet sd1 + residuals: max_rel_err {err:.2e}")
    assert err <= TOLERANCE


@pytest.mark.parametrize(
    "config, heads",
    [
        # SD 1.5: 8 heads everywhere (attention_head_dim=8 means heads).
        ({"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280]}, (8, 8, 8, 8)),
        # SD 2.1: attention_head_dim lists per-block head counts.
        ({"attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280]}, (5, 10, 20, 20)),
        # num_attention_heads wins when given.
        ({"attention_head_dim": 64, "num_attention_heads": [2, 4], "block_out_channels": [32, 64]}, (2, 4)),
    ],
)
def test_config_reads_head_counts_like_diffusers(config, heads):
    assert UNetConfig.from_dict(config).num_attention_heads == heads


def test_config_sdxl_transformer_depths():
    config = UNetConfig.from_dict({
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "addition_embed_type": "text_time", "unknown_key": 1,
    })
    assert config.down_transformer_layers == ((1, 1), (2, 2), (10, 10))
    assert config.up_transformer_layers == ((10, 10, 10), (2, 2, 2), (1, 1, 1))


SD_BLOCKS = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32,
    sample_size=64,
)
REAL_SIZE = {  # the published configs' architecture keys, on top of tiny_diffusers' family defaults
    "sd15": ("sd1", dict(SD_BLOCKS, cross_attention_dim=768, attention_head_dim=8)),
    "sd21": ("sd2v", dict(SD_BLOCKS, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20))),
    "sdxl": ("sdxl", dict(
        block_out_channels=(320, 640, 1280), norm_num_groups=32, sample_size=128, cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )),
}


@pytest.mark.realsize
@pytest.mark.parametrize("name", REAL_SIZE)
def test_real_size_unet_matches_diffusers(name):
    family, overrides = REAL_SIZE[name]
    reference = tiny_diffusers.unet(family, **overrides)
    inputs = random_inputs(reference, height=16, width=16)
    err = max_rel_err(run_mlx(mlx_unet(reference), inputs), nchw_to_nhwc(run_reference(reference, inputs)))
    print(f"unet {name} (real size, 16x16 latents): max_rel_err {err:.2e}")
    assert err <= TOLERANCE
