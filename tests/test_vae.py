"""The MLX VAE against diffusers' AutoencoderKL: encode, decode, tiling, weight conversion."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_diffusers
from mlx_sd_server.engine.vae import map_vae_weight
from mlx_sd_server.engine.vae import Autoencoder, VAEConfig, run_tiled, should_tile
from parity import max_rel_err, nchw_to_nhwc

TOLERANCE = 1e-4


def load_mlx_vae(reference: torch.nn.Module) -> Autoencoder:
    model = Autoencoder(VAEConfig.from_dict(dict(reference.config)))
    weights = [(k, mx.array(v)) for key, value in reference.state_dict().items() for k, v in map_vae_weight(key, value.numpy())]
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def vaes(request):
    reference = tiny_diffusers.vae(request.param)
    return reference, load_mlx_vae(reference)


@pytest.fixture(scope="module")
def sd1_vae():
    """For tests of what both families share (the tiny sd1 and sdxl VAEs differ only in scaling_factor)."""
    reference = tiny_diffusers.vae("sd1")
    return reference, load_mlx_vae(reference)


def to_mlx(x: torch.Tensor) -> mx.array:
    return mx.array(nchw_to_nhwc(x).astype(np.float32))


def random_images(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_latents(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_encode_matches_diffusers(vaes, height, width):
    reference, model = vaes
    images = random_images(height, width)
    with torch.no_grad():
        expected = reference.encode(images).latent_dist
    mean, logvar = model.encode(to_mlx(images))
    assert max_rel_err(mean, nchw_to_nhwc(expected.mean)) <= TOLERANCE
    assert max_rel_err(logvar, nchw_to_nhwc(expected.logvar)) <= TOLERANCE


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_decode_matches_diffusers(vaes, height, width):
    reference, model = vaes
    latents = random_latents(height // 8, width // 8)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    assert max_rel_err(model.decode(to_mlx(latents)), nchw_to_nhwc(expected)) <= TOLERANCE


def test_config_and_scales():
    config = VAEConfig.from_dict({**dict(tiny_diffusers.vae("sdxl").config), "some_future_key": 1})
    model = Autoencoder(config)
    assert model.scaling_factor == pytest.approx(0.13025)
    assert model.shift_factor == 0.0  # diffusers writes null for "no shift"
    assert model.latent_scale == 8
    assert config.block_out_channels == (8, 16, 16, 16)


def test_legacy_attention_names_and_conv_shaped_projections():
    """Old checkpoints name the projections query/key/value/proj_attn, some store them as 1x1 convs."""
    reference = tiny_diffusers.vae("sd1")
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    current, legacy = {}, {}
    for key, value in reference.state_dict().items():
        current.update(map_vae_weight(key, value.numpy()))
        legacy_key, legacy_value = key, value.numpy()
        for new, old in renames.items():
            if new in key:
                legacy_key = key.replace(new, old)
                legacy_value = legacy_value.reshape(legacy_value.shape + (1, 1)) if legacy_value.ndim == 2 else legacy_value
        legacy.update(map_vae_weight(legacy_key, legacy_value))
    assert legacy.keys() == current.keys()
    assert all(np.array_equal(legacy[k], current[k]) for k in current)
    assert current["encoder.conv_in.weight"].shape == (8, 3, 3, 3)  # OHWI: 8 out, 3x3, 3 in (RGB)


def test_tiling_blends_exactly_for_pixelwise_functions():
    """With a function that sees no neighbours, only tile placement and weights matter: exact result."""
    latents = mx.random.normal((2, 21, 30, 4), key=mx.random.key(0))

    def upsample(z):  # 8x nearest upsampling, a stand-in for a decoder with no spatial context
        B, H, W, C = z.shape
        return mx.tanh(mx.broadcast_to(z[:, :, None, :, None], (B, H, 8, W, 8, C)).reshape(B, 8 * H, 8 * W, C))

    def downsample(x):  # 8x8 mean pooling, a stand-in for an encoder
        B, H, W, C = x.shape
        return x.reshape(B, H // 8, 8, W // 8, 8, C).mean(axis=(2, 4))

    images = upsample(latents)
    assert max_rel_err(run_tiled(upsample, latents, 8, 3, in_step=1, out_step=8), images) <= 1e-6
    assert max_rel_err(run_tiled(downsample, images, 8, 3, in_step=8, out_step=1), downsample(images)) <= 1e-6


def test_one_tile_is_the_untiled_decode(sd1_vae):
    _, model = sd1_vae
    latents = to_mlx(random_latents(8, 12))
    assert max_rel_err(model.decode_tiled(latents, tile=16, overlap=4), model.decode(latents)) <= 1e-6


def test_decode_tiled_is_as_close_as_diffusers_tiling(sd1_vae):
    """Tiles see their own GroupNorm statistics, so no tiling reproduces a full decode exactly; the bound
    is the reference's own tiled decode with the same tile and overlap, which ours must not exceed."""
    reference, model = sd1_vae
    latents = random_latents(24, 40)
    tile, overlap = 16, 4
    reference.enable_tiling()
    reference.tile_latent_min_size, reference.tile_sample_min_size = tile, tile * 8
    reference.tile_overlap_factor = overlap / tile
    with torch.no_grad():
        reference_tiled = reference.decode(latents).sample
        reference.disable_tiling()
        reference_full = reference.decode(latents).sample
    reference_diff = (reference_tiled - reference_full).abs().mean().item()

    ours_full = model.decode(to_mlx(latents))
    ours_diff = mx.abs(model.decode_tiled(to_mlx(latents), tile, overlap) - ours_full).mean().item()
    assert ours_diff <= reference_diff


def test_encode_tiled_is_as_close_as_diffusers_tiling(sd1_vae):
    reference, model = sd1_vae
    images = random_images(192, 320)[:1]
    tile, overlap = 16, 4  # latent pixels
    reference.enable_tiling()
    reference.tile_latent_min_size, reference.tile_sample_min_size = tile, tile * 8
    reference.tile_overlap_factor = overlap / tile
    with torch.no_grad():
        reference_tiled = reference.encode(images).latent_dist.mean
        reference.disable_tiling()
        reference_full = reference.encode(images).latent_dist.mean
    reference_diff = (reference_tiled - reference_full).abs().mean().item()

    ours_full, _ = model.encode(to_mlx(images))
    ours_tiled, _ = model.encode_tiled(to_mlx(images), tile, overlap)
    assert mx.abs(ours_tiled - ours_full).mean().item() <= reference_diff


def test_float16_latents_decode_in_the_vae_dtype(sd1_vae):
    """A float32 VAE (force_upcast) takes the float16 latents of a float16 UNet and decodes in float32."""
    _, model = sd1_vae
    latents = to_mlx(random_latents(8, 8))
    images = model.decode(latents.astype(mx.float16))
    assert images.dtype == mx.float32
    assert max_rel_err(images, model.decode(latents.astype(mx.float16).astype(mx.float32))) <= 1e-6
    assert VAEConfig.from_dict({"force_upcast": True}).force_upcast


def test_should_tile():
    assert not should_tile(64, 64)  # SD 1.5 at 512x512
    assert not should_tile(128, 128)  # SDXL at 1024x1024
    assert should_tile(128, 192)
    assert should_tile(256, 256)
    assert should_tile(128, 128, low_memory=True) and not should_tile(64, 64, low_memory=True)


@pytest.mark.realsize
def test_sd15_sized_vae_matches_diffusers():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
    ).eval()
    model = load_mlx_vae(reference)
    images = random_images(256, 256)[:1]
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        decoded = reference.decode(posterior.mean).sample
    mean, logvar = model.encode(to_mlx(images))
    assert max_rel_err(mean, nchw_to_nhwc(posterior.mean)) <= TOLERANCE
    assert max_rel_err(logvar, nchw_to_nhwc(posterior.logvar)) <= TOLERANCE
    assert max_rel_err(model.decode(to_mlx(posterior.mean)), nchw_to_nhwc(decoded)) <= TOLERANCE


def test_banded_convolution_equals_the_plain_one():
    """Large inputs go through BandedConv2d's row bands (with the rows not dividing evenly); same result."""
    from mlx_sd_server.engine.vae import BandedConv2d

    conv = BandedConv2d(8, 16)
    x = mx.random.normal((2, 150, 130, 8), key=mx.random.key(0))
    assert x.shape[1] * x.shape[2] > BandedConv2d.BAND_PIXELS
    expected = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    assert mx.abs(conv(x) - expected).max().item() < 1e-5
