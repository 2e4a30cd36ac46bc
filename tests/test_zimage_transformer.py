"""MLX Z-Image transformer against diffusers' ZImageTransformer2DModel on tiny random-weight models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_diffusers
from mlx_sd_server.engine.families.zimage.mapping import map_zimage_transformer_weight
from mlx_sd_server.engine.families.zimage.transformer import (
    ZImageTransformer2DModel,
    ZImageTransformerConfig,
    patchify,
    unpatchify,
)
from parity import load_torch_weights, max_rel_err

TOLERANCE = 1e-4
LATENT_CHANNELS = 16
CAP_FEAT_DIM = 24


def tiny_config(n_layers: int = 2, n_refiner_layers: int = 2, patch: int = 2) -> dict:
    return dict(
        all_patch_size=[patch], all_f_patch_size=[1], in_channels=LATENT_CHANNELS, dim=64, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=CAP_FEAT_DIM, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
    )


def reference_model(seed: int = 0, **sizes):
    from diffusers import ZImageTransformer2DModel as Reference

    torch.manual_seed(seed)
    model = Reference(**tiny_config(**sizes)).eval()
    tiny_diffusers._randomize_zero_init(model)  # the pad tokens start at zero
    with torch.no_grad():  # the RMSNorm scales start at 1: make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def mlx_model(reference) -> ZImageTransformer2DModel:
    model = ZImageTransformer2DModel(ZImageTransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_zimage_transformer_weight)
    return model


def random_inputs(h: int, w: int, lengths: list[int], cfg: bool = False, seed: int = 0) -> dict:
    """One latent per caption (with `cfg`, one latent twice, as the pipeline batches prompt and negative prompt),
    per-item timesteps, captions of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    latents = torch.randn(1 if cfg else batch, LATENT_CHANNELS, h, w, generator=g)
    if cfg:
        latents = latents.repeat(batch, 1, 1, 1)
    timestep = torch.tensor([0.3125, 0.875, 0.5][:batch])
    if cfg:
        timestep = timestep[:1].repeat(batch)
    caps = [torch.randn(n, CAP_FEAT_DIM, generator=g) for n in lengths]
    return {"latents": latents, "timestep": timestep, "caps": caps}


def run_reference(reference, inputs: dict) -> np.ndarray:
    """(B, H, W, C) from the diffusers model called as ZImagePipeline calls it: lists of (C, 1, H, W) latents and of
    (L_i, cap_feat_dim) captions."""
    with torch.no_grad():
        out = reference(list(inputs["latents"].unsqueeze(2).unbind(0)), inputs["timestep"], inputs["caps"],
                        patch_size=reference.config.all_patch_size[0], return_dict=False)[0]
    return torch.stack(out).squeeze(2).numpy().transpose(0, 2, 3, 1)


def run_mlx(model: ZImageTransformer2DModel, inputs: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
    lengths = [len(c) for c in inputs["caps"]]
    caps = np.zeros((len(lengths), max(lengths), CAP_FEAT_DIM), np.float32)
    for i, c in enumerate(inputs["caps"]):
        caps[i, : len(c)] = c.numpy()
    out = model(mx.array(inputs["latents"].numpy().transpose(0, 2, 3, 1)).astype(dtype),
                mx.array(inputs["timestep"].numpy()), mx.array(caps).astype(dtype), lengths)
    mx.eval(out)
    return out


CASES = {
    # (model sizes, latent h, w, caption lengths, cfg)
    "one-prompt": (dict(), 6, 10, [7], False),  # 15 image tokens: padded to 32
    "two-prompts-uneven": (dict(), 6, 10, [5, 40], False),  # captions padded to 32 and 64: batch masks
    "cfg-even": (dict(), 8, 16, [20, 3], True),  # 32 image tokens, no pad; captions both padded to 32
    "cfg-uneven-odd-depth": (dict(n_layers=3, n_refiner_layers=1), 10, 6, [33, 9], True),
    "patch-1": (dict(n_layers=1, n_refiner_layers=1, patch=1), 4, 6, [12, 50], False),
}


@pytest.mark.parametrize("case", CASES)
def test_zimage_transformer_matches_diffusers(case):
    sizes, h, w, lengths, cfg = CASES[case]
    reference = reference_model(**sizes)
    inputs = random_inputs(h, w, lengths, cfg)
    ours, ref = run_mlx(mlx_model(reference), inputs), run_reference(reference, inputs)
    err = max_rel_err(ours, ref)
    print(f"zimage {case}: max_rel_err {err:.2e}")
    assert ours.shape == (len(lengths), h, w, LATENT_CHANNELS)
    assert err <= TOLERANCE


def test_batched_items_match_their_single_runs_and_scalar_timestep_broadcasts():
    model = mlx_model(reference_model())
    inputs = random_inputs(6, 10, [5, 40])
    inputs["timestep"] = torch.tensor([0.5, 0.5])
    batched = run_mlx(model, inputs)
    for i in range(2):
        alone = dict(inputs, latents=inputs["latents"][i : i + 1], timestep=inputs["timestep"][i : i + 1],
                     caps=inputs["caps"][i : i + 1])
        assert max_rel_err(batched[i : i + 1], run_mlx(model, alone)) <= 1e-5
    caps = np.zeros((2, 40, CAP_FEAT_DIM), np.float32)
    for i, c in enumerate(inputs["caps"]):
        caps[i, : len(c)] = c.numpy()
    scalar = model(mx.array(inputs["latents"].numpy().transpose(0, 2, 3, 1)), 0.5, mx.array(caps), [5, 40])
    assert max_rel_err(scalar, batched) == 0.0


@pytest.mark.parametrize("dtype, tolerance", [(mx.bfloat16, 5e-2)])
def test_half_precision_weights_stay_close(dtype, tolerance):
    reference = reference_model()
    model = mlx_model(reference)
    model.set_dtype(dtype)
    inputs = random_inputs(6, 10, [5, 40])
    ours = run_mlx(model, inputs, dtype)
    assert ours.dtype == dtype
    err = max_rel_err(ours.astype(mx.float32), run_reference(reference, inputs))
    print(f"zimage {dtype}: max_rel_err {err:.2e}")
    assert err <= tolerance


@pytest.mark.parametrize("h, w, p", [(6, 10, 2), (4, 4, 2), (3, 5, 1)])
def test_patchify_matches_diffusers(h, w, p):
    reference = reference_model(n_layers=1, n_refiner_layers=1, patch=p)
    nchw = torch.randn(LATENT_CHANNELS, 1, h, w, generator=torch.Generator().manual_seed(0))
    ref_tokens, size, _ = reference._patchify_image(nchw, p, 1)
    x = mx.array(nchw.squeeze(1).numpy().transpose(1, 2, 0))[None]
    tokens = patchify(x, p)
    np.testing.assert_array_equal(np.array(tokens[0]), ref_tokens.numpy())
    ref_back = reference.unpatchify([ref_tokens], [size], p, 1)[0]
    back = np.array(unpatchify(tokens, h, w, p)[0])
    np.testing.assert_array_equal(back, ref_back.squeeze(1).numpy().transpose(1, 2, 0))


def test_odd_latent_and_bad_lengths_are_refused():
    model = mlx_model(reference_model(n_layers=1, n_refiner_layers=1))
    caps = mx.zeros((1, 4, CAP_FEAT_DIM))
    with pytest.raises(ValueError, match="multiple of 2"):
        model(mx.zeros((1, 5, 4, LATENT_CHANNELS)), 0.5, caps)
    with pytest.raises(ValueError, match="lengths"):
        model(mx.zeros((1, 4, 4, LATENT_CHANNELS)), 0.5, caps, [5])
    with pytest.raises(ValueError, match="axes_lens"):  # frame axis 256 in the tiny config: 8 x 32 caption tokens
        model(mx.zeros((1, 4, 4, LATENT_CHANNELS)), 0.5, mx.zeros((1, 250, CAP_FEAT_DIM)))


RELEASED = {  # Tongyi-MAI/Z-Image-Turbo transformer/config.json
    "_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.36.0.dev0", "all_f_patch_size": [1],
    "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560,
    "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2,
    "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0,
}


def test_config_from_the_released_json():
    config = ZImageTransformerConfig.from_dict(RELEASED)
    assert config == ZImageTransformerConfig()
    assert config.embedder_key == "2-1"


@pytest.mark.parametrize("change, message", [
    ({"all_patch_size": [2, 4], "all_f_patch_size": [1, 1]}, "one patch size"),
    ({"all_f_patch_size": [2]}, "frame patch size 1"),
    ({"siglip_feat_dim": 1152}, "Omni"),
    ({"axes_dims": [32, 48, 40]}, "must sum"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ZImageTransformerConfig.from_dict({**RELEASED, **change})


def test_parameter_names_are_diffusers():
    reference = reference_model(n_layers=1, n_refiner_layers=1)
    from mlx.utils import tree_flatten

    ours = {k: v.shape for k, v in tree_flatten(mlx_model(reference).parameters())}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
