"""Real-size FLUX.2 klein parity: our MLX transformer against diffusers' Flux2Transformer2DModel at klein 4B's widths.

The tiny tests (test_flux2_transformer.py) check the wiring at widths of 32; this checks what only shows at klein
4B's own sizes: 24 heads of 128 (3072 wide) with the (32, 32, 32, 32) rotary split at theta 2000, the 7680-wide
text features (3 stacked Qwen3-4B states), the fused 3 x 3072 + 2 x 9216 single-block projection and the shared
modulations. Random weights, float32, nothing downloaded. Widths are kept, depth is not (1 double + 1 single
block): every block is the same code, and depth only compounds float32 rounding.

Marked `realsize` (excluded from the default run):

    ./run-tests -m realsize tests/test_flux2_realsize.py -s

The test prints its max_rel_err, the forward times of torch and ours (one cold call each) and the process's peak
resident memory.
"""

from __future__ import annotations

import resource
import time

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd_server.engine.families.flux2.mapping import map_flux2_transformer_weight
from mlx_sd_server.engine.families.flux2.transformer import (
    Flux2Transformer2DModel,
    Flux2TransformerConfig,
    image_ids,
    text_ids,
)
from parity import load_torch_weights, max_rel_err

pytestmark = pytest.mark.realsize

TOLERANCE = 1e-4
# black-forest-labs/FLUX.2-klein-4B transformer/config.json (bookkeeping keys dropped).
KLEIN_4B = dict(
    patch_size=1,
    in_channels=128,
    out_channels=None,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)


def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def test_flux2_klein_transformer_released_widths_match_diffusers():
    """A 512x512 image (64x64 latent, 32x32 patches: here a 16x16 grid of packed tokens, 256 of them) with 64 text
    tokens, batch 2 at different sigmas; ids as Flux2KleinPipeline makes them."""
    from diffusers import Flux2Transformer2DModel as Reference

    torch.manual_seed(0)
    reference = Reference(**{**KLEIN_4B, "num_layers": 1, "num_single_layers": 1}).eval()
    with torch.no_grad():  # N(0, 1/fan_in): the modulations come out O(1) (diffusers' init makes them ~0.1)
        for name, param in reference.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, param.shape[1] ** -0.5)
            elif ".norm_" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    img_ids, txt_ids = np.array(image_ids(16, 16)), np.array(text_ids(64))
    inputs = {
        "hidden_states": torch.randn(2, 256, 128, generator=g),
        "encoder_hidden_states": torch.randn(2, 64, 7680, generator=g),
        "timestep": torch.tensor([1.0, 0.3217]),
        "img_ids": torch.from_numpy(img_ids),
        "txt_ids": torch.from_numpy(txt_ids),
        "guidance": None,
    }
    with torch.no_grad():
        expected, torch_s = timed(lambda: reference(**inputs, return_dict=False)[0])

    model = Flux2Transformer2DModel(Flux2TransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_flux2_transformer_weight)
    del reference
    arrays = {k: None if v is None else mx.array(v.numpy()) for k, v in inputs.items()}

    def run_ours():
        out = model(**arrays)
        mx.eval(out)
        return out

    ours, mlx_s = timed(run_ours)
    err = max_rel_err(ours, expected)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    print(
        f"\nflux2 klein-4B transformer (1+1 blocks, 256 image + 64 text tokens): max_rel_err {err:.2e} "
        f"(torch {torch_s:.1f} s, mlx {mlx_s:.1f} s, peak RSS {peak_gb:.1f} GB)"
    )
    assert ours.shape == (2, 256, 128)
    assert err <= TOLERANCE
