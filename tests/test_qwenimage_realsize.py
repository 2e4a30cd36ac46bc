"""Real-size Qwen-Image parity: our MLX networks against diffusers/transformers at the released widths.

The tiny tests check the wiring at widths of 64; this checks what only shows at Qwen-Image's own sizes: the
transformer's 24 heads of 128 (3072 wide) with RoPE axes (16, 56, 56), 3584-wide text states and 12288-wide
feed-forwards, with a reference image as an edit model reads it (a second frame of img_shapes, zero_cond_t as
2511's); Qwen2.5-VL-7B's language model (3584 wide, 28 heads, 4 key/value heads, mRoPE sections 16/24/24).
Random weights, float32, nothing downloaded. Widths are kept, depth is not (one block, one layer): every block
is the same code, and depth only compounds float32 rounding.

Marked `realsize` (excluded from the default run):

    ./run-tests -m realsize tests/test_qwenimage_realsize.py -s
"""

from __future__ import annotations

import resource

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd_server.engine.families.qwenimage.transformer import (
    QwenImageTransformer2DModel,
    QwenImageTransformerConfig,
    map_qwenimage_transformer_weight,
)
from mlx_sd_server.engine.text.qwen25vl import Qwen25VLConfig, Qwen25VLTextModel, map_qwen25vl_weight
from parity import load_torch_weights, max_rel_err

pytestmark = pytest.mark.realsize

TOLERANCE = 1e-4
# Qwen/Qwen-Image transformer/config.json (bookkeeping keys dropped); depth 60 there
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """N(0, 1/fan_in) matrices (outputs O(1) at any width), norm scales around 1, small biases."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, param.shape[1] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.1)
    return model.eval()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_qwenimage_transformer_released_widths_match_diffusers(zero_cond_t):
    """A 512x512 target (16x16 packed tokens) and a 384x256 reference image (12x8) read as an edit model reads it,
    77 text tokens of which 70 real, batch 2 at different sigmas."""
    from diffusers import QwenImageTransformer2DModel as Reference

    torch.manual_seed(0)
    reference = randomized(Reference(**QWEN_IMAGE, zero_cond_t=zero_cond_t))
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 16, 16), (1, 12, 8)]
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, 70:] = 0
    inputs = {
        "hidden_states": torch.randn(2, 256 + 96, 64, generator=g),
        "encoder_hidden_states": torch.randn(2, 77, 3584, generator=g),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([1.0, 0.3217]),
        "img_shapes": [shapes, shapes],
    }
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0].numpy()
    model = QwenImageTransformer2DModel(QwenImageTransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_qwenimage_transformer_weight)
    del reference
    ours = model(mx.array(inputs["hidden_states"].numpy()), mx.array(inputs["encoder_hidden_states"].numpy()),
                 mx.array(mask.numpy()), mx.array(inputs["timestep"].numpy()), [shapes, shapes])
    err = max_rel_err(ours, expected)
    print(f"\nQwen-Image transformer at released widths (1 block, zero_cond_t {zero_cond_t}): max_rel_err {err:.2e} "
          f"(peak RSS {peak_rss_gb():.1f} GB)")
    assert err <= TOLERANCE


def test_qwen25vl_7b_language_model_widths_match_transformers():
    """One layer of Qwen2.5-VL-7B's language model (a reduced vocabulary: the embedding is a lookup) on a padded
    batch of two prompts, the last hidden state."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=4096, hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=64, num_heads=2,
                                                                   intermediate_size=64, out_hidden_size=3584))
    torch.manual_seed(0)
    reference = randomized(Qwen2_5_VLForConditionalGeneration(config))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 4096, (2, 96), generator=g)
    mask = torch.ones(2, 96, dtype=torch.long)
    mask[0, 80:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].numpy()
    model = Qwen25VLTextModel(Qwen25VLConfig.from_dict(config.to_dict()))
    state = {k: v for k, v in reference.state_dict().items() if "visual" not in k}
    load_torch_weights(model, state, map_qwen25vl_weight)
    ours = np.array(model(mx.array(ids.numpy()), attention_mask=mx.array(mask.numpy())))
    err = max(max_rel_err(ours[0, :80], expected[0, :80]), max_rel_err(ours[1], expected[1]))
    print(f"\nQwen2.5-VL-7B language model widths (1 layer): max_rel_err {err:.2e} (peak RSS {peak_rss_gb():.1f} GB)")
    assert err <= TOLERANCE
