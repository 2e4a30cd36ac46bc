"""Real-size SD3.5 parity: our MLX MMDiT against diffusers' SD3Transformer2DModel at the released widths.

The tiny SD3 tests (test_sd3_transformer.py, test_sd3_files.py) check the wiring at widths of 32; these check
what only shows at SD3.5's own sizes: SD3.5-medium's 24 heads of 64 (1536 wide) with MMDiT-X dual attention
and its 384x384 position table, SD3.5-large's 38 heads (2432 wide) and 192x192 table, both with RMS qk-norm,
4096-wide T5 context and 2048-wide pooled CLIP features. Random weights, float32, nothing downloaded. The
blocks keep their widths but not their depth (medium: two dual-attention blocks and the context_pre_only
last block; large: one block and the last): every block is the same code, and depth only compounds float32
rounding.

The weights take a single file's way: diffusers' state dict in Stability's original layout
(tests/sd3_layout.py), its config inferred from those shapes and its weights mapped back by
`engine.families.sd3.single_file`, then into ours by `engine.families.sd3.mapping`, so the single-file reader is
checked at the released widths too (the swapped halves of the 2 x 2432 modulations, the fused 3 x 2432 projections).

Marked `realsize` (excluded from the default run):

    ./run-tests -m realsize tests/test_sd3_realsize.py -s

Each test prints its max_rel_err and the forward times of torch and ours (one cold call each).
"""

from __future__ import annotations

import json
import time

import mlx.core as mx
import pytest
import torch

from mlx_sd_server.engine.families.sd3.mapping import map_sd3_transformer_weight as map_to_mlx
from mlx_sd_server.engine.families.sd3.single_file import (
    map_sd3_transformer_weight as map_from_file, sd3_transformer_config,
)
from parity import max_rel_err, nchw_to_nhwc
from sd3_layout import sd3_state

pytestmark = pytest.mark.realsize

TOLERANCE = 1e-4
# The released transformer config.json files (stabilityai/stable-diffusion-3.5-medium and -large).
SD35 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")
RELEASED = {
    "medium": {**SD35, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
               "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13))},
    "large": {**SD35, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "pos_embed_max_size": 192, "dual_attention_layers": ()},
}
TEXT_TOKENS = 77 + 256  # both CLIPs' 77 (side by side), then T5's 256, as the SD3 pipelines encode
SIGMA = 0.7317


def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def reference_model(release: str, num_layers: int, seed: int = 0):
    """diffusers' SD3Transformer2DModel at the release's widths with `num_layers` blocks (those of them that
    have dual attention in the release keep it). Weights N(0, 1/fan_in), so the modulations' shifts, scales
    and gates are O(1) and every block changes the streams (diffusers' init makes them ~0.1); RMS norm
    scales U(0.5, 1.5); biases N(0, 0.1). The position table is diffusers' own sin-cos buffer."""
    from diffusers import SD3Transformer2DModel

    config = RELEASED[release]
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**config, "num_layers": num_layers, "dual_attention_layers": tuple(
        i for i in config["dual_attention_layers"] if i < num_layers)}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, (param.numel() // param.shape[0]) ** -0.5)
            elif ".norm_" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.1)
    return model


def mlx_model_from_file_layout(reference):
    """Ours, built as a converted sd3.5_*.safetensors would be: config from the original layout's shapes,
    weights through both mappings."""
    from mlx_sd_server.engine.families.sd3.transformer import SD3Transformer2DModel, SD3TransformerConfig

    original = {k: v.detach().numpy() for k, v in sd3_state(reference.state_dict()).items()}
    config = sd3_transformer_config(original)
    expected = json.loads(reference.to_json_string())
    assert {k: config[k] for k in expected if k in config and k != "sample_size"} == {
        k: expected[k] for k in expected if k in config and k != "sample_size"}
    hidden_size = config["num_attention_heads"] * config["attention_head_dim"]
    model = SD3Transformer2DModel(SD3TransformerConfig.from_dict(config))
    model.load_weights([(key, mx.array(value)) for name in list(original)
                        for k, v in map_from_file(name, original.pop(name), hidden_size)
                        for key, value in map_to_mlx(k, v)])
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("release,num_layers", [("medium", 3), ("large", 2)])
def test_sd35_transformer_released_widths_match_diffusers(release, num_layers):
    """A 512x512 image (64x64 latent: 1024 patches) with 333 text tokens, in float32."""
    reference = reference_model(release, num_layers)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 4096, generator=g),
        "pooled_projections": torch.randn(1, 2048, generator=g),
    }
    with torch.no_grad():  # diffusers takes the timestep as sigma * 1000
        expected, torch_s = timed(lambda: reference(**inputs, timestep=torch.tensor([SIGMA * 1000]),
                                                    return_dict=False)[0])
    model = mlx_model_from_file_layout(reference)
    reference = None  # let its float32 weights go before ours run

    def run_ours():
        out = model(mx.array(nchw_to_nhwc(inputs["hidden_states"])), mx.array(inputs["encoder_hidden_states"].numpy()),
                    mx.array(inputs["pooled_projections"].numpy()), mx.array([SIGMA]))
        mx.eval(out)
        return out

    ours, mlx_s = timed(run_ours)
    err = max_rel_err(ours, nchw_to_nhwc(expected))
    width = RELEASED[release]["caption_projection_dim"]
    print(f"\nsd3.5-{release} transformer ({width} wide, {num_layers} blocks, 1024 image + {TEXT_TOKENS} text "
          f"tokens): max_rel_err {err:.2e} (torch {torch_s:.1f} s, mlx {mlx_s:.1f} s, mlx/torch {mlx_s / torch_s:.2f})")
    assert err <= TOLERANCE
