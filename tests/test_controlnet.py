"""MLX ControlNet against diffusers' ControlNetModel on tiny random-weight models (float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_diffusers
from mlx_sd_server.engine.families.sd.mapping import map_controlnet_weight
from mlx_sd_server.engine.families.sd.controlnet import ControlNetConfig, ControlNetModel
from parity import load_torch_weights, max_rel_err, nchw_to_nhwc
from test_unet import TOLERANCE, mlx_unet, random_inputs, run_mlx, run_reference

CONDITIONING_SCALE = 0.8


def mlx_controlnet(reference) -> ControlNetModel:
    model = ControlNetModel(ControlNetConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_controlnet_weight)
    return model


def to_mlx(x: torch.Tensor) -> mx.array:
    return mx.array(nchw_to_nhwc(x).astype(np.float32))


def control_image(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    batch, _, height, width = inputs["sample"].shape
    return torch.rand(batch, 3, 8 * height, 8 * width, generator=torch.Generator().manual_seed(2))


def run_reference_controlnet(reference, inputs, image, scale: float):
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    with torch.no_grad():
        return reference(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], image,
            conditioning_scale=scale, added_cond_kwargs=added or None, return_dict=False,
        )


def run_mlx_controlnet(model, inputs, image, scale: float):
    optional = {k: mx.array(inputs[k].numpy()) for k in ("text_embeds", "time_ids") if k in inputs}
    down, mid = model(
        to_mlx(inputs["sample"]), mx.array(inputs["timestep"].numpy()),
        mx.array(inputs["encoder_hidden_states"].numpy()), to_mlx(image),
        conditioning_scale=scale, **optional,
    )
    mx.eval(down, mid)
    return down, mid


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def models(request):
    unet = tiny_diffusers.unet(request.param)
    return request.param, unet, tiny_diffusers.controlnet(unet)


def test_controlnet_residuals_match_diffusers(models):
    family, unet, reference = models
    inputs = random_inputs(unet)
    image = control_image(inputs)
    ref_down, ref_mid = run_reference_controlnet(reference, inputs, image, CONDITIONING_SCALE)
    down, mid = run_mlx_controlnet(mlx_controlnet(reference), inputs, image, CONDITIONING_SCALE)
    assert len(down) == len(ref_down)
    errors = [max_rel_err(ours, nchw_to_nhwc(ref)) for ours, ref in zip(down + [mid], list(ref_down) + [ref_mid])]
    print(f"controlnet {family}: max_rel_err per residual {', '.join(f'{e:.1e}' for e in errors)}")
    assert max(errors) <= TOLERANCE


def test_unet_with_controlnet_matches_diffusers(models):
    family, unet, reference = models
    inputs = random_inputs(unet)
    image = control_image(inputs)
    ref_down, ref_mid = run_reference_controlnet(reference, inputs, image, CONDITIONING_SCALE)
    ref = run_reference(unet, inputs, down_block_additional_residuals=ref_down, mid_block_additional_residual=ref_mid)
    down, mid = run_mlx_controlnet(mlx_controlnet(reference), inputs, image, CONDITIONING_SCALE)
    ours = run_mlx(mlx_unet(unet), inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    without_control = run_reference(unet, inputs)
    err = max_rel_err(ours, nchw_to_nhwc(ref))
    print(f"unet+controlnet {family}: max_rel_err {err:.2e} "
          f"(the control changes the output by {max_rel_err(ref, without_control):.2e})")
    assert err <= TOLERANCE


def test_zero_conditioning_scale_gives_zero_residuals(models):
    _, unet, reference = models
    inputs = random_inputs(unet)
    down, mid = run_mlx_controlnet(mlx_controlnet(reference), inputs, control_image(inputs), 0.0)
    assert all(not mx.any(r).item() for r in down + [mid])


@pytest.mark.parametrize(
    "option", [{"controlnet_conditioning_channel_order": "bgr"}, {"global_pool_conditions": True}]
)
def test_controlnet_config_options_match_diffusers(option):
    unet = tiny_diffusers.unet("sd1")
    reference = tiny_diffusers.controlnet(unet)
    reference.register_to_config(**option)
    inputs = random_inputs(unet)
    image = control_image(inputs)
    ref_down, ref_mid = run_reference_controlnet(reference, inputs, image, CONDITIONING_SCALE)
    down, mid = run_mlx_controlnet(mlx_controlnet(reference), inputs, image, CONDITIONING_SCALE)
    err = max(max_rel_err(ours, nchw_to_nhwc(ref)) for ours, ref in zip(down + [mid], list(ref_down) + [ref_mid]))
    print(f"controlnet sd1 {option}: max_rel_err {err:.2e}")
    assert err <= TOLERANCE
