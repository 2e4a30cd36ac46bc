"""MLX Qwen3 text encoder and Qwen tokenizer against transformers' Qwen3Model and Qwen2TokenizerFast."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map
from parity import load_torch_weights, max_rel_err
from tiny_qwen3 import QWEN3_CHAT_TEMPLATE, VOCAB_SIZE, qwen3_config, qwen3_model, write_qwen3_tokenizer

from mlx_sd_server.engine.text.qwen3 import QWEN3_ENCODER, Qwen3Config, Qwen3Model, map_qwen3_weight
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer, chat_prompt

TOLERANCE = 1e-4
PROMPTS = [
    "a photo of a cat",
    "",
    "A Beautiful  landscape,\tpainting\nof mountains at sunset; highly detailed, 8k!",
    "\n\nthe dog in the rain " * 40,  # 200+ tokens: truncated at every max_length below
    "東京 🐱 café (word:1.3) naïve A\u030a",  # NFC: "Å" written decomposed
    "a sign that says <|im_end|> and <think> and <|endoftext|>",
]
MAX_LENGTHS = [8, 40, 512]


# --- tokenizer and chat prompt ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3_tokenizer"))


def reference_tokenizers(folder):
    """Both ways transformers reads the folder: as diffusers loads `tokenizer/`, and the file alone (with
    Qwen3's chat template given)."""
    from transformers import Qwen2TokenizerFast

    direct = Qwen2TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    direct.chat_template = QWEN3_CHAT_TEMPLATE
    return [Qwen2TokenizerFast.from_pretrained(str(folder)), direct]


def templated(ref, prompt: str, enable_thinking: bool) -> str:
    """What both pipelines hand their tokenizer (pipeline_z_image.py, pipeline_flux2_klein.py)."""
    messages = [{"role": "user", "content": prompt}]
    return ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=enable_thinking)


@pytest.mark.parametrize("enable_thinking", [True, False], ids=["z-image", "flux2-klein"])
def test_chat_prompt_and_ids_match_transformers(enable_thinking, tokenizer_dir):
    ours = Qwen3Tokenizer.from_dir(tokenizer_dir)
    for ref in reference_tokenizers(tokenizer_dir):
        for prompt in PROMPTS:
            text = chat_prompt(prompt, enable_thinking)
            assert text == templated(ref, prompt, enable_thinking), prompt
            assert ours.tokenize(text) == ref(text).input_ids, prompt
            for max_length in MAX_LENGTHS:
                expected = ref(text, padding="max_length", max_length=max_length, truncation=True)
                ids, mask = ours.encode(text, max_length)
                assert (ids, mask) == (expected.input_ids, expected.attention_mask), (prompt, max_length)


def test_chat_prompt_strings():
    assert chat_prompt("a cat", True) == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt("a cat", False) == (
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_tokenizer_framing(tokenizer_dir):
    tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)
    pad, im_start, im_end, think, end_think = (tokenizer._tokenizer.token_to_id(t) for t in
                                               ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"))
    assert tokenizer.pad_id == pad and tokenizer.max_id == end_think < VOCAB_SIZE
    ids = tokenizer.tokenize(chat_prompt("a cat", False))
    assert ids[0] == im_start and im_end in ids and ids.count(think) == ids.count(end_think) == 1
    assert pad not in ids
    padded, mask = tokenizer.encode(chat_prompt("a cat", False), len(ids) + 3)
    assert padded == [*ids, pad, pad, pad] and mask == [1] * len(ids) + [0, 0, 0]
    long = chat_prompt(PROMPTS[3], True)
    assert tokenizer.encode(long, 16) == (tokenizer.tokenize(long)[:16], [1] * 16)  # truncated, no padding
    with pytest.raises(ValueError):
        tokenizer.encode("a cat", 0)


def test_tokenizer_save_round_trip(tokenizer_dir, tmp_path):
    """Saved, the folder still reads back in transformers with the chat template (for the torch engine)."""
    from transformers import Qwen2TokenizerFast

    source = Qwen3Tokenizer.from_dir(tokenizer_dir)
    assert source.chat_template == QWEN3_CHAT_TEMPLATE
    source.save(tmp_path / "saved")
    ours = Qwen3Tokenizer.from_dir(tmp_path / "saved")
    ref = Qwen2TokenizerFast.from_pretrained(str(tmp_path / "saved"))
    for prompt in PROMPTS:
        for enable_thinking in (True, False):
            text = templated(ref, prompt, enable_thinking)
            assert text == chat_prompt(prompt, enable_thinking)
            expected = ref(text, padding="max_length", max_length=40, truncation=True)
            assert ours.encode(text, 40) == (expected.input_ids, expected.attention_mask)


def test_chat_template_file_is_read(tokenizer_dir, tmp_path):
    """Newer repos keep the template in chat_template.jinja beside a tokenizer_config.json without one."""
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text(QWEN3_CHAT_TEMPLATE)
    assert Qwen3Tokenizer.from_dir(tmp_path).chat_template == QWEN3_CHAT_TEMPLATE


# --- encoder ------------------------------------------------------------------------------------------


def build_pair(tmp_path, causal_lm: bool = False):
    """The transformers reference, saved and read back as a diffusers folder would be, and our model."""
    ref = qwen3_model(causal_lm=causal_lm)
    ref.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    model = QWEN3_ENCODER.build(config)
    load_torch_weights(model, ref.state_dict(), map_qwen3_weight)
    return ref, model


def prompt_batch(tokenizer_dir, enable_thinking: bool, max_length: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Templated prompts of different lengths, right-padded (one truncated, one unpadded), and their masks."""
    tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)
    encoded = [tokenizer.encode(chat_prompt(p, enable_thinking), max_length) for p in PROMPTS[:4]]
    ids, mask = (np.array(column) for column in zip(*encoded))
    assert mask.all(axis=1).any() and not mask.all()
    return ids, mask


def reference_states(ref, ids: np.ndarray, mask: np.ndarray | None) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(),
                  attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                  output_hidden_states=True, use_cache=False)
    return out.hidden_states


@pytest.mark.parametrize("enable_thinking", [True, False], ids=["z-image", "flux2-klein"])
def test_hidden_states_match_transformers(enable_thinking, tmp_path, tokenizer_dir):
    """Every hidden state, padding positions included (FLUX.2 klein keeps them), with the padding mask."""
    ref, model = build_pair(tmp_path)
    ids, mask = prompt_batch(tokenizer_dir, enable_thinking)
    expected = reference_states(ref, ids, mask)
    states = model(mx.array(ids), mx.array(mask))
    assert len(states) == len(expected) == qwen3_config().num_hidden_layers + 1
    errors = []
    for i, (ours, theirs) in enumerate(zip(states, expected)):
        assert ours.shape == (*ids.shape, 64) and ours.dtype == mx.float32
        errors.append(max_rel_err(ours, theirs))
        assert errors[-1] <= TOLERANCE, f"hidden state {i}: max_rel_err {errors[-1]:.2e}"
    print(f"max rel err per hidden state: {[f'{e:.1e}' for e in errors]}")


def test_hidden_states_without_mask(tmp_path):
    ref, model = build_pair(tmp_path)
    ids = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=(2, 33))
    for i, (ours, theirs) in enumerate(zip(model(mx.array(ids)), reference_states(ref, ids, None), strict=True)):
        assert max_rel_err(ours, theirs) <= TOLERANCE, f"hidden state {i}"


def test_pipelines_selections(tmp_path, tokenizer_dir):
    """Z-Image: the second-to-last state at the mask's tokens; FLUX.2 klein: states stacked on channels
    (layers 1 and 3 here for its 9, 18 and 27), padding kept. Both as the pipelines index transformers'."""
    ref, model = build_pair(tmp_path)
    ids, mask = prompt_batch(tokenizer_dir, True)
    expected = reference_states(ref, ids, mask)
    states = model(mx.array(ids), mx.array(mask), depth=model.config.num_hidden_layers - 1)
    for row in range(len(ids)):
        ours = np.array(states[-1][row])[mask[row].astype(bool)]
        assert max_rel_err(ours, expected[-2][row][torch.from_numpy(mask[row]).bool()]) <= TOLERANCE
    ids, mask = prompt_batch(tokenizer_dir, False)
    expected = reference_states(ref, ids, mask)
    states = model(mx.array(ids), mx.array(mask), depth=3)
    ours = mx.concatenate([states[k] for k in (1, 3)], axis=-1)
    theirs = torch.stack([expected[k] for k in (1, 3)], dim=1).permute(0, 2, 1, 3).reshape(*ids.shape, -1)
    assert max_rel_err(ours, theirs) <= TOLERANCE


def test_depth_stops_early(tmp_path, tokenizer_dir):
    _, model = build_pair(tmp_path)
    ids, mask = (mx.array(a) for a in prompt_batch(tokenizer_dir, False))
    full = model(ids, mask)
    for depth in range(len(full) - 1):  # below the whole stack: no final norm, the same states
        prefix = model(ids, mask, depth=depth)
        assert len(prefix) == depth + 1
        assert all(mx.array_equal(a, b).item() for a, b in zip(prefix, full))
    with pytest.raises(ValueError):
        model(ids, mask, depth=len(full))


def test_causal_lm_checkpoint_loads_encoder(tmp_path, tokenizer_dir):
    """A Qwen3ForCausalLM state dict (`model.` prefix, LM head): the encoder part, strictly."""
    ref, model = build_pair(tmp_path, causal_lm=True)
    assert "lm_head.weight" in ref.state_dict() and "model.norm.weight" in ref.state_dict()
    ids, mask = prompt_batch(tokenizer_dir, False)
    for ours, theirs in zip(model(mx.array(ids), mx.array(mask)), reference_states(ref, ids, mask), strict=True):
        assert max_rel_err(ours, theirs) <= TOLERANCE


def test_parameter_names_are_transformers():
    ref = qwen3_model()
    model = Qwen3Model(Qwen3Config.from_dict(ref.config.to_dict()))
    assert {k for k, _ in tree_flatten(model.parameters())} == set(ref.state_dict())
    biased = Qwen3Model(Qwen3Config.from_dict({**ref.config.to_dict(), "attention_bias": True}))
    assert "layers.0.self_attn.q_proj.bias" in dict(tree_flatten(biased.parameters()))


def test_weight_mapping():
    value = np.ones((3, 2), dtype=np.float32)
    assert map_qwen3_weight("lm_head.weight", value) == []
    for key in ("model.layers.3.self_attn.k_norm.weight", "layers.3.self_attn.k_norm.weight"):
        [(mapped, mapped_value)] = map_qwen3_weight(key, value)
        assert mapped == "layers.3.self_attn.k_norm.weight" and mapped_value is value
    assert map_qwen3_weight("model.embed_tokens.weight", value)[0][0] == "embed_tokens.weight"


def test_config_from_dict():
    # Qwen3-4B's config.json fields as released (transformers 4: rope_theta and rope_scaling at the top level).
    released = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
                "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960,
                "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
                "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
                "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936}
    assert Qwen3Config.from_dict(released) == Qwen3Config()
    saved = qwen3_config(rope_theta=5e5).to_dict()  # transformers 5 writes `rope_parameters`
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 5e5
    config = Qwen3Config.from_dict(saved)
    assert (config.rope_theta, config.rope_type, config.num_key_value_heads, config.head_dim) == (5e5, "default", 2, 24)
    assert Qwen3Config.from_dict({"num_attention_heads": 4, "num_key_value_heads": None}).num_key_value_heads == 4
    yarn = Qwen3Config.from_dict({**released, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert (yarn.rope_type, yarn.rope_theta) == ("yarn", 1000000)
    small = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 10}
    for bad in ({"rope_scaling": {"type": "linear", "factor": 2.0}}, {"hidden_act": "gelu"},
                {"use_sliding_window": True}, {"num_key_value_heads": 3, "num_attention_heads": 4}):
        with pytest.raises(ValueError):
            Qwen3Model(Qwen3Config.from_dict({**small, **bad}))


def test_component_kind():
    assert QWEN3_ENCODER.class_names == ("Qwen3Model", "Qwen3ForCausalLM")
    assert QWEN3_ENCODER.tokenizer_class is Qwen3Tokenizer and QWEN3_ENCODER.quantizable
    assert QWEN3_ENCODER.instead_of_float16 == mx.bfloat16


def test_ids_outside_the_embedding_raise_instead_of_reading_past_it():
    model = Qwen3Model(Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert model.token_rows == 50
    model(mx.array([[0, 49, 1]]))
    for bad in (50, 151643, -3):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside this text encoder's embedding \(50 rows\)"):
            model(mx.array([[5, bad, 1]]))


@pytest.mark.parametrize("dtype,tolerance", [(mx.bfloat16, 5e-2), (mx.float16, 1e-2)], ids=["bfloat16", "float16"])
def test_half_precision_close_to_float32(dtype, tolerance, tmp_path, tokenizer_dir):
    ref, model = build_pair(tmp_path)
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    ids, mask = prompt_batch(tokenizer_dir, False)
    for i, (ours, theirs) in enumerate(zip(model(mx.array(ids), mx.array(mask)), reference_states(ref, ids, mask))):
        assert ours.dtype == dtype
        err = max_rel_err(ours.astype(mx.float32), theirs)
        assert np.isfinite(err) and err <= tolerance, f"{dtype} hidden state {i}: max_rel_err {err:.2e}"
