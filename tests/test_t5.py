"""MLX T5 encoder and T5 tokenizer against transformers' T5EncoderModel and T5TokenizerFast."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

from mlx_sd_server.engine.text.mapping import map_t5_weight
from mlx_sd_server.engine.text.t5 import T5Config, T5EncoderModel, clamp_float16, relative_position_buckets
from mlx_sd_server.engine.text.t5_tokenizer import T5Tokenizer
from parity import load_torch_weights, max_rel_err
from tiny_t5 import t5_config, t5_encoder, t5_vocab_size, write_t5_tokenizer

TOLERANCE = 1e-4
PROMPTS = [
    "a photo of a cat",
    "",
    "A Beautiful  landscape,\tpainting\nof mountains at sunset; highly detailed, 8k!",
    "the dog in the rain " * 60,  # 300 pieces: truncated at every max_length below
    "東京 🐱 café (word:1.3) naïve",
    "a sign that says </s> and <pad> and <extra_id_7>",
]
MAX_LENGTHS = [8, 77, 256]


# --- tokenizer ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_t5_tokenizer(tmp_path_factory.mktemp("t5_tokenizer"))


def reference_tokenizers(folder):
    """Both ways transformers reads the file: directly, and as diffusers loads `tokenizer_2/`."""
    from transformers import T5TokenizerFast

    return [T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json")),
            T5TokenizerFast.from_pretrained(str(folder))]


def test_tokenizer_matches_transformers(tokenizer_dir):
    ours = T5Tokenizer.from_dir(tokenizer_dir)
    assert (ours.pad_id, ours.eos_id, ours.vocab_size) == (0, 1, t5_vocab_size())
    for ref in reference_tokenizers(tokenizer_dir):
        for prompt in PROMPTS:
            assert ours.tokenize(prompt) == ref(prompt, add_special_tokens=False).input_ids, prompt
            for max_length in MAX_LENGTHS:
                expected = ref(prompt, padding="max_length", max_length=max_length, truncation=True,
                               add_special_tokens=True).input_ids
                assert ours.encode(prompt, max_length) == expected, (prompt, max_length)


def test_tokenizer_framing(tokenizer_dir):
    tokenizer = T5Tokenizer.from_dir(tokenizer_dir)
    ids = tokenizer.tokenize("a photo of a cat")
    assert len(ids) == 5 and 2 not in ids  # one piece per word, none unknown
    assert tokenizer.encode("a photo of a cat", 8) == [*ids, 1, 0, 0]
    long = tokenizer.encode(PROMPTS[3], 16)
    assert long == [*tokenizer.tokenize(PROMPTS[3])[:15], 1]  # truncated, still ends with </s>
    assert tokenizer.encode("", 4) == [1, 0, 0, 0]
    assert 2 not in tokenizer.tokenize("xyzzy Qq!~`|")  # any ASCII tokenizes without <unk>
    assert 2 in tokenizer.tokenize("東京")


def test_tokenizer_save_round_trip(tokenizer_dir, tmp_path):
    T5Tokenizer.from_dir(tokenizer_dir).save(tmp_path / "saved")
    ours = T5Tokenizer.from_dir(tmp_path / "saved")
    for ref in reference_tokenizers(tmp_path / "saved"):
        for prompt in PROMPTS:
            expected = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            assert ours.encode(prompt, 77) == expected


# --- encoder ------------------------------------------------------------------------------------------

def build_pair(tmp_path, gated: bool = True):
    """The transformers reference, saved and read back as a diffusers folder would be, and our model."""
    ref = t5_encoder(gated=gated)
    ref.save_pretrained(str(tmp_path))
    model = T5EncoderModel(T5Config.from_dict(json.loads((tmp_path / "config.json").read_text())))
    load_torch_weights(model, ref.state_dict(), map_t5_weight)
    return ref, model


def id_batches(tokenizer_dir) -> list[np.ndarray]:
    """Tokenised prompts (padded, one truncated) and random ids; 45 and 64 tokens, past max_distance
    (20), so the logarithmic buckets saturate."""
    tokenizer = T5Tokenizer.from_dir(tokenizer_dir)
    prompts = np.array([tokenizer.encode(p, 64) for p in PROMPTS[2:4]])
    return [prompts, np.random.default_rng(0).integers(0, t5_vocab_size(), size=(2, 45))]


def reference_output(ref, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.from_numpy(ids).long())[0]


@pytest.mark.parametrize("gated", [True, False], ids=["gated-gelu", "relu"])
def test_encoder_matches_transformers(gated, tmp_path, tokenizer_dir):
    ref, model = build_pair(tmp_path, gated)
    assert model.config.is_gated_act == gated
    for ids in id_batches(tokenizer_dir):
        out = model(mx.array(ids))
        assert out.shape == (*ids.shape, 32) and out.dtype == mx.float32
        err = max_rel_err(out, reference_output(ref, ids))
        assert err <= TOLERANCE, f"gated={gated}: max_rel_err {err:.2e}"


def test_parameter_names_are_transformers_less_tied_embedding():
    for gated in (True, False):
        ref = t5_encoder(gated=gated)
        ours = {k for k, _ in tree_flatten(T5EncoderModel(T5Config.from_dict(ref.config.to_dict())).parameters())}
        assert ours == set(ref.state_dict()) - {"encoder.embed_tokens.weight"}
        assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in ours
        assert not any(".relative_attention_bias" in k for k in ours if not k.startswith("encoder.block.0."))


def test_weight_mapping():
    value = np.ones((3, 2), dtype=np.float32)
    assert map_t5_weight("encoder.embed_tokens.weight", value) == []
    assert map_t5_weight("decoder.block.0.layer.0.SelfAttention.q.weight", value) == []
    assert map_t5_weight("decoder.embed_tokens.weight", value) == []
    assert map_t5_weight("lm_head.weight", value) == []
    kept = ["shared.weight", "encoder.final_layer_norm.weight", "encoder.block.5.layer.1.DenseReluDense.wi_0.weight"]
    for key in kept:
        [(mapped, mapped_value)] = map_t5_weight(key, value)
        assert mapped == key and mapped_value is value


def test_whole_t5_checkpoint_loads_encoder(tmp_path, tokenizer_dir):
    """A T5ForConditionalGeneration state dict (decoder, LM head): the encoder part, strictly."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(3)
    full = T5ForConditionalGeneration(t5_config(is_encoder_decoder=True, num_decoder_layers=2)).eval()
    assert any(k.startswith("decoder.") for k in full.state_dict()) and "lm_head.weight" in full.state_dict()
    model = T5EncoderModel(T5Config.from_dict(full.config.to_dict()))
    load_torch_weights(model, full.state_dict(), map_t5_weight)
    ids = id_batches(tokenizer_dir)[1]
    with torch.no_grad():
        expected = full.encoder(input_ids=torch.from_numpy(ids).long()).last_hidden_state
    assert max_rel_err(model(mx.array(ids)), expected) <= TOLERANCE


@pytest.mark.parametrize("num_buckets,max_distance", [(8, 20), (32, 128)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    """T5's own 32 buckets up to 128 put distances 16, 32 and 64 on exact bin boundaries."""
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 512
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, num_buckets, max_distance), expected)


def test_config_from_dict():
    config = T5Config.from_dict({"d_model": 4096, "d_ff": 10240, "num_heads": 64, "num_layers": 24,
                                 "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
                                 "model_type": "t5", "architectures": ["T5EncoderModel"], "tie_word_embeddings": False})
    assert (config.d_model, config.d_ff, config.num_heads, config.num_layers) == (4096, 10240, 64, 24)
    assert (config.is_gated_act, config.dense_act_fn) == (True, "gelu_new")
    assert (T5Config().is_gated_act, T5Config().dense_act_fn) == (False, "relu")
    assert T5Config(feed_forward_proj="gated-silu").dense_act_fn == "silu"
    with pytest.raises(ValueError):
        T5EncoderModel(T5Config(feed_forward_proj="gated-swish", num_layers=1))


def test_ids_outside_the_embedding_raise_instead_of_reading_past_it():
    model = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4))
    assert model.token_rows == 50
    model(mx.array([[0, 49, 1]]))
    for bad in (50, 32128, -3):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside this text encoder's embedding \(50 rows\)"):
            model(mx.array([[5, bad, 1]]))


# --- half precision -----------------------------------------------------------------------------------

def test_clamp_float16():
    big = mx.array([1.0, -np.inf, np.inf, 65504.0], dtype=mx.float16)
    assert clamp_float16(big).tolist() == [1.0, -64512.0, 64512.0, 64512.0]  # 65504 - 1000, rounded
    finite = mx.array([1.0, -65504.0], dtype=mx.float16)
    assert clamp_float16(finite).tolist() == [1.0, -65504.0]
    assert clamp_float16(mx.array([np.inf])).tolist() == [np.inf]  # float32 passes through


def test_float16_survives_overflowing_activations(tmp_path):
    """T5-XXL's residual stream outgrows float16; here `wo` scaled 3e4 takes it to ~1.5e5. A model all
    in float16 clamps it and is ~40% off; ours (wo and the residual stream in float32 from the first
    feed-forward on, as transformers' float16 T5) stays close to float32 and to transformers' float16."""
    from transformers import T5EncoderModel as TransformersT5

    ref = t5_encoder()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("wo.weight"):
                param.mul_(3e4)
    ref.save_pretrained(str(tmp_path))
    ref16 = TransformersT5.from_pretrained(str(tmp_path), dtype=torch.float16).eval()
    model = T5EncoderModel(T5Config.from_dict(ref.config.to_dict()))
    to_float16 = lambda k, v: [(n, w.astype(np.float16)) for n, w in map_t5_weight(k, v)]  # noqa: E731
    load_torch_weights(model, ref.state_dict(), to_float16)
    assert model.shared.weight.dtype == mx.float16

    ids = np.random.default_rng(1).integers(0, t5_vocab_size(), size=(2, 45))
    with torch.no_grad():
        hidden = ref(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
    assert max(h.abs().max().item() for h in hidden) > 65504  # the test overflows float16
    out = model(mx.array(ids))
    assert out.dtype == mx.float16 and np.isfinite(np.array(out)).all()
    assert max_rel_err(out, reference_output(ref, ids)) <= 1e-2
    assert max_rel_err(out, reference_output(ref16, ids)) <= 1e-2


@pytest.mark.parametrize("dtype,tolerance", [(mx.float16, 1e-2), (mx.bfloat16, 5e-2)], ids=["float16", "bfloat16"])
def test_half_precision_close_to_float32(dtype, tolerance, tmp_path, tokenizer_dir):
    ref, model = build_pair(tmp_path)
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    for ids in id_batches(tokenizer_dir):
        out = model(mx.array(ids))
        assert out.dtype == dtype
        err = max_rel_err(out.astype(mx.float32), reference_output(ref, ids))
        assert np.isfinite(err) and err <= tolerance, f"{dtype}: max_rel_err {err:.2e}"
