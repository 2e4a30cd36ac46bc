"""Real-size Z-Image parity: our MLX transformer and Qwen3 encoder against diffusers/transformers at the released widths.

The tiny tests (test_zimage_transformer.py, test_qwen3.py) check the wiring at widths of 64; these check what only
shows at Z-Image-Turbo's own sizes: 30 heads of 128 (3840 wide) with the (32, 48, 48) rotary split, 2560-wide
caption features, and Qwen3-4B's 32 query / 8 key-value heads of 128 over a 2560-wide stream with a 9728-wide MLP.
Random weights, float32, nothing downloaded. Widths are kept, depth is not (1 main + 1 noise-refiner + 1
context-refiner layer; 2 Qwen3 layers): every layer is the same code, and depth only compounds float32 rounding.

Marked `realsize` (excluded from the default run):

    ./run-tests -m realsize tests/test_zimage_realsize.py -s

Each test prints its max_rel_err, the forward times of torch and ours (one cold call each) and the process's peak
resident memory so far.
"""

from __future__ import annotations

import resource
import time

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd_server.engine.families.zimage.mapping import map_zimage_transformer_weight
from mlx_sd_server.engine.families.zimage.transformer import ZImageTransformer2DModel, ZImageTransformerConfig
from mlx_sd_server.engine.text.qwen3 import Qwen3Config, Qwen3Model, map_qwen3_weight
from parity import load_torch_weights, max_rel_err

pytestmark = pytest.mark.realsize

TOLERANCE = 1e-4
# Tongyi-MAI/Z-Image-Turbo transformer/config.json (bookkeeping keys dropped).
ZIMAGE_TURBO = dict(
    all_f_patch_size=[1],
    all_patch_size=[2],
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
    cap_feat_dim=2560,
    dim=3840,
    in_channels=16,
    n_heads=30,
    n_kv_heads=30,
    n_layers=30,
    n_refiner_layers=2,
    norm_eps=1e-05,
    qk_norm=True,
    rope_theta=256.0,
    t_scale=1000.0,
)
# Qwen/Qwen3-4B's widths (Z-Image's text encoder).
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
)


def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def report(what: str, err: float, torch_s: float, mlx_s: float) -> None:
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    print(f"\n{what}: max_rel_err {err:.2e} (torch {torch_s:.1f} s, mlx {mlx_s:.1f} s, peak RSS {peak_gb:.1f} GB)")


def randomize(model: torch.nn.Module) -> None:
    """Matrices N(0, 1/fan_in) (variance-preserving: the modulations come out O(1) and every layer changes the
    stream), norm scales U(0.5, 1.5) (all-ones would hide a misplaced one), the rest N(0, 0.1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif param.ndim >= 2 and "embed_tokens" not in name and "pad_token" not in name:
                param.normal_(0, (param.numel() // param.shape[0]) ** -0.5)
            else:
                param.normal_(0, 1.0 if param.ndim >= 2 else 0.1)


# --- transformer ---------------------------------------------------------------------------------------


def test_zimage_transformer_released_widths_match_diffusers():
    """A 256x256 image (32x32 latent: 256 image tokens) with two captions of 77 and 203 tokens (padded to 96 and
    224 by diffusers; one batch with per-item lengths here) at different timesteps."""
    from diffusers import ZImageTransformer2DModel as Reference

    assert ZImageTransformerConfig.from_dict(ZIMAGE_TURBO) == ZImageTransformerConfig()
    torch.manual_seed(0)
    reference = Reference(**{**ZIMAGE_TURBO, "n_layers": 1, "n_refiner_layers": 1}).eval()
    randomize(reference)
    g = torch.Generator().manual_seed(1)
    lengths = [77, 203]
    latents = torch.randn(2, 16, 32, 32, generator=g)
    timestep = torch.tensor([0.3125, 0.875])
    caps = [torch.randn(n, 2560, generator=g) for n in lengths]
    with torch.no_grad():
        out, torch_s = timed(
            lambda: reference(list(latents.unsqueeze(2).unbind(0)), timestep, caps, patch_size=2, return_dict=False)[0]
        )
    expected = torch.stack(out).squeeze(2).numpy().transpose(0, 2, 3, 1)

    model = ZImageTransformer2DModel(ZImageTransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_zimage_transformer_weight)
    del reference
    padded = np.zeros((2, max(lengths), 2560), np.float32)
    for i, c in enumerate(caps):
        padded[i, : len(c)] = c.numpy()
    x = mx.array(latents.numpy().transpose(0, 2, 3, 1))

    def run_ours():
        out = model(x, mx.array(timestep.numpy()), mx.array(padded), lengths)
        mx.eval(out)
        return out

    ours, mlx_s = timed(run_ours)
    err = max_rel_err(ours, expected)
    report("zimage transformer (1+1+1 layers, 256 image + 77/203 caption tokens)", err, torch_s, mlx_s)
    assert err <= TOLERANCE


# --- Qwen3-4B -----------------------------------------------------------------------------------------


def test_qwen3_4b_widths_match_transformers():
    """Two layers of Qwen3-4B over 64 tokens: a prompt of 40 right-padded to 64 (with its mask) and 64 unpadded
    random ids. Every hidden state is compared, padding positions included (FLUX.2 klein keeps them)."""
    from transformers import Qwen3Config as ReferenceConfig
    from transformers import Qwen3Model as Reference

    torch.manual_seed(0)
    reference = Reference(ReferenceConfig(**{**QWEN3_4B, "num_hidden_layers": 2})).eval()
    randomize(reference)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, QWEN3_4B["vocab_size"], size=(2, 64))
    mask = np.ones((2, 64), np.int64)
    ids[0, 40:], mask[0, 40:] = 151643, 0  # <|endoftext|>, Qwen's pad token
    with torch.no_grad():
        expected, torch_s = timed(
            lambda: (
                reference(
                    input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True,
                    use_cache=False,
                ).hidden_states
            )
        )

    config = Qwen3Config.from_dict(reference.config.to_dict())
    assert (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
    ) == (2560, 32, 8, 128, 9728)
    model = Qwen3Model(config)
    load_torch_weights(model, reference.state_dict(), map_qwen3_weight)
    del reference

    def run_ours():
        out = model(mx.array(ids), mx.array(mask))
        mx.eval(out)
        return out

    ours, mlx_s = timed(run_ours)
    assert len(ours) == len(expected) == 3
    errors = [max_rel_err(a, b) for a, b in zip(ours, expected)]
    print(f"\nqwen3-4b per hidden state: {[f'{e:.1e}' for e in errors]}", end="")
    report("qwen3-4b (2 layers, 64 tokens, padding mask)", max(errors), torch_s, mlx_s)
    assert max(errors) <= TOLERANCE
