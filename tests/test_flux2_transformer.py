"""MLX FLUX.2 transformer against diffusers' Flux2Transformer2DModel on tiny random-weight models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_diffusers
from mlx_sd_server.engine.families.flux2.mapping import map_flux2_transformer_weight
from mlx_sd_server.engine.families.flux2.transformer import (
    Flux2Transformer2DModel,
    Flux2TransformerConfig,
    image_ids,
    text_ids,
)
from parity import load_torch_weights, max_rel_err

TOLERANCE = 1e-4
CHANNELS = 128  # 32 latent channels in 2x2 patches
TEXT_DIM = 24  # 3 stacked text-encoder layers of 8


def tiny_config(guidance: bool, num_layers: int, num_single_layers: int) -> dict:
    return dict(
        patch_size=1, in_channels=CHANNELS, out_channels=None, num_layers=num_layers,
        num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000, eps=1e-6, guidance_embeds=guidance,
    )


def reference_model(guidance: bool, num_layers: int = 1, num_single_layers: int = 2, seed: int = 0):
    from diffusers import Flux2Transformer2DModel as Reference

    torch.manual_seed(seed)
    model = Reference(**tiny_config(guidance, num_layers, num_single_layers)).eval()
    tiny_diffusers._randomize_zero_init(model)
    with torch.no_grad():  # the RMSNorm scales start at 1: make them matter
        for name, param in model.named_parameters():
            if ".norm_" in name:
                param.uniform_(0.5, 1.5)
    return model


def mlx_model(reference) -> Flux2Transformer2DModel:
    model = Flux2Transformer2DModel(Flux2TransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_flux2_transformer_weight)
    return model


def pipeline_ids(h: int, w: int, text_length: int, references: tuple[tuple[int, int], ...] = ()):
    """Image (+ reference) and text ids as Flux2KleinPipeline makes them, for an h x w token grid."""
    from diffusers import Flux2KleinPipeline as P

    img = P._prepare_latent_ids(torch.zeros(1, CHANNELS, h, w))[0]
    if references:
        refs = P._prepare_image_ids([torch.zeros(1, CHANNELS, rh, rw) for rh, rw in references])[0]
        img = torch.cat([img, refs], dim=0)
    return img.float(), P._prepare_text_ids(torch.zeros(1, text_length, TEXT_DIM))[0].float()


def random_inputs(
    h: int = 3, w: int = 2, text_length: int = 5, guidance: bool = False, references=(), seed: int = 0
) -> dict:
    """Batch 2 with different sigmas (and guidance scales); an h x w token grid (a 2h x 2w latent)."""
    g = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = pipeline_ids(h, w, text_length, references)
    return {
        "hidden_states": torch.randn(2, img_ids.shape[0], CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(2, text_length, TEXT_DIM, generator=g),
        "timestep": torch.tensor([1.0, 0.3217]),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": torch.tensor([4.0, 2.5]) if guidance else None,
    }


def run_reference(reference, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return reference(**inputs, return_dict=False)[0]


def run_mlx(model: Flux2Transformer2DModel, inputs: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
    def to_mx(t: torch.Tensor | None) -> mx.array | None:
        return None if t is None else mx.array(t.numpy())

    out = model(
        to_mx(inputs["hidden_states"]).astype(dtype), to_mx(inputs["encoder_hidden_states"]).astype(dtype),
        to_mx(inputs["timestep"]), to_mx(inputs["img_ids"]), to_mx(inputs["txt_ids"]), to_mx(inputs["guidance"]),
    )
    mx.eval(out)
    return out


CASES = {  # klein: no guidance embedding; dev: guidance-distilled
    "klein": dict(guidance=False, num_layers=2, num_single_layers=1),
    "dev": dict(guidance=True, num_layers=1, num_single_layers=2),
}
INPUTS = {
    "3x2": dict(),
    "4x5 long text": dict(h=4, w=5, text_length=512, seed=1),  # the pipeline's padded text: ids up to 511
    "references": dict(h=2, w=3, references=((2, 2), (1, 3)), seed=2),  # t = 10 and 20
}


@pytest.mark.parametrize("inputs_case", INPUTS)
@pytest.mark.parametrize("case", CASES)
def test_flux2_transformer_matches_diffusers(case, inputs_case):
    reference = reference_model(**CASES[case])
    inputs = random_inputs(guidance=CASES[case]["guidance"], **INPUTS[inputs_case])
    ours, ref = run_mlx(mlx_model(reference), inputs), run_reference(reference, inputs)
    err = max_rel_err(ours, ref)
    print(f"flux2 {case} ({inputs_case}): max_rel_err {err:.2e}")
    assert ours.shape == inputs["hidden_states"].shape
    assert err <= TOLERANCE


def test_reference_tokens_are_read_not_predicted():
    """`generated`: the velocity of the noisy tokens alone, as the pipelines slice diffusers' output."""
    reference = reference_model(**CASES["klein"])
    model = mlx_model(reference)
    inputs = random_inputs(**INPUTS["references"])
    generated = 2 * 3  # the 2x3 grid being denoised; 2x2 + 1x3 reference tokens after it
    ours = model(*(mx.array(inputs[k].numpy()) for k in ("hidden_states", "encoder_hidden_states", "timestep",
                                                        "img_ids", "txt_ids")), generated=generated)
    err = max_rel_err(ours, run_reference(reference, inputs)[:, :generated])
    print(f"flux2 klein with reference tokens, noisy tokens' velocity: max_rel_err {err:.2e}")
    assert ours.shape == (2, generated, CHANNELS)
    assert err <= TOLERANCE


def test_klein_ignores_guidance_and_broadcasts_scalar_timestep():
    model = mlx_model(reference_model(**CASES["klein"]))
    inputs = random_inputs()
    inputs["timestep"] = torch.tensor([0.75, 0.75])
    base = run_mlx(model, inputs)
    assert max_rel_err(run_mlx(model, dict(inputs, guidance=torch.tensor([3.5, 3.5]))), base) == 0.0
    scalar = model(*(mx.array(inputs[k].numpy()) for k in ("hidden_states", "encoder_hidden_states")), 0.75,
                   mx.array(inputs["img_ids"].numpy()), mx.array(inputs["txt_ids"].numpy()))
    assert max_rel_err(scalar, base) == 0.0


def test_guidance_model_requires_guidance():
    model = mlx_model(reference_model(**CASES["dev"]))
    with pytest.raises(ValueError, match="guidance"):
        run_mlx(model, random_inputs(guidance=False))


@pytest.mark.parametrize("dtype, tolerance", [(mx.float16, 1e-2), (mx.bfloat16, 5e-2)])
def test_half_precision_weights_stay_close(dtype, tolerance):
    reference = reference_model(**CASES["klein"])
    model = mlx_model(reference)
    model.set_dtype(dtype)
    inputs = random_inputs()
    ours = run_mlx(model, inputs, dtype)
    assert ours.dtype == dtype
    err = max_rel_err(ours.astype(mx.float32), run_reference(reference, inputs))
    print(f"flux2 klein {dtype}: max_rel_err {err:.2e}")
    assert err <= tolerance


@pytest.mark.parametrize("h, w, references", [(3, 2, ()), (2, 4, ((2, 2), (3, 1)))])
def test_ids_match_the_pipeline(h, w, references):
    ref_img, ref_txt = pipeline_ids(h, w, 7, references)
    ours = [image_ids(h, w)] + [image_ids(rh, rw, t=10 * (i + 1)) for i, (rh, rw) in enumerate(references)]
    np.testing.assert_array_equal(np.array(mx.concatenate(ours, axis=0)), ref_img.numpy())
    np.testing.assert_array_equal(np.array(text_ids(7)), ref_txt.numpy())
    assert image_ids(h, w).dtype == text_ids(7).dtype == mx.float32


def test_config_from_diffusers_json():
    # klein 4B's transformer config, as diffusers' scripts/convert_flux2_to_diffusers.py writes it
    klein_4b = {
        "_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": False, "in_channels": 128,
        "joint_attention_dim": 7680, "mlp_ratio": 3.0, "num_attention_heads": 24, "num_layers": 5,
        "num_single_layers": 20, "out_channels": None, "patch_size": 1, "rope_theta": 2000,
        "timestep_guidance_channels": 256,
    }
    config = Flux2TransformerConfig.from_dict(klein_4b)
    assert config == Flux2TransformerConfig(
        num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
    )
