"""MLX SD3/SD3.5 transformer against diffusers' SD3Transformer2DModel on tiny random-weight models.

Measured max rel err (float32, 8x10 latents): sd3 7.8e-5, sd35-medium 3.3e-5, sd35-large 3.4e-5, dual attention
in the context_pre_only block 2.3e-5; 16x24, 24x24 and 2x4 latents 3e-5 to 5e-5. Nearly all of it is the
timestep's sinusoids: MLX's float32 exp puts 91 of the 128 frequencies one ulp from torch's (a table computed
in float64 and rounded: 3 of 128), which at t = 1000 moves the angles by ~6e-5. Given diffusers' own time
embedding, our blocks agree to <= 7e-7.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import tiny_sd3
from mlx_sd_server.engine.families.sd3.mapping import map_sd3_transformer_weight
from mlx_sd_server.engine.ops.layers import QuantizedLinear
from mlx_sd_server.engine.families.sd3.transformer import SD3Transformer2DModel, SD3TransformerConfig
from parity import load_torch_weights, max_rel_err, nchw_to_nhwc

TOLERANCE = 1e-4
TEXT_LENGTH = 7
SIGMAS = np.array([1.0, 0.3217], np.float32)  # batch 2 at different sigmas (those of the FLUX test)


def mlx_model(reference) -> SD3Transformer2DModel:
    model = SD3Transformer2DModel(SD3TransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_sd3_transformer_weight)
    return model


def random_inputs(h: int = 8, w: int = 10, seed: int = 0) -> dict:
    """NCHW latents (diffusers' layout) of h x w, text states and pooled text for a batch of 2."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 16, h, w, generator=g),
        "encoder_hidden_states": torch.randn(2, TEXT_LENGTH, tiny_sd3.T5_WIDTH, generator=g),
        "pooled_projections": torch.randn(2, 64, generator=g),
    }


def run_reference(reference, inputs: dict) -> np.ndarray:
    """diffusers takes the timestep sigma * 1000, as its scheduler gives it (in float32)."""
    with torch.no_grad():
        out = reference(**inputs, timestep=torch.from_numpy(SIGMAS) * 1000, return_dict=False)[0]
    return nchw_to_nhwc(out)


def run_mlx(model: SD3Transformer2DModel, inputs: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
    out = model(mx.array(nchw_to_nhwc(inputs["hidden_states"])).astype(dtype),
                mx.array(inputs["encoder_hidden_states"].numpy()).astype(dtype),
                mx.array(inputs["pooled_projections"].numpy()).astype(dtype), mx.array(SIGMAS))
    mx.eval(out)
    return out


@pytest.mark.parametrize("variant, num_layers", [("sd3", 3), ("sd35-medium", 3), ("sd35-large", 3),
                                                 ("sd35-medium", 2)])  # 2: attn2 in the context_pre_only block
def test_sd3_transformer_matches_diffusers(variant, num_layers):
    reference = tiny_sd3.transformer(variant, num_layers=num_layers)
    inputs = random_inputs()
    ours = run_mlx(mlx_model(reference), inputs)
    err = max_rel_err(ours, run_reference(reference, inputs))
    print(f"sd3 transformer {variant}, {num_layers} blocks: max_rel_err {err:.2e}")
    assert ours.shape == (2, 8, 10, 16)
    assert err <= TOLERANCE


@pytest.mark.parametrize("h, w", [(16, 24), (24, 24), (2, 4)])  # 24x24: the whole 12x12 position table
def test_other_latent_sizes_match_diffusers(h, w):
    reference = tiny_sd3.transformer("sd35-medium")
    inputs = random_inputs(h, w, seed=1)
    err = max_rel_err(run_mlx(mlx_model(reference), inputs), run_reference(reference, inputs))
    print(f"sd3 transformer {h}x{w} latent: max_rel_err {err:.2e}")
    assert err <= TOLERANCE


def test_latents_beyond_the_position_table_or_patches_are_refused():
    model = mlx_model(tiny_sd3.transformer("sd3"))
    context, pooled = mx.zeros((1, TEXT_LENGTH, tiny_sd3.T5_WIDTH)), mx.zeros((1, 64))
    with pytest.raises(ValueError, match="position embeddings"):
        model(mx.zeros((1, 8, 26, 16)), context, pooled, 0.5)  # 13 patches wide, the table has 12
    with pytest.raises(ValueError, match="patch size"):
        model(mx.zeros((1, 8, 9, 16)), context, pooled, 0.5)


@pytest.mark.parametrize("dtype, tolerance", [(mx.float16, 1e-2), (mx.bfloat16, 5e-2)])
def test_half_precision_weights_stay_close(dtype, tolerance):
    reference = tiny_sd3.transformer("sd35-medium")
    model = mlx_model(reference)
    model.set_dtype(dtype)
    inputs = random_inputs()
    ours = run_mlx(model, inputs, dtype)
    assert ours.dtype == dtype and bool(mx.isfinite(ours).all())
    err = max_rel_err(ours.astype(mx.float32), run_reference(reference, inputs))
    print(f"sd3 transformer {dtype}: max_rel_err {err:.2e}")
    assert err <= tolerance


def test_quantized_model_runs_and_stays_close():
    reference = tiny_sd3.transformer("sd35-medium")
    model = mlx_model(reference)
    nn.quantize(model, 32, 8, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0)
    block = model.transformer_blocks[0]
    layers = (block.attn.to_q, block.attn2.to_out[0], block.norm1.linear)
    assert all(isinstance(layer, QuantizedLinear) for layer in layers)
    inputs = random_inputs()
    err = max_rel_err(run_mlx(model, inputs), run_reference(reference, inputs))
    print(f"sd3 transformer 8-bit (group 32): max_rel_err {err:.2e}")
    assert err <= 3e-2


def test_config_from_diffusers_json():
    """SD3.5-large's transformer/config.json."""
    config = SD3TransformerConfig.from_dict({
        "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0.dev0", "attention_head_dim": 64,
        "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38,
        "num_layers": 38, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128,
    })
    assert config == SD3TransformerConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                          pos_embed_max_size=192, qk_norm="rms_norm")
    medium = SD3TransformerConfig.from_dict({"dual_attention_layers": [0, 1, 2], "qk_norm": "rms_norm"})
    assert medium.dual_attention_layers == (0, 1, 2)


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="qk_norm"):
        SD3Transformer2DModel(SD3TransformerConfig(qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="caption_projection_dim"):
        SD3Transformer2DModel(SD3TransformerConfig(caption_projection_dim=1536))
