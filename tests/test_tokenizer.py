"""Our CLIP tokenizer against transformers' CLIPTokenizer, id for id."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import transformers

from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path
from tiny_diffusers import bytes_to_unicode, write_tokenizer

REAL_VOCAB_GZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}

PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO of The Dog, trending on ArtStation!!!",
    "(masterpiece:1.3), [blurry:0.8], {hat}, ((best quality)), <lora:foo:0.7>",
    "hello! what?! ... -- ;; @#$%^&*~`|\\/",
    "don't it's we're they've I'm you'll he'd O'Neil's",
    "café Ñandú naïve Ørsted Straße ÉCOLE",
    "cafe\u0301 composed vs decomposed e\u0301",  # NFC normalisation
    "東京の夜景、ネオン 你好世界 한국어",
    "emoji 🐱🚀 👩‍👩‍👧 ❤️ flags 🇯🇵",
    "repeated    spaces\t\ttabs\n\nnewlines\r\n  and\u00a0nbsp \u3000 ideographic space",
    "   leading and trailing   ",
    "numbers 1024x768 3.14159 2nd 1st 10,000",
    "<|startoftext|>inline specials<|endoftext|> inside the prompt",
    " ".join(["a very long prompt about a castle on a hill at sunset"] * 12),  # > 77 tokens
    "x" * 300,
]


def reference_ids(ref: transformers.CLIPTokenizer, text: str) -> list[int]:
    return ref(text, padding="max_length", max_length=77, truncation=True).input_ids


def assert_same_ids(ours: CLIPTokenizer, ref: transformers.CLIPTokenizer) -> None:
    for text in PROMPTS:
        assert ours.tokenize(text) == ref(text, add_special_tokens=False).input_ids, text
        assert ours.encode(text) == reference_ids(ref, text), text


@pytest.fixture(scope="module", params=sorted(PAD_TOKENS))
def tiny_dir(request, tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp(request.param), pad_token=PAD_TOKENS[request.param])


def test_tiny_vocabulary_matches_transformers(tiny_dir):
    assert_same_ids(CLIPTokenizer.from_dir(tiny_dir), transformers.CLIPTokenizer.from_pretrained(str(tiny_dir)))


def test_special_ids_and_length(tiny_dir):
    ours = CLIPTokenizer.from_dir(tiny_dir)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tiny_dir))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.max_length == 77
    ids = ours.encode(PROMPTS[-2])
    assert len(ids) == 77 and ids[0] == ours.bos_id and ids[-1] == ours.eos_id  # truncated, end token kept
    assert ours.encode("")[:3] == [ours.bos_id, ours.eos_id, ours.pad_id]


def test_save_round_trip(tiny_dir, tmp_path):
    ours = CLIPTokenizer.from_dir(tiny_dir)
    ours.save(tmp_path)
    assert_same_ids(CLIPTokenizer.from_dir(tmp_path), transformers.CLIPTokenizer.from_pretrained(str(tiny_dir)))
    # The saved folder also serves the torch fallback engine, which loads it with transformers.
    assert_same_ids(ours, transformers.CLIPTokenizer.from_pretrained(str(tmp_path)))


def test_from_dir_reads_legacy_added_token_pad(tmp_path):
    """Older SD2 folders store special tokens as serialised AddedToken dicts."""
    write_tokenizer(tmp_path, pad_token="!")
    (tmp_path / "tokenizer_config.json").unlink()
    pad = {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    tok = CLIPTokenizer.from_dir(tmp_path)
    assert tok.pad_id == 0 and tok.max_length == 77


def test_packaged_vocabulary_is_the_shared_one():
    assert default_vocab_path().is_file()
    if REAL_VOCAB_GZ.exists():
        assert default_vocab_path().read_bytes() == REAL_VOCAB_GZ.read_bytes()


# --- the real vocabulary ----------------------------------------------------------------------------

def write_real_vocab_files(dst: Path) -> tuple[Path, Path]:
    """vocab.json / merges.txt from open_clip's gz, built the way the openai/clip-vit-* repos were."""
    lines = gzip.open(REAL_VOCAB_GZ, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (dst / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return dst / "vocab.json", dst / "merges.txt"


@pytest.fixture(scope="module")
def real_vocab_files(tmp_path_factory) -> tuple[Path, Path]:
    if not REAL_VOCAB_GZ.exists():
        pytest.skip(f"real CLIP vocabulary not found at {REAL_VOCAB_GZ}")
    return write_real_vocab_files(tmp_path_factory.mktemp("real_vocab"))


@pytest.mark.parametrize("family", sorted(PAD_TOKENS))
def test_real_vocabulary_matches_transformers(real_vocab_files, family):
    pad = PAD_TOKENS[family]
    ref = transformers.CLIPTokenizer(*map(str, real_vocab_files), pad_token=pad)
    ours = CLIPTokenizer.from_bpe_file(default_vocab_path(), pad_token=pad)
    assert len(ref) == 49408
    assert_same_ids(ours, ref)
    assert ours.encode("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_from_dir_reads_a_tokenizer_json_only_folder(tiny_dir, tmp_path):
    """transformers 5 saves tokenizers as tokenizer.json alone; such folders read the same."""
    ref = transformers.CLIPTokenizer.from_pretrained(str(tiny_dir))
    ref.save_pretrained(str(tmp_path))
    for legacy in ("vocab.json", "merges.txt"):
        (tmp_path / legacy).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").exists()
    assert_same_ids(CLIPTokenizer.from_dir(tmp_path), ref)
