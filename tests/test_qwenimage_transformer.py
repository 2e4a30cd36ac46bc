"""MLX Qwen-Image transformer against diffusers' QwenImageTransformer2DModel on tiny random-weight models."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import tiny_qwenimage
import torch
from mlx.utils import tree_flatten
from parity import load_torch_weights, max_rel_err

from mlx_sd_server.engine.families.qwenimage.transformer import (
    QwenImageTransformer2DModel,
    QwenImageTransformerConfig,
    map_qwenimage_transformer_weight,
    rope_cos_sin,
    rope_positions,
)
from mlx_sd_server.engine.ops.layers import QuantizedLinear

TOLERANCE = 1e-4
TOKEN_CHANNELS = tiny_qwenimage.LATENT_CHANNELS * tiny_qwenimage.PATCH**2
TEXT_DIM = tiny_qwenimage.TEXT_DIM

TARGET = (1, 4, 6)
REFERENCES = [(1, 5, 3), (1, 3, 7)]  # odd sizes: the centred positions' uneven halves


def mlx_model(reference) -> QwenImageTransformer2DModel:
    model = QwenImageTransformer2DModel(QwenImageTransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_qwenimage_transformer_weight)
    return model


def random_inputs(shapes: list, lengths: list[int], timesteps: list[float], masked: bool, seed: int = 0) -> dict:
    """Tokens for `shapes` per item, text states padded to the longest of `lengths` (the padding random, so that
    an unmasked pad would show), a mask if `masked`, per-item timesteps."""
    g = torch.Generator().manual_seed(seed)
    batch, longest = len(lengths), max(lengths)
    tokens = sum(f * h * w for f, h, w in shapes)
    mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths], dtype=torch.long) if masked else None
    return {
        "hidden_states": torch.randn(batch, tokens, TOKEN_CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(batch, longest, TEXT_DIM, generator=g),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor(timesteps),
        "img_shapes": [list(shapes)] * batch,
    }


def run_reference(reference, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return reference(**inputs, return_dict=False)[0].numpy()


def run_mlx(model: QwenImageTransformer2DModel, inputs: dict, dtype: mx.Dtype = mx.float32) -> mx.array:
    mask = inputs["encoder_hidden_states_mask"]
    out = model(
        mx.array(inputs["hidden_states"].numpy()).astype(dtype),
        mx.array(inputs["encoder_hidden_states"].numpy()).astype(dtype),
        None if mask is None else mx.array(mask.numpy()),
        mx.array(inputs["timestep"].numpy()),
        inputs["img_shapes"],
    )
    mx.eval(out)
    return out


CASES = {
    # (model sizes, img_shapes of each item, text lengths, timesteps, masked)
    "txt2img": (dict(), [TARGET], [7], [0.875], False),
    "txt2img-odd-grid-masked": (dict(), [(1, 5, 7)], [5], [0.4], True),
    "batch2-uneven-text-mask": (dict(num_layers=3), [TARGET], [7, 3], [0.875, 0.3], True),
    "edit-2-references": (dict(), [TARGET, *REFERENCES], [9, 4], [0.6, 0.6], True),
    "edit-zero-cond-t": (dict(zero_cond_t=True), [TARGET, *REFERENCES], [9, 4], [0.875, 0.3], True),
    "txt2img-zero-cond-t": (dict(zero_cond_t=True), [TARGET], [6], [0.7], False),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers(case):
    sizes, shapes, lengths, timesteps, masked = CASES[case]
    reference = tiny_qwenimage.transformer(**sizes)
    inputs = random_inputs(shapes, lengths, timesteps, masked)
    ours, ref = run_mlx(mlx_model(reference), inputs), run_reference(reference, inputs)
    err = max_rel_err(ours, ref)
    print(f"qwenimage transformer {case}: max_rel_err {err:.2e}")
    assert ours.shape == ref.shape == inputs["hidden_states"].shape  # every image token: 64 = 2*2*16 channels
    assert err <= TOLERANCE


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_masked_items_match_their_unpadded_single_runs(zero_cond_t):
    """Masked text padding changes nothing: each item of a padded batch is what it is alone, unpadded."""
    model = mlx_model(tiny_qwenimage.transformer(zero_cond_t=zero_cond_t))
    inputs = random_inputs([TARGET, REFERENCES[0]], [9, 4], [0.875, 0.3], masked=True)
    batched = run_mlx(model, inputs)
    for i, n in enumerate([9, 4]):
        alone = dict(
            inputs,
            hidden_states=inputs["hidden_states"][i : i + 1],
            encoder_hidden_states=inputs["encoder_hidden_states"][i : i + 1, :n],
            encoder_hidden_states_mask=None,
            timestep=inputs["timestep"][i : i + 1],
            img_shapes=inputs["img_shapes"][:1],
        )
        assert max_rel_err(batched[i : i + 1], run_mlx(model, alone)) <= 1e-5
    unmasked = run_mlx(model, dict(inputs, encoder_hidden_states_mask=None))
    assert max_rel_err(unmasked[1], batched[1]) > 1e-3  # the second item's 5 pad tokens: seen without the mask
    scalar = model(mx.array(inputs["hidden_states"].numpy()), mx.array(inputs["encoder_hidden_states"].numpy()),
                   mx.array(inputs["encoder_hidden_states_mask"].numpy()).astype(mx.bool_), 0.875,
                   inputs["img_shapes"])  # fmt: skip
    assert max_rel_err(scalar[0], batched[0]) == 0.0  # a scalar timestep is every item's; a bool mask as 0/1


def test_zero_cond_t_modulates_only_the_references_at_zero():
    """The target's modulation is the timestep's either way; the references' differ (t = 0 with zero_cond_t)."""
    reference = tiny_qwenimage.transformer(zero_cond_t=True)
    inputs = random_inputs([TARGET, *REFERENCES], [9], [0.875], masked=False)
    zero = run_mlx(mlx_model(reference), inputs)
    reference.register_to_config(zero_cond_t=False)
    plain = run_mlx(mlx_model(reference), inputs)
    assert max_rel_err(zero, plain) > 1e-2


def test_rope_tables_match_diffusers_at_released_sizes():
    """Positions and angles of diffusers' QwenEmbedRope (axes 16, 56, 56) for a 1328x1328 target, two references
    and a long prompt: our cos and sin are its complex table's parts."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    shapes, text = [(1, 83, 83), (1, 64, 48), (1, 37, 90)], 600
    vid, txt = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)(
        [shapes], max_txt_seq_len=text, device=torch.device("cpu")
    )
    text_pos, image_pos = rope_positions(shapes, text)
    assert text_pos[0].tolist() == [45, 45, 45]  # max(h // 2, w // 2) over the images: 90 // 2
    assert image_pos[0].tolist() == [0, -42, -42] and image_pos[83 * 83].tolist() == [1, -32, -24]
    for pos, table in ((text_pos, txt), (image_pos, vid)):
        cos, sin = rope_cos_sin(pos, (16, 56, 56))
        np.testing.assert_allclose(np.array(cos), table.real.numpy(), rtol=0, atol=2e-6)
        np.testing.assert_allclose(np.array(sin), table.imag.numpy(), rtol=0, atol=2e-6)


def test_half_precision_weights_stay_close():
    reference = tiny_qwenimage.transformer(zero_cond_t=True)
    model = mlx_model(reference)
    model.set_dtype(mx.bfloat16)
    inputs = random_inputs([TARGET, *REFERENCES], [9, 4], [0.875, 0.3], masked=True)
    ours = run_mlx(model, inputs, mx.bfloat16)
    assert ours.dtype == mx.bfloat16
    err = max_rel_err(ours.astype(mx.float32), run_reference(reference, inputs))
    print(f"qwenimage transformer bfloat16: max_rel_err {err:.2e}")
    assert err <= 5e-2


def test_quantized_linears_stay_close():
    reference = tiny_qwenimage.transformer()
    inputs = random_inputs([TARGET, REFERENCES[0]], [9, 4], [0.875, 0.3], masked=True)
    model = mlx_model(reference)
    nn.quantize(model, group_size=64, bits=8)
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)]
    assert linears and all(isinstance(m, QuantizedLinear) for m in linears)
    err = max_rel_err(run_mlx(model, inputs), run_reference(reference, inputs))
    print(f"qwenimage transformer 8-bit: max_rel_err {err:.2e}")
    assert err <= 6e-2  # 8-bit weights through 2 blocks of multiplicative modulations


def test_parameter_names_are_diffusers():
    reference = tiny_qwenimage.transformer(zero_cond_t=True)
    ours = {k: v.shape for k, v in tree_flatten(mlx_model(reference).parameters())}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs


def test_guidance_is_refused_as_diffusers_cannot_embed_it():
    reference = tiny_qwenimage.transformer(guidance_embeds=True)
    inputs = random_inputs([TARGET], [7], [0.5], masked=False)
    with pytest.raises(TypeError):  # diffusers builds no guidance embedder: its forward fails given a guidance
        run_reference(reference, dict(inputs, guidance=torch.tensor([4.0])))
    model = mlx_model(reference)
    assert max_rel_err(run_mlx(model, inputs), run_reference(reference, inputs)) <= TOLERANCE
    with pytest.raises(ValueError, match="no guidance embedding"):
        model(mx.zeros((1, 24, TOKEN_CHANNELS)), mx.zeros((1, 7, TEXT_DIM)), None, 0.5, [[TARGET]], guidance=4.0)


def test_bad_inputs_are_refused():
    model = mlx_model(tiny_qwenimage.transformer(num_layers=1))
    x, text = mx.zeros((2, 39, TOKEN_CHANNELS)), mx.zeros((2, 7, TEXT_DIM))
    shapes = [TARGET, REFERENCES[0]]
    with pytest.raises(ValueError, match="the same images"):  # diffusers would position both by the first's
        model(x, text, None, 0.5, [shapes, [(1, 5, 3), TARGET]])
    with pytest.raises(ValueError, match="2 lists for a batch"):
        model(x[:1], text[:1], None, 0.5, [shapes, shapes])
    with pytest.raises(ValueError, match="make 24 image tokens"):
        model(x, text, None, 0.5, [[TARGET]] * 2)
    with pytest.raises(ValueError, match="mask has shape"):
        model(x, text, mx.ones((2, 6)), 0.5, [shapes] * 2)
    with pytest.raises(ValueError, match="too large"):  # text positions past 4095
        model(mx.zeros((1, 24, TOKEN_CHANNELS)), mx.zeros((1, 4094, TEXT_DIM)), None, 0.5, [[TARGET]])


QWEN_IMAGE = {  # Qwen-Image's transformer config values (diffusers' defaults); an unknown key is ignored
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 768,
}


def test_config_from_json():
    assert QwenImageTransformerConfig.from_dict(QWEN_IMAGE) == QwenImageTransformerConfig()
    assert QwenImageTransformerConfig.from_dict({**QWEN_IMAGE, "zero_cond_t": True}).zero_cond_t
    assert QwenImageTransformerConfig().inner_dim == 3072


@pytest.mark.parametrize("change, message", [
    ({"use_additional_t_cond": True}, "Layered"),
    ({"use_layer3d_rope": True}, "Layered"),
    ({"axes_dims_rope": [16, 56, 48]}, "must sum"),
    ({"axes_dims_rope": [15, 57, 56]}, "3 even sizes"),
])  # fmt: skip
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        QwenImageTransformerConfig.from_dict({**QWEN_IMAGE, **change})
