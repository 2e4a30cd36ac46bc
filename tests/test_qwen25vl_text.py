"""MLX Qwen2.5-VL language model (Qwen-Image's text encoder) against transformers'
Qwen2_5_VLForConditionalGeneration, and the Qwen tokenizer on Qwen2.5-VL's added tokens."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map
from parity import load_torch_weights, max_rel_err
from safetensors import safe_open
from tiny_qwen3 import VOCAB_SIZE
from tiny_qwen25vl import PLAIN_ADDED_TOKENS, SPECIAL_TOKENS, qwen25vl_model, token_id, write_qwen25vl_tokenizer

from mlx_sd_server.engine.model_io import quantizable
from mlx_sd_server.engine.ops.layers import QuantizedLinear
from mlx_sd_server.engine.text.qwen25vl import (
    VISUAL_PREFIX,
    Qwen25VLConfig,
    Qwen25VLTextModel,
    map_qwen25vl_weight,
)
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer

TOLERANCE = 1e-4
# Prompts framed as Qwen-Image's pipelines frame them (system turn, user turn, an image's placeholder tokens).
PROMPTS = [
    "<|im_start|>system\nDescribe the image:<|im_end|>\n<|im_start|>user\na photo of a cat<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>make the sky red"
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>",
    "A Beautiful  landscape,\tpainting\nof mountains at sunset; 東京 🐱 café <tool_call>x</tool_call><|box_start|>",
    "",
]


# --- tokenizer ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_qwen25vl_tokenizer(tmp_path_factory.mktemp("qwen25vl_tokenizer"))


def test_tokenizer_matches_transformers_on_vision_tokens(tokenizer_dir):
    """The Qwen tokenizer reads Qwen2.5-VL's file: its added tokens (<|vision_start|>, <|image_pad|>,
    <|vision_end|>...) are single ids, as transformers' Qwen2TokenizerFast (what diffusers loads) gives them."""
    from transformers import Qwen2TokenizerFast

    ours = Qwen3Tokenizer.from_dir(tokenizer_dir)
    ref = Qwen2TokenizerFast.from_pretrained(str(tokenizer_dir))
    assert ours.pad_id == token_id("<|endoftext|>") and ours.max_id == token_id(PLAIN_ADDED_TOKENS[-1]) < VOCAB_SIZE
    for token in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS:
        assert ours.tokenize(token) == ref(token).input_ids == [token_id(token)], token
    for prompt in PROMPTS:
        assert ours.tokenize(prompt) == ref(prompt).input_ids, prompt
        expected = ref(prompt, padding="max_length", max_length=24, truncation=True)
        assert ours.encode(prompt, 24) == (expected.input_ids, expected.attention_mask), prompt
    image = [token_id(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")]
    ids = ours.tokenize(PROMPTS[1])
    assert ids[ids.index(image[0]) : ids.index(image[2]) + 1] == [image[0], *[image[1]] * 3, image[2]]


# --- language model -----------------------------------------------------------------------------------


def text_only(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """map_qwen25vl_weight without the vision tower's keys: what the language model alone loads."""
    return [(k, v) for k, v in map_qwen25vl_weight(key, value) if not k.startswith(VISUAL_PREFIX)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The transformers reference, saved and read back as a diffusers folder's text_encoder/, and our model
    built from the saved config.json and loaded from the reference's state dict."""
    folder = tmp_path_factory.mktemp("qwen25vl")
    ref = qwen25vl_model()
    ref.save_pretrained(str(folder))
    model = Qwen25VLTextModel(Qwen25VLConfig.from_dict(json.loads((folder / "config.json").read_text())))
    load_torch_weights(model, ref.state_dict(), text_only)
    return ref, model, folder


def reference_state(ref, **inputs) -> torch.Tensor:
    """`output_hidden_states=True`'s last state, as Qwen-Image's pipelines call the text encoder."""
    torch_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    for k in ("input_ids", "attention_mask", "position_ids"):
        if k in torch_inputs:
            torch_inputs[k] = torch_inputs[k].long()
    with torch.no_grad():
        return ref(**torch_inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]


def prompt_batch(tokenizer_dir, length: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The prompts right-padded to `length` (as Qwen-Image's tokenizer pads), their masks (the empty prompt left
    out: a prompt has tokens, Qwen-Image's template's at least)."""
    tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)
    ids, mask = (np.array(column) for column in zip(*(tokenizer.encode(p, length) for p in PROMPTS if p)))
    assert not mask.all() and len(set(mask.sum(axis=1).tolist())) == len(ids)
    return ids, mask


def monotone_positions(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """(3, B, L) random non-decreasing positions, different on each axis (as an image's grid gives)."""
    return np.cumsum(rng.integers(0, 3, size=(3, batch, length)), axis=-1)


def test_padded_prompts_match_transformers(pair, tokenizer_dir):
    """Text-only prompts of different lengths, right-padded, with the mask: default positions."""
    ref, model, _ = pair
    ids, mask = prompt_batch(tokenizer_dir)
    expected = reference_state(ref, input_ids=ids, attention_mask=mask)
    ours = model(mx.array(ids), attention_mask=mx.array(mask))
    assert ours.shape == (*ids.shape, 64) and ours.dtype == mx.float32
    valid = mask.astype(bool)
    error = max_rel_err(np.array(ours)[valid], expected.numpy()[valid])
    everywhere = max_rel_err(ours, expected)  # padding positions too: transformers computes them the same way
    print(f"padded prompts: max rel err {error:.1e} on the prompts' tokens, {everywhere:.1e} everywhere")
    assert error <= TOLERANCE and everywhere <= TOLERANCE
    unmasked = model(mx.array(ids))  # the mask matters: without it padding attends to padding
    assert max_rel_err(np.array(unmasked)[~valid], expected.numpy()[~valid]) > 1e-2


def test_explicit_mrope_positions_match_transformers(pair, tokenizer_dir):
    """(3, B, L) positions that differ per axis exercise each mRoPE run; (B, L) ones apply to all three axes."""
    ref, model, _ = pair
    ids, mask = prompt_batch(tokenizer_dir)
    positions = monotone_positions(np.random.default_rng(0), *ids.shape)
    expected = reference_state(ref, input_ids=ids, attention_mask=mask, position_ids=positions)
    ours = model(mx.array(ids), attention_mask=mx.array(mask), position_ids=mx.array(positions))
    valid = mask.astype(bool)
    error = max_rel_err(np.array(ours)[valid], expected.numpy()[valid])
    print(f"3D position ids: max rel err {error:.1e}")
    assert error <= TOLERANCE
    default = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    assert max_rel_err(default[valid], expected.numpy()[valid]) > 1e-2  # the positions matter
    for axis in range(3):  # each axis's run matters: one axis's positions alone change the states
        changed = positions.copy()
        changed[axis] = np.cumsum(np.ones_like(positions[axis]), axis=-1) * 7
        moved = np.array(model(mx.array(ids), attention_mask=mx.array(mask), position_ids=mx.array(changed)))
        assert max_rel_err(moved[valid], expected.numpy()[valid]) > 1e-3, axis
    flat = positions[1]
    expected = reference_state(ref, input_ids=ids, attention_mask=mask, position_ids=flat)
    ours = model(mx.array(ids), attention_mask=mx.array(mask), position_ids=mx.array(flat))
    assert max_rel_err(np.array(ours)[valid], expected.numpy()[valid]) <= TOLERANCE


def test_inputs_embeds_match_transformers(pair, tokenizer_dir):
    """The vision merge's path: embeddings with some rows replaced (as image features are), grid positions."""
    ref, model, _ = pair
    ids, mask = prompt_batch(tokenizer_dir)
    rng = np.random.default_rng(1)
    embeds = np.array(model.embed(mx.array(ids)))
    image = ids == token_id("<|image_pad|>")
    assert image.any()
    embeds[image] = rng.standard_normal((int(image.sum()), embeds.shape[-1])).astype(np.float32)
    positions = monotone_positions(rng, *ids.shape)
    expected = reference_state(ref, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    ours = model(inputs_embeds=mx.array(embeds), attention_mask=mx.array(mask), position_ids=mx.array(positions))
    valid = mask.astype(bool)
    error = max_rel_err(np.array(ours)[valid], expected.numpy()[valid])
    print(f"inputs_embeds: max rel err {error:.1e}")
    assert error <= TOLERANCE


def test_unpadded_batch_without_mask(pair):
    ref, model, _ = pair
    ids = np.random.default_rng(2).integers(0, VOCAB_SIZE, size=(2, 33))
    assert max_rel_err(model(mx.array(ids)), reference_state(ref, input_ids=ids)) <= TOLERANCE


def test_embed_is_the_token_embedding(pair):
    ref, model, _ = pair
    ids = np.array([[0, 5, token_id("<|image_pad|>"), VOCAB_SIZE - 1]])
    with torch.no_grad():
        expected = ref.get_input_embeddings()(torch.from_numpy(ids))
    assert max_rel_err(model.embed(mx.array(ids)), expected) == 0.0


def test_both_key_layouts_load_the_same_model(pair):
    """transformers 5's state dict (`model.language_model.`, `model.visual.`), the file it saves (the older
    layout Qwen-Image ships: `model.`, `visual.`) and a bare Qwen2_5_VLModel's give the same weights."""
    ref, model, folder = pair
    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert "model.layers.0.self_attn.q_proj.bias" in saved and "visual.blocks.0.attn.qkv.weight" in saved
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in ref.state_dict()
    layouts = [
        {k: v.numpy() for k, v in ref.state_dict().items()},
        saved,
        {k: v.numpy() for k, v in ref.model.state_dict().items()},
    ]
    mapped = [dict(pair for k, v in layout.items() for pair in map_qwen25vl_weight(k, v)) for layout in layouts]
    ours = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    vision = {"visual." + k: v.numpy() for k, v in ref.model.visual.state_dict().items()}
    for weights in mapped:
        assert set(weights) == set(ours) | set(vision)
        assert all(np.array_equal(weights[k], ours[k]) for k in ours)
        assert all(np.array_equal(weights[k], vision[k]) for k in vision)
    assert map_qwen25vl_weight("lm_head.weight", np.zeros(1)) == []


def test_parameter_names_are_transformers(pair):
    ref, model, _ = pair
    assert {k for k, _ in tree_flatten(model.parameters())} == set(ref.model.language_model.state_dict())


def quantized_copy(model: Qwen25VLTextModel, bits: int) -> Qwen25VLTextModel:
    """nn.quantize on the Linear layers, as `convert --quantize` does: every projection quantized."""
    quantized = Qwen25VLTextModel(model.config)
    quantized.update(model.parameters())
    nn.quantize(quantized, 64, bits, class_predicate=quantizable(64))
    layers = [m for _, m in quantized.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)]
    assert len(layers) == 7 * model.config.num_hidden_layers and all(isinstance(m, QuantizedLinear) for m in layers)
    return quantized


def test_quantized_model_runs_and_stays_close(pair, tokenizer_dir):
    """4-bit: exactly the model of its dequantized weights (random weights lose too much at 4 bits for a float
    comparison to say anything: ~0.5 mean relative change); 8-bit: close to the float model."""
    ref, model, _ = pair
    ids, mask = (mx.array(a) for a in prompt_batch(tokenizer_dir))
    quantized = quantized_copy(model, 4)
    dequantized = Qwen25VLTextModel(model.config)
    dequantized.update(model.parameters())
    dequantized.load_weights(
        [
            (f"{path}.weight", mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits))
            for path, m in quantized.named_modules()
            if isinstance(m, QuantizedLinear)
        ],
        strict=False,
    )
    ours = quantized(ids, attention_mask=mask)
    error = max_rel_err(ours, dequantized(ids, attention_mask=mask))
    float_error = max_rel_err(ours, model(ids, attention_mask=mask))
    assert np.isfinite(float_error) and float_error > 1e-2  # quantized indeed
    eight_bit = max_rel_err(quantized_copy(model, 8)(ids, attention_mask=mask), model(ids, attention_mask=mask))
    print(
        f"4-bit: max rel err {error:.1e} against its dequantized weights ({float_error:.1e} against float32); "
        f"8-bit: {eight_bit:.1e} against float32"
    )
    assert error <= TOLERANCE and eight_bit <= 0.1


@pytest.mark.parametrize("dtype,tolerance", [(mx.bfloat16, 5e-2), (mx.float16, 1e-2)], ids=["bfloat16", "float16"])
def test_half_precision_close_to_float32(pair, tokenizer_dir, dtype, tolerance):
    ref, model, _ = pair
    half = Qwen25VLTextModel(model.config)
    half.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    ids, mask = prompt_batch(tokenizer_dir)
    ours = half(mx.array(ids), attention_mask=mx.array(mask))
    assert ours.dtype == dtype
    valid = mask.astype(bool)
    expected = reference_state(ref, input_ids=ids, attention_mask=mask).numpy()[valid]
    assert max_rel_err(np.array(ours.astype(mx.float32))[valid], expected) <= tolerance


def test_bad_inputs_raise(pair):
    _, model, _ = pair
    ids = mx.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed(ids))
    for bad in (mx.zeros((3, 1, 4), dtype=mx.int32), mx.zeros((4, 1, 3), dtype=mx.int32), mx.zeros((3,), mx.int32)):
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=bad)
    for bad in ([[0, 1, 1]], [[1, 0, 1]], [[0, 0, 0]], [1, 1, 1]):  # left or inner padding, no token, not 2D
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=mx.array(bad))
    with pytest.raises(ValueError, match=r"token id 1000 is outside this text encoder's embedding \(1000 rows\)"):
        model(mx.array([[1, VOCAB_SIZE]]))
    assert model.token_rows == VOCAB_SIZE


# --- config -------------------------------------------------------------------------------------------

# Qwen-Image's text_encoder/config.json fields for the language model, as transformers 4 wrote them: the text
# settings at the top level, rope_theta beside rope_scaling (which names the type twice).
RELEASED = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "image_token_id": 151655,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.49.0",
    "use_cache": True,
    "use_sliding_window": False,
    "video_token_id": 151656,
    "vision_config": {
        "hidden_size": 1280,
        "in_chans": 3,
        "model_type": "qwen2_5_vl",
        "spatial_patch_size": 14,
        "tokens_per_second": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
    "vision_token_id": 151654,
    "vocab_size": 152064,
}


def as_transformers_reads(d: dict) -> Qwen25VLConfig:
    """The settings transformers' Qwen2_5_VLConfig takes from the same dict."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(**d)
    text = config.text_config
    return Qwen25VLConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        hidden_act=text.hidden_act,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_parameters["rope_theta"],
        rope_type=text.rope_parameters["rope_type"],
        mrope_section=tuple(text.rope_parameters["mrope_section"]),
        use_sliding_window=text.use_sliding_window,
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
    )


def test_config_layouts(pair):
    _, _, folder = pair
    assert Qwen25VLConfig.from_dict(RELEASED) == Qwen25VLConfig() == as_transformers_reads(RELEASED)
    assert Qwen25VLConfig().head_dim == 128
    older = {**RELEASED, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}  # Qwen2.5-VL's first files
    assert Qwen25VLConfig.from_dict(older) == Qwen25VLConfig() == as_transformers_reads(older)
    nested = json.loads((folder / "config.json").read_text())  # transformers 5: `text_config`, `rope_parameters`
    assert "hidden_size" not in nested and "rope_parameters" in nested["text_config"]
    config = Qwen25VLConfig.from_dict(nested)
    assert config == as_transformers_reads(nested)
    assert (config.hidden_size, config.head_dim, config.mrope_section, config.image_token_id) == (
        64,
        16,
        (2, 3, 3),
        token_id("<|image_pad|>"),
    )
    both = {**RELEASED, "text_config": {**nested["text_config"], "rope_theta": 5e5}}  # text_config wins
    assert Qwen25VLConfig.from_dict(both).hidden_size == 64
    assert Qwen25VLConfig.from_dict({"num_attention_heads": 4, "num_key_value_heads": None}).num_key_value_heads == 4


def test_unsupported_settings_raise():
    small = {
        "hidden_size": 16,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 10,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
    }
    Qwen25VLTextModel(Qwen25VLConfig.from_dict(small))
    for bad in (
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mrope_section": [1, 1, 2]}},
        {"hidden_act": "gelu"},
        {"use_sliding_window": True},
        {"num_key_value_heads": 3, "num_attention_heads": 4},
        {"num_attention_heads": 3},
        {"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    ):
        with pytest.raises(ValueError, match="Qwen2.5-VL"):
            Qwen25VLTextModel(Qwen25VLConfig.from_dict({**small, **bad}))
