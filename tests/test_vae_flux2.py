"""The MLX FLUX.2 autoencoder against diffusers' AutoencoderKLFlux2, and its latent normalisation against
the FLUX.2 klein pipeline's own functions."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_diffusers
from mlx_sd_server.engine.vae import (
    AUTOENCODER_KL_FLUX2,
    Flux2Autoencoder,
    Flux2VAEConfig,
    map_flux2_vae_weight,
    patchify_latents,
    unpatchify_latents,
)
from parity import max_rel_err, nchw_to_nhwc

TOLERANCE = 1e-4
LATENT_CHANNELS = 32


@pytest.fixture(scope="module")
def vaes():
    """Four levels (downscale 8, as released); decoder widths unlike the encoder's, which the config allows."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    reference = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),
        decoder_block_out_channels=(8, 16, 24, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
    ).eval()
    tiny_diffusers._randomize_zero_init(reference)
    with torch.no_grad():  # fresh statistics are mean 0, var 1: make them matter
        reference.bn.running_mean.uniform_(-1.0, 1.0)
        reference.bn.running_var.uniform_(0.25, 4.0)
    model = AUTOENCODER_KL_FLUX2.build(dict(reference.config))
    weights = [
        (k, mx.array(v))
        for key, value in reference.state_dict().items()
        for k, v in map_flux2_vae_weight(key, value.numpy())
    ]
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return reference, model


def to_mlx(x: torch.Tensor) -> mx.array:
    return mx.array(nchw_to_nhwc(x).astype(np.float32))


def random_images(height: int, width: int) -> torch.Tensor:
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1


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
    latents = torch.randn(1, LATENT_CHANNELS, height // 8, width // 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.decode(latents).sample
    assert max_rel_err(model.decode(to_mlx(latents)), nchw_to_nhwc(expected)) <= TOLERANCE


def test_latent_normalisation_matches_the_pipeline(vaes):
    """Encode + patchify + normalise as `Flux2KleinPipeline._encode_vae_image`; the inverse as its `__call__`
    does before decoding, with its own `_unpatchify_latents`."""
    from diffusers import Flux2KleinPipeline

    reference, model = vaes
    images = random_images(64, 96)
    pipeline = SimpleNamespace(vae=reference, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        expected = Flux2KleinPipeline._encode_vae_image(pipeline, images, generator=None)
    mean, _ = model.encode(to_mlx(images))
    latents = model.normalize_latents(mean)
    assert latents.shape == (2, 4, 6, 4 * LATENT_CHANNELS)
    assert max_rel_err(latents, nchw_to_nhwc(expected)) <= TOLERANCE

    # the pipeline's inverse, before `vae.decode`, on the same (torch) latents
    bn = reference.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    denormalized = Flux2KleinPipeline._unpatchify_latents(expected * std + bn.running_mean.view(1, -1, 1, 1))
    assert max_rel_err(model.denormalize_latents(to_mlx(expected)), nchw_to_nhwc(denormalized)) <= TOLERANCE
    assert max_rel_err(model.denormalize_latents(latents), mean) <= 1e-5  # a round trip


def test_patchify_matches_the_pipeline():
    from diffusers import Flux2KleinPipeline

    x = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(2))

    patched = patchify_latents(to_mlx(x))
    assert np.array_equal(np.array(patched), nchw_to_nhwc(Flux2KleinPipeline._patchify_latents(x)).astype(np.float32))
    assert np.array_equal(np.array(unpatchify_latents(patched)), np.array(to_mlx(x)))
    with pytest.raises(ValueError, match="patch"):
        patchify_latents(mx.zeros((1, 5, 4, 3)))


def test_config_defaults():
    """A config without the AutoencoderKLFlux2-only keys gets its class defaults; there is no scale or shift."""
    config = Flux2VAEConfig.from_dict({"latent_channels": 32, "block_out_channels": [128, 256, 512, 512]})
    assert (config.batch_norm_eps, config.patch_size, config.decoder_widths) == (1e-4, (2, 2), (128, 256, 512, 512))
    small = {"patch_size": [2, 2], "block_out_channels": [8, 8], "norm_num_groups": 8}
    model = Flux2Autoencoder(Flux2VAEConfig.from_dict(small))
    assert (model.scaling_factor, model.shift_factor, model.latent_scale) == (1.0, 0.0, 2)
    assert model.bn.running_mean.shape == (4 * 32,)
