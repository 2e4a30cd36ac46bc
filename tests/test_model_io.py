"""Loading converted folders: a text encoder whose token embedding has fewer rows than its tokenizer has ids is
refused when the model loads, naming both sizes (such a model read past its embedding: NaN images, garbage,
segfaults in CLIP)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

import tiny_diffusers
import tiny_flux
import tiny_t5
from convert.model import convert_model
from mlx_sd_server.engine.model_io import MANIFEST, ModelFormatError, load_model

# (model, component, its embedding's weight, the tiny tokenizer's vocabulary size)
ENCODERS = [
    ("sdxl", "text_encoder", "token_embedding.weight", tiny_diffusers.tokenizer_vocab_size()),
    ("sdxl", "text_encoder_2", "token_embedding.weight", tiny_diffusers.tokenizer_vocab_size()),
    ("flux", "text_encoder_2", "shared.weight", tiny_t5.t5_vocab_size()),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """model name -> a converted tiny model folder, built on first use."""
    folders = {}

    def get(name: str):
        if name not in folders:
            src = tmp_path_factory.mktemp(f"{name}-diffusers")
            if name == "flux":
                tiny_flux.make_pipeline(src, "schnell")
            else:
                tiny_diffusers.make_pipeline(src, name)
            folders[name] = tmp_path_factory.mktemp(f"{name}-mlx") / "model"
            convert_model(src, folders[name], dtype="float32", progress=False)
        return folders[name]

    return get


def shrink_embedding(folder, component: str, key: str, rows: int) -> None:
    """Keep the first `rows` rows of a converted text encoder's token embedding, in its weights and config."""
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = manifest["components"][component]
    path = folder / entry["weights"]
    weights = mx.load(str(path))
    weights[key] = weights[key][:rows]
    mx.save_safetensors(str(path), weights)
    entry["config"]["vocab_size"] = rows
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, component, key, vocab", ENCODERS, ids=["sdxl-clip-l", "sdxl-clip-g", "flux-t5"])
def test_a_text_embedding_shorter_than_the_vocabulary_is_refused_at_load(converted, tmp_path, name, component, key,
                                                                          vocab):
    folder = tmp_path / "model"
    shutil.copytree(converted(name), folder)
    load_model(folder, dtype="float32")  # as converted: the embedding covers the vocabulary

    rows = vocab - 40
    shrink_embedding(folder, component, key, rows)
    with pytest.raises(ModelFormatError, match=rf"component {component}: its token embedding has {rows} rows, "
                                               rf"but its tokenizer has {vocab} tokens \(ids up to {vocab - 1}\)"):
        load_model(folder, dtype="float32")


def test_an_embedding_with_rows_to_spare_loads(converted, tmp_path):
    """More rows than the tokenizer has ids is fine (T5-XXL's embedding has 32,128 rows for 32,100 tokens)."""
    folder = tmp_path / "model"
    shutil.copytree(converted("flux"), folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = manifest["components"]["text_encoder_2"]
    weights = mx.load(str(folder / entry["weights"]))
    table = weights["shared.weight"]
    weights["shared.weight"] = mx.concatenate([table, mx.zeros((28, table.shape[1]))])
    mx.save_safetensors(str(folder / entry["weights"]), weights)
    entry["config"]["vocab_size"] = tiny_t5.t5_vocab_size() + 28
    (folder / MANIFEST).write_text(json.dumps(manifest))
    model = load_model(folder, dtype="float32")
    assert model.text_encoders["text_encoder_2"].token_rows == tiny_t5.t5_vocab_size() + 28
