"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library.

It reproduces transformers' `CLIPTokenizer` id for id: the same normaliser, pre-tokeniser, BPE model and
special tokens. The pipeline needs raw ids (`tokenize`) to chunk long prompts and weight emphasis per
segment; `encode` gives the fixed-length, padded sequence the text encoders take.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77  # CLIP text encoders have 77 position embeddings

# The real vocabulary: 256 byte symbols, their word-final ("</w>") forms, 48,894 merges, 2 specials.
CLIP_VOCAB_SIZE = 49408
CLIP_MERGE_COUNT = CLIP_VOCAB_SIZE - 2 * 256 - 2

# CLIP's pre-tokenisation: specials, common English contractions, runs of letters, single digits, runs of
# other non-space characters. Whitespace is dropped.
CLIP_PRE_TOKENIZER_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def default_vocab_path() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz`, shipped in the package for checkpoints without a tokenizer."""
    return Path(str(resources.files("mlx_sd_server.engine") / "data" / "bpe_simple_vocab_16e6.txt.gz"))


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table; its order fixes the first 512 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # Bytes without a printable glyph come after, mapped past 255 in byte order.
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class CLIPTokenizer:
    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = EOS_TOKEN,
        max_length: int = CONTEXT_LENGTH,
    ):
        self.pad_token = pad_token
        self.max_length = max_length
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS_TOKEN))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        # transformers follows CLIP's split with ByteLevel's own (GPT-2) split; kept for identical ids.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PRE_TOKENIZER_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Special tokens are matched in the raw prompt before normalisation, as transformers does; this
        # includes the pad token, so with SD2's "!" padding a "!" in a prompt becomes id 0.
        specials = dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token])
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
        self._tokenizer = tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> CLIPTokenizer:
        """A tokenizer folder: vocab.json + merges.txt (or tokenizer.json), tokenizer_config.json /
        special_tokens_map.json for the pad token."""
        path = Path(path)
        if (path / "vocab.json").exists():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            merges = _parse_merges((path / "merges.txt").read_text(encoding="utf-8").splitlines())
        else:  # transformers 5 saves only tokenizer.json, whose BPE model holds the same vocab and merges
            model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [_merge_pair(m.split(" ", 1) if isinstance(m, str) else m) for m in model["merges"]]
        settings: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).exists():
                settings.update(json.loads((path / name).read_text(encoding="utf-8")))
        pad = settings.get("pad_token") or EOS_TOKEN
        pad = pad["content"] if isinstance(pad, dict) else pad  # older files store an AddedToken dict
        return cls(vocab, merges, pad, int(settings.get("model_max_length", CONTEXT_LENGTH)))

    @classmethod
    def from_bpe_file(cls, path_gz: str | Path, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """open_clip's gzip'd merge list (first line a header); the vocabulary is derived from it."""
        with gzip.open(path_gz, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = _parse_merges(lines[1 : 1 + CLIP_MERGE_COUNT])
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        return cls({token: i for i, token in enumerate(tokens)}, merges, pad_token)

    def save(self, path: str | Path) -> None:
        """Write a folder `from_dir` (and transformers' `CLIPTokenizer.from_pretrained`) reads back."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tokenizer.model.save(str(path))  # vocab.json and merges.txt
        specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **specials}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def max_id(self) -> int:
        """The largest id `encode` can give: the text encoder's embedding needs more rows than this."""
        return max(self._tokenizer.get_vocab().values())

    @property
    def bos_id(self) -> int:
        return self._special_id(BOS_TOKEN)

    @property
    def eos_id(self) -> int:
        return self._special_id(EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        return self._special_id(self.pad_token)

    def _special_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        assert token_id is not None, f"{token} is missing"  # (__init__ adds the special tokens)
        return token_id

    def tokenize(self, text: str) -> list[int]:
        """The prompt's ids: no start/end tokens, no truncation, no padding."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """`max_length` ids: start token, the prompt's ids (truncated), end token, then padding."""
        ids = [self.bos_id, *self.tokenize(text)[: self.max_length - 2], self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))


def _parse_merges(lines: list[str]) -> list[tuple[str, str]]:
    """merges.txt lines ("a b", optionally after a "#version" header) as pairs."""
    return [_merge_pair(line.split()) for line in lines if line and not line.startswith("#version")]


def _merge_pair(tokens: list[str]) -> tuple[str, str]:
    first, second = tokens
    return first, second
