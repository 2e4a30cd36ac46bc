"""MLX FLUX transformer against diffusers' FluxTransformer2DModel on tiny random-weight models."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import tiny_diffusers
from mlx_sd_server.engine.families.flux.mapping import map_flux_transformer_weight
from mlx_sd_server.engine.families.flux.transformer import (
    FluxTransformer2DModel,
    FluxTransformerConfig,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from parity import load_torch_weights, max_rel_err

TOLERANCE = 1e-4
LATENT_CHANNELS = 16
TEXT_LENGTH = 5


def tiny_config(guidance: bool, num_layers: int = 1, num_single_layers: int = 3) -> dict:
    return dict(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, out_channels=None, num_layers=num_layers,
        num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=24, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    )


def reference_model(guidance: bool, seed: int = 0, **sizes):
    from diffusers import FluxTransformer2DModel as Reference

    torch.manual_seed(seed)
    model = Reference(**tiny_config(guidance, **sizes)).eval()
    tiny_diffusers._randomize_zero_init(model)
    with torch.no_grad():  # the RMSNorm scales start at 1: make them matter
        for name, param in model.named_parameters():
            if ".norm_" in name:
                param.uniform_(0.5, 1.5)
    return model


def mlx_model(reference) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(FluxTransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_flux_transformer_weight)
    return model


def random_inputs(h: int = 6, w: int = 4, guidance: bool = True, ids: str = "pipeline", seed: int = 0) -> dict:
    """Batch 2 with different sigmas (and guidance scales); latent h x w (packed to h/2 x w/2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    tokens = (h // 2) * (w // 2)
    img_ids = torch.from_numpy(np.array(latent_image_ids(h, w)))
    txt_ids = torch.zeros(TEXT_LENGTH, 3)
    if ids == "random":  # e.g. Kontext's reference-image ids: any position on every axis
        img_ids = torch.randint(0, 40, (tokens, 3), generator=g).float()
        txt_ids = torch.randint(0, 40, (TEXT_LENGTH, 3), generator=g).float()
    elif ids == "far":  # positions of a 2048px image: angles up to ~120 rad, float32 rounding shows there
        img_ids = img_ids + torch.tensor([0.0, 120.0, 100.0])
    return {
        "hidden_states": torch.randn(2, tokens, 4 * LATENT_CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(2, TEXT_LENGTH, 32, generator=g),
        "pooled_projections": torch.randn(2, 24, generator=g),
        "timestep": torch.tensor([1.0, 0.3217]),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": torch.tensor([3.5, 5.25]) if guidance else None,
    }


def run_reference(reference, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return reference(**inputs, return_dict=False)[0]


def run_mlx(model: FluxTransformer2DModel, inputs: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
    def to_mx(t, cast=True):
        a = mx.array(t.numpy())
        return a.astype(dtype) if cast else a

    out = model(
        to_mx(inputs["hidden_states"]), to_mx(inputs["encoder_hidden_states"]), to_mx(inputs["pooled_projections"]),
        to_mx(inputs["timestep"], cast=False), to_mx(inputs["img_ids"], cast=False),
        to_mx(inputs["txt_ids"], cast=False),
        None if inputs["guidance"] is None else to_mx(inputs["guidance"], cast=False),
    )
    mx.eval(out)
    return out


CASES = {
    "schnell": dict(guidance=False, num_layers=2, num_single_layers=1),
    "dev": dict(guidance=True, num_layers=1, num_single_layers=3),
}


@pytest.mark.parametrize("ids", ["pipeline", "random", "far"])
@pytest.mark.parametrize("case", CASES)
def test_flux_transformer_matches_diffusers(case, ids):
    reference = reference_model(**CASES[case])
    inputs = random_inputs(guidance=CASES[case]["guidance"], ids=ids)
    ours, ref = run_mlx(mlx_model(reference), inputs), run_reference(reference, inputs)
    err = max_rel_err(ours, ref)
    print(f"flux {case} ({ids} ids): max_rel_err {err:.2e}")
    assert ours.shape == (2, 6, 4 * LATENT_CHANNELS)
    assert err <= TOLERANCE


def test_flux_transformer_larger_latent_matches_diffusers():
    reference = reference_model(guidance=True)
    inputs = random_inputs(h=24, w=32, seed=1)  # 12 x 16 = 192 image tokens
    err = max_rel_err(run_mlx(mlx_model(reference), inputs), run_reference(reference, inputs))
    print(f"flux dev 24x32 latent: max_rel_err {err:.2e}")
    assert err <= TOLERANCE


def test_schnell_ignores_guidance_and_broadcasts_scalar_timestep():
    reference = reference_model(guidance=False)
    model = mlx_model(reference)
    inputs = random_inputs(guidance=False)
    inputs["timestep"] = torch.tensor([0.75, 0.75])
    base = run_mlx(model, inputs)
    assert max_rel_err(run_mlx(model, dict(inputs, guidance=torch.tensor([3.5, 3.5]))), base) == 0.0
    scalar = model(*(mx.array(inputs[k].numpy()) for k in ("hidden_states", "encoder_hidden_states",
                                                             "pooled_projections")),
                   0.75, mx.array(inputs["img_ids"].numpy()), mx.array(inputs["txt_ids"].numpy()))
    assert max_rel_err(scalar, base) == 0.0


def test_dev_requires_guidance():
    model = mlx_model(reference_model(guidance=True))
    with pytest.raises(ValueError, match="guidance"):
        run_mlx(model, random_inputs(guidance=False))


@pytest.mark.parametrize("dtype, tolerance", [(mx.float16, 1e-2), (mx.bfloat16, 5e-2)])
def test_half_precision_weights_stay_close(dtype, tolerance):
    reference = reference_model(guidance=True)
    model = mlx_model(reference)
    model.set_dtype(dtype)
    inputs = random_inputs(guidance=True)
    ours = run_mlx(model, inputs, dtype)
    assert ours.dtype == dtype
    assert bool(mx.isfinite(ours).all())
    err = max_rel_err(ours.astype(mx.float32), run_reference(reference, inputs))
    print(f"flux dev {dtype}: max_rel_err {err:.2e}")
    assert err <= tolerance


def test_quantized_model_runs_and_stays_close():
    reference = reference_model(guidance=True)
    model = mlx_model(reference)
    nn.quantize(model, 32, 8, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0)
    assert isinstance(model.single_transformer_blocks[0].proj_out, nn.QuantizedLinear)
    assert isinstance(model.transformer_blocks[0].attn.to_q, nn.QuantizedLinear)
    inputs = random_inputs(guidance=True)
    err = max_rel_err(run_mlx(model, inputs), run_reference(reference, inputs))
    print(f"flux dev 8-bit (group 32): max_rel_err {err:.2e}")
    assert err <= 3e-2


# --- packing and ids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w", [(6, 4), (4, 10), (2, 2)])
def test_pack_unpack_and_ids_match_the_pipeline(h, w):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    nchw = torch.randn(2, LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(0))
    x = mx.array(nchw.numpy().transpose(0, 2, 3, 1))
    packed = pack_latents(x)
    ref_packed = FluxPipeline._pack_latents(nchw, 2, LATENT_CHANNELS, h, w)
    np.testing.assert_array_equal(np.array(packed), ref_packed.numpy())
    # The pipeline unpacks from the image size (8 pixels per latent).
    ref_unpacked = FluxPipeline._unpack_latents(torch.from_numpy(np.array(packed)), 8 * h, 8 * w, 8)
    np.testing.assert_array_equal(np.array(unpack_latents(packed, h, w)), ref_unpacked.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.array(unpack_latents(packed, h, w)), np.array(x))
    ids = latent_image_ids(h, w)
    assert ids.dtype == mx.float32
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    np.testing.assert_array_equal(np.array(ids), ref_ids.numpy())


def test_odd_latent_sizes_are_refused():
    with pytest.raises(ValueError, match="even"):
        pack_latents(mx.zeros((1, 5, 4, LATENT_CHANNELS)))
    with pytest.raises(ValueError, match="even"):
        latent_image_ids(4, 3)


def test_config_from_diffusers_json():
    config = FluxTransformerConfig.from_dict({
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
        "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "out_channels": None,
        "patch_size": 1, "pooled_projection_dim": 768,
    })
    assert config == FluxTransformerConfig(guidance_embeds=True)
