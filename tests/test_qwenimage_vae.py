"""The MLX Qwen-Image autoencoder against diffusers' AutoencoderKLQwenImage on single frames: encode, decode,
the pipelines' latent normalisation, weight mapping, tiling, quantization."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import tiny_qwenimage
from parity import max_rel_err, to_numpy

from mlx_sd_server.engine.families.qwenimage.vae import (
    AUTOENCODER_KL_QWENIMAGE,
    AutoencoderKLQwenImage,
    QwenImageVAEConfig,
    map_qwenimage_vae_weight,
)
from mlx_sd_server.engine.families.runtime import encode_pixels
from mlx_sd_server.engine.ops.layers import QuantizedLinear

TOLERANCE = 1e-4
Z_DIM = 16


tiny_qwenimage_vae = tiny_qwenimage.vae


def load_mlx_vae(reference: torch.nn.Module) -> AutoencoderKLQwenImage:
    model = AUTOENCODER_KL_QWENIMAGE.build(dict(reference.config))
    assert isinstance(model, AutoencoderKLQwenImage)
    weights = [
        (k, mx.array(v))
        for key, value in reference.state_dict().items()
        for k, v in map_qwenimage_vae_weight(key, value.numpy())
    ]
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def vae():
    reference = tiny_qwenimage_vae()
    return reference, load_mlx_vae(reference)


def frames_to_nhwc(x: torch.Tensor) -> np.ndarray:
    """(B, C, 1, H, W) -> (B, H, W, C)."""
    return to_numpy(x[:, :, 0]).transpose(0, 2, 3, 1)


def to_mlx(x: torch.Tensor) -> mx.array:
    return mx.array(frames_to_nhwc(x).astype(np.float32))


def random_images(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 1, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_latents(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, Z_DIM, 1, height, width, generator=torch.Generator().manual_seed(seed))


def statistics(reference) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, Z_DIM, 1, 1, 1)
    config = reference.config
    return torch.tensor(config.latents_mean).view(shape), torch.tensor(config.latents_std).view(shape)


@pytest.mark.parametrize("height,width", [(48, 80), (72, 104)])  # the second: BandedConv2d's bands
def test_encode_matches_diffusers(vae, height, width):
    reference, model = vae
    images = random_images(height, width)
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
    mean, logvar = model.encode(to_mlx(images))
    assert mean.shape == (2, height // 8, width // 8, Z_DIM)
    mean_err = max_rel_err(mean, frames_to_nhwc(posterior.mode()))  # mode() is the mean, what "argmax" takes
    logvar_err = max_rel_err(logvar, frames_to_nhwc(posterior.logvar))
    print(f"encode {height}x{width}: mean max rel err {mean_err:.2e}, logvar {logvar_err:.2e}")
    assert mean_err <= TOLERANCE and logvar_err <= TOLERANCE


@pytest.mark.parametrize("height,width", [(6, 10), (9, 13)])  # (9, 13): odd, and in bands
def test_decode_matches_diffusers(vae, height, width):
    reference, model = vae
    latents = random_latents(height, width)
    with torch.no_grad():
        expected = reference.decode(latents).sample
        # the decoder's unclamped output, through diffusers' first-chunk path of its feature cache
        reference.clear_cache()
        raw = reference.decoder(
            reference.post_quant_conv(latents), feat_cache=reference._feat_map, feat_idx=reference._conv_idx
        )
    assert expected.shape == (2, 3, 1, 8 * height, 8 * width)
    assert (expected.abs() < 1).float().mean() > 0.5  # mostly unclamped: the comparison below is not of +-1s
    ours = model.decode(to_mlx(latents))
    ours_raw = model.decoder(model.post_quant_conv(to_mlx(latents)))
    err, raw_err = max_rel_err(ours, frames_to_nhwc(expected)), max_rel_err(ours_raw, frames_to_nhwc(raw))
    print(f"decode {height}x{width}: max rel err {err:.2e} (clamped), {raw_err:.2e} (decoder output)")
    assert err <= TOLERANCE and raw_err <= TOLERANCE


def test_decode_clamps_as_diffusers():
    """The final RMS norm bounds the decoder's output; a louder conv_out makes it overshoot [-1, 1]."""
    reference = tiny_qwenimage_vae(seed=5)
    with torch.no_grad():
        reference.decoder.conv_out.weight.mul_(10)
    model = load_mlx_vae(reference)
    latents = random_latents(6, 10, batch=1)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    raw = model.decoder(model.post_quant_conv(to_mlx(latents)))
    assert mx.abs(raw).max().item() > 1.5  # the decoder overshoots; decode's clamp is what matches
    assert (expected.abs() == 1).float().mean() > 0.1
    assert max_rel_err(model.decode(to_mlx(latents)), frames_to_nhwc(expected)) <= TOLERANCE


def test_encoding_as_the_edit_pipeline_does(vae):
    """`encode_pixels` (the shared pipeline's path: posterior mean, then `to_latents`) against
    QwenImageEditPipeline._encode_vae_image (argmax, then (z - mean) / std) on the same pixels."""
    from diffusers import QwenImageEditPipeline

    reference, model = vae
    pixels = np.random.default_rng(0).random((48, 80, 3), dtype=np.float32)
    image = torch.from_numpy(pixels * 2 - 1).permute(2, 0, 1)[None, :, None]
    pipeline = SimpleNamespace(vae=reference, latent_channels=Z_DIM)
    with torch.no_grad():
        expected = QwenImageEditPipeline._encode_vae_image(pipeline, image, generator=None)
    ours = encode_pixels(SimpleNamespace(vae=model, vae_dtype=mx.float32, low_memory=False), pixels)
    err = max_rel_err(ours, frames_to_nhwc(expected))
    print(f"encode + normalise as the edit pipeline: max rel err {err:.2e}")
    assert ours.dtype == mx.float32 and err <= TOLERANCE


def test_decoding_as_the_pipelines_do(vae):
    """`decode(from_latents(x))` against the end of QwenImagePipeline.__call__: x / (1 / std) + mean, decoded."""
    reference, model = vae
    latents = random_latents(6, 10, batch=1)
    latents_mean, latents_std = statistics(reference)
    with torch.no_grad():
        expected = reference.decode(latents / (1.0 / latents_std) + latents_mean, return_dict=False)[0][:, :, 0]
    ours = model.decode(model.from_latents(to_mlx(latents)))
    err = max_rel_err(ours, to_numpy(expected).transpose(0, 2, 3, 1))
    print(f"denormalise + decode as the pipeline: max rel err {err:.2e}")
    assert err <= TOLERANCE
    assert max_rel_err(model.to_latents(model.from_latents(to_mlx(latents))), frames_to_nhwc(latents)) <= 1e-6


def test_latent_space(vae):
    reference, model = vae
    assert model.latent_scale == model.latent_downscale == reference.spatial_compression_ratio == 8
    assert model.latent_shape(3, 1024, 768) == (3, 128, 96, Z_DIM)
    assert model.config.latents_std == tuple(reference.config.latents_std)
    assert QwenImageVAEConfig().latents_mean == tuple(reference.config.latents_mean)  # the defaults are diffusers'


def test_config_errors():
    with pytest.raises(ValueError, match="temperal_downsample"):
        QwenImageVAEConfig.from_dict({"dim_mult": [1, 2, 4], "temperal_downsample": [False, True, True]})
    with pytest.raises(ValueError, match="latents_std has 16 values, z_dim is 4"):
        QwenImageVAEConfig.from_dict({"z_dim": 4, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="attn_scales"):
        QwenImageVAEConfig.from_dict({"attn_scales": [1.0]})


def test_diffusers_cannot_encode_with_encoder_attention():
    """Why attn_scales is refused: the reference fails on it (should it ever run, this test says so)."""
    from diffusers import AutoencoderKLQwenImage as Reference

    reference = Reference(base_dim=8, dim_mult=[1, 2], attn_scales=[1.0], temperal_downsample=[False]).eval()
    with torch.no_grad(), pytest.raises(TypeError):
        reference.encode(random_images(16, 16))


def test_weight_mapping(vae):
    reference, _ = vae
    state = reference.state_dict()
    mapped = {k: v for key, value in state.items() for k, v in map_qwenimage_vae_weight(key, value.numpy())}
    dropped = sorted(set(state) - set(mapped))
    # the temporal convs of the decoder's two upsample3d and the encoder's two downsample3d, weight and bias each
    assert dropped and all(".time_conv." in key for key in dropped) and len(dropped) == 8
    conv = state["encoder.conv_in.weight"].numpy()  # (8, 3, 3, 3, 3): out, in, time, height, width
    assert np.array_equal(mapped["encoder.conv_in.weight"], conv[:, :, -1].transpose(0, 2, 3, 1))
    assert mapped["decoder.up_blocks.0.upsamplers.0.resample.1.weight"].shape == (16, 3, 3, 32)
    assert mapped["decoder.mid_block.attentions.0.to_qkv.weight"].shape == (96, 32)
    assert mapped["decoder.mid_block.attentions.0.norm.gamma"].shape == (32,)
    assert mapped["encoder.down_blocks.0.norm1.gamma"].shape == (8,)


def test_one_tile_is_the_untiled_decode(vae):
    _, model = vae
    latents = to_mlx(random_latents(8, 12, batch=1))
    assert max_rel_err(model.decode_tiled(latents, tile=16, overlap=4), model.decode(latents)) <= 1e-6


def test_decode_tiled_is_as_close_as_diffusers_tiling(vae):
    """Tiles see only their own pixels (the mid-block attention, the RMS norms do not mix pixels), so no tiling
    reproduces a full decode; the bound is the reference's own tiled decode with the same tile and overlap."""
    reference, model = vae
    latents = random_latents(24, 40, batch=1)
    tile, overlap = 16, 4
    reference.enable_tiling(tile * 8, tile * 8, (tile - overlap) * 8, (tile - overlap) * 8)
    try:
        with torch.no_grad():
            reference_tiled = reference.decode(latents).sample
            reference.use_tiling = False
            reference_full = reference.decode(latents).sample
    finally:
        reference.use_tiling = False
    reference_diff = (reference_tiled - reference_full).abs().mean().item()
    ours_full = model.decode(to_mlx(latents))
    ours_diff = mx.abs(model.decode_tiled(to_mlx(latents), tile, overlap) - ours_full).mean().item()
    print(f"tiled decode: mean abs diff from untiled {ours_diff:.2e} (diffusers' tiling: {reference_diff:.2e})")
    assert 0 < ours_diff <= reference_diff


def test_encode_tiled_is_close_to_the_untiled_encode(vae):
    _, model = vae
    images = to_mlx(random_images(192, 320, batch=1))
    full, _ = model.encode(images)
    tiled, _ = model.encode_tiled(images, tile=16, overlap=4)
    assert tiled.shape == full.shape
    assert mx.abs(tiled - full).mean().item() <= 0.1 * mx.abs(full).mean().item()
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model.encode_tiled(images[:, :100])


def test_quantizes_its_linears(vae):
    reference, _ = vae
    model = load_mlx_vae(reference)
    latents = to_mlx(random_latents(6, 10, batch=1))
    before = model.decode(latents)
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.decoder.mid_block.attentions[0].to_qkv, QuantizedLinear)
    assert isinstance(model.encoder.mid_block.attentions[0].proj, QuantizedLinear)
    assert max_rel_err(model.decode(latents), before) <= 2e-2


def test_half_precision_runs_close_to_float32(vae):
    reference, model = vae
    half = load_mlx_vae(reference)
    half.set_dtype(mx.float16)
    latents = to_mlx(random_latents(6, 10, batch=1))
    images = half.decode(latents)
    assert images.dtype == mx.float16
    assert mx.abs(images.astype(mx.float32) - model.decode(latents)).mean().item() <= 1 / 255
    mean, _ = half.encode(images)
    assert mx.abs(mean.astype(mx.float32) - model.encode(images.astype(mx.float32))[0]).mean().item() <= 1e-2


@pytest.mark.realsize
def test_released_size_vae_matches_diffusers():
    """The released widths (base_dim 96) with random weights, on a 128x128 image."""
    reference = tiny_qwenimage_vae(base_dim=96)
    model = load_mlx_vae(reference)
    images = random_images(128, 128, batch=1)
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        decoded = reference.decode(posterior.mode()).sample
    mean, logvar = model.encode(to_mlx(images))
    errors = (
        max_rel_err(mean, frames_to_nhwc(posterior.mean)),
        max_rel_err(logvar, frames_to_nhwc(posterior.logvar)),
        max_rel_err(model.decode(to_mlx(posterior.mean)), frames_to_nhwc(decoded)),
    )
    print("released size: max rel err mean {:.2e}, logvar {:.2e}, decode {:.2e}".format(*errors))
    assert max(errors) <= TOLERANCE
