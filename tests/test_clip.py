"""MLX CLIP text encoders against transformers' CLIPTextModel / CLIPTextModelWithProjection (float32)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd_server.engine.text.mapping import map_clip_weight
from mlx_sd_server.engine.text.clip import CLIPTextConfig, CLIPTextModel
from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer
from parity import load_torch_weights, max_rel_err
from tiny_diffusers import text_encoder, tokenizer_vocab_size, write_tokenizer

TOLERANCE = 1e-4
VOCAB = tokenizer_vocab_size()
BOS, EOS = VOCAB - 2, VOCAB - 1

# (tiny_diffusers kind, with_projection, pad token): SD1 and SDXL's first encoder, SD2, SDXL's second.
ENCODERS = {
    "sd1": ("sd1", False, "<|endoftext|>"),
    "sd2": ("sd2", False, "!"),
    "sdxl2": ("sdxl2", True, "!"),
}
PROMPTS = ["a photo of a cat", "", "the dog, in the rain!! " * 20, "東京 🐱 (word:1.3)"]


def id_batches(tokenizer_dir) -> list[np.ndarray]:
    """Tokenised prompts (padded, one truncated), raw random ids with and without an end token, and a
    short batch."""
    tokenizer = CLIPTokenizer.from_dir(tokenizer_dir)
    rng = np.random.default_rng(0)
    random_ids = rng.integers(0, BOS, size=(3, 77))
    random_ids[0, 40] = EOS
    random_ids[1, [10, 11, 60]] = EOS  # the first end token is the pooled one
    short = np.array([[BOS, 5, 9, 13, EOS, EOS, EOS, EOS], [BOS, *rng.integers(0, BOS, size=6), EOS]])
    return [np.array([tokenizer.encode(p) for p in PROMPTS]), random_ids, short]


def reference_outputs(ref, ids: np.ndarray) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        input_ids = torch.from_numpy(ids).long()
        text_model = ref.text_model if hasattr(ref, "text_projection") else ref
        out = ref(input_ids, output_hidden_states=True)
        result = {
            "last_hidden_state": out.last_hidden_state,
            "hidden_states[-2]": out.hidden_states[-2],
            "embeddings": out.hidden_states[0],
            "pooled_output": text_model(input_ids).pooler_output,
        }
        if hasattr(ref, "text_projection"):
            result["text_embeds"] = out.text_embeds
        return result


def our_outputs(model: CLIPTextModel, ids: np.ndarray) -> dict[str, mx.array]:
    out = model(mx.array(ids))
    result = {
        "last_hidden_state": out.last_hidden_state,
        "hidden_states[-2]": out.hidden_states[-2],
        "embeddings": out.hidden_states[0],
        "pooled_output": out.pooled_output,
    }
    if out.text_embeds is not None:
        result["text_embeds"] = out.text_embeds
    return result


def build_pair(kind: str, with_projection: bool, tmp_path, eos_token_id: int | None = None):
    """The transformers reference, saved and read back as a diffusers folder would be, and our model."""
    ref = text_encoder(kind, with_projection=with_projection)
    if eos_token_id is not None:
        ref.config.eos_token_id = eos_token_id
        (ref.text_model if with_projection else ref).eos_token_id = eos_token_id
    ref.save_pretrained(str(tmp_path))
    config = CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    model = CLIPTextModel(config)
    load_torch_weights(model, ref.state_dict(), map_clip_weight)
    return ref, model


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_text_encoder_matches_transformers(name, tmp_path):
    kind, with_projection, pad = ENCODERS[name]
    ref, model = build_pair(kind, with_projection, tmp_path / "encoder")
    assert model.config.with_projection == with_projection
    assert model.config.hidden_act == ("quick_gelu" if kind == "sd1" else "gelu")
    for ids in id_batches(write_tokenizer(tmp_path / "tokenizer", pad_token=pad)):
        expected, ours = reference_outputs(ref, ids), our_outputs(model, ids)
        assert ours.keys() == expected.keys()
        for key in expected:
            err = max_rel_err(ours[key], expected[key])
            assert err <= TOLERANCE, f"{name} {key}: max_rel_err {err:.2e}"


def test_legacy_eos_config_pools_highest_id(tmp_path):
    """SD 1.x text encoder configs carry eos_token_id=2; transformers then pools at the highest id."""
    ref, model = build_pair("sd1", False, tmp_path, eos_token_id=2)
    ids = np.random.default_rng(1).integers(0, BOS, size=(4, 77))  # no end token: the rules differ
    ids[0, 30] = EOS
    expected, ours = reference_outputs(ref, ids), our_outputs(model, ids)
    assert max_rel_err(ours["pooled_output"], expected["pooled_output"]) <= TOLERANCE
    positions = np.array(model.end_token_positions(mx.array(ids)))
    np.testing.assert_array_equal(positions, ids.argmax(axis=1))


def test_end_token_positions():
    model = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, eos_token_id=EOS))
    ids = mx.array([[BOS, 3, EOS, EOS, EOS], [BOS, EOS, 4, EOS, 7], [BOS, 1, 2, 3, 4]])
    assert model.end_token_positions(ids).tolist() == [2, 1, 0]


def test_ids_outside_the_embedding_raise_instead_of_reading_past_it():
    """MLX's gather does not check bounds: an id past the table would read whatever memory follows it."""
    model = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, eos_token_id=EOS))
    assert model.token_rows == VOCAB
    model(mx.array([[BOS, 0, VOCAB - 1, EOS]]))
    for bad in (VOCAB, VOCAB + 1000, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside this text encoder's embedding "
                                             rf"\({VOCAB} rows\)"):
            model(mx.array([[BOS, bad, EOS]]))


# Real shapes (random weights): SD1's ViT-L/14 and SDXL's OpenCLIP bigG/14 (SD2's H/14 sits between).
REAL_SIZE = {
    "sd1": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768, pad_token_id=1, eos_token_id=2),
    "sdxl2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280, pad_token_id=1, eos_token_id=49407),
}


@pytest.mark.realsize
@pytest.mark.parametrize("name", sorted(REAL_SIZE))
def test_real_size_text_encoder_matches_transformers(name, tmp_path):
    from transformers import CLIPTextConfig as TransformersConfig
    from transformers import CLIPTextModel as TransformersModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    with_projection = name == "sdxl2"
    ref_class = CLIPTextModelWithProjection if with_projection else TransformersModel
    ref = ref_class(TransformersConfig(**REAL_SIZE[name])).eval()
    ref.save_pretrained(str(tmp_path))
    model = CLIPTextModel(CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text())))
    load_torch_weights(model, ref.state_dict(), map_clip_weight)
    ids = np.random.default_rng(0).integers(0, 49406, size=(2, 77))
    ids[:, 0], ids[0, 20:], ids[1, 70:] = 49406, 49407, 49407
    expected, ours = reference_outputs(ref, ids), our_outputs(model, ids)
    for key in expected:
        err = max_rel_err(ours[key], expected[key])
        assert err <= TOLERANCE, f"{name} {key}: max_rel_err {err:.2e}"


def test_config_from_dict_ignores_unknown_keys_and_reads_architecture():
    config = CLIPTextConfig.from_dict(
        {"hidden_size": 1280, "hidden_act": "gelu", "architectures": ["CLIPTextModelWithProjection"],
         "model_type": "clip_text_model", "transformers_version": "4.30.0", "pad_token_id": 1}
    )
    assert (config.hidden_size, config.hidden_act, config.with_projection) == (1280, "gelu", True)
    assert not CLIPTextConfig.from_dict({"architectures": ["CLIPTextModel"]}).with_projection


def test_weight_mapping_names():
    value = np.zeros((2, 2), dtype=np.float32)
    assert map_clip_weight("text_model.embeddings.position_ids", value) == []
    assert map_clip_weight("text_model.encoder.layers.3.mlp.fc1.weight", value)[0][0] == "layers.3.mlp.fc1.weight"
    assert map_clip_weight("embeddings.token_embedding.weight", value)[0][0] == "token_embedding.weight"
    assert map_clip_weight("text_projection.weight", value)[0][0] == "text_projection.weight"
