"""A Qwen tokenizer folder without tokenizer.json (vocab.json, merges.txt and tokenizer_config.json's added tokens,
as some Qwen-Image repositories ship it) tokenizes exactly as the tokenizer.json it was written from, and as
transformers' Qwen2TokenizerFast built from the same files."""

from __future__ import annotations

import json

import pytest

from mlx_sd_server.engine.families.qwenimage.edit import PICTURE, TEMPLATE
from mlx_sd_server.engine.families.qwenimage.family import PROMPT_TEMPLATE
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer
from tiny_qwen25vl import write_qwen25vl_tokenizer

TEXTS = [
    PROMPT_TEMPLATE.format("a photo of a cat, 2 dogs & 3 birds!"),
    TEMPLATE.format(PICTURE.format(1) + "make it   snowy\n\nplease"),
    "émigré naïve CAFÉ's it'll  tabs\tand <|im_end|> <tool_call> 12345",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(a folder with tokenizer.json, one with vocab.json + merges.txt + tokenizer_config.json written from it)"""
    whole = write_qwen25vl_tokenizer(tmp_path_factory.mktemp("whole"))
    data = json.loads((whole / "tokenizer.json").read_text())
    split = tmp_path_factory.mktemp("split")
    (split / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (split / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((whole / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "rstrip", "normalized", "single_word", "special")}
        for t in data["added_tokens"]
    }
    (split / "tokenizer_config.json").write_text(json.dumps(config))
    return whole, split


def test_vocab_and_merges_tokenize_as_tokenizer_json(folders):
    whole, split = folders
    ours, reference = Qwen3Tokenizer.from_dir(split), Qwen3Tokenizer.from_dir(whole)
    assert ours.max_id == reference.max_id
    for text in TEXTS:
        assert ours.tokenize(text) == reference.tokenize(text), text


def test_vocab_and_merges_tokenize_as_transformers(folders):
    from transformers import Qwen2TokenizerFast

    _, split = folders
    ours, theirs = Qwen3Tokenizer.from_dir(split), Qwen2TokenizerFast.from_pretrained(str(split))
    for text in TEXTS:
        assert ours.tokenize(text) == theirs(text)["input_ids"], text


def test_added_tokens_out_of_order_are_refused(folders, tmp_path):
    _, split = folders
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((split / name).read_bytes())
    config = json.loads((split / "tokenizer_config.json").read_text())
    first = min(config["added_tokens_decoder"], key=int)
    config["added_tokens_decoder"][str(int(first) + 1000)] = config["added_tokens_decoder"].pop(first)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the next one"):
        Qwen3Tokenizer.from_dir(tmp_path)
