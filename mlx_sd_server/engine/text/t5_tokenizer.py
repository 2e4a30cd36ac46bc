"""T5's SentencePiece (Unigram) tokenizer, from the `tokenizer.json` FLUX repos ship in `tokenizer_2/`.

The file holds the whole pipeline (normaliser, Metaspace pre-tokeniser, Unigram model, special tokens),
which the `tokenizers` library runs as transformers' `T5TokenizerFast` does; we add T5's fixed-length
framing: the prompt's ids, truncated to leave room for the end token, `</s>`, then `<pad>`s.
(transformers 5's `from_pretrained` rebuilds the pipeline from the file's vocabulary with T5's own
pre-tokeniser, keeping only a precompiled-charsmap normaliser: the same pipeline for files laid out as
T5's; tests/test_t5.py checks both readings.)
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"


class T5Tokenizer:
    def __init__(self, tokenizer: Tokenizer):
        # Framing is ours: a file may carry truncation or padding settings, which would cut `tokenize`.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.pad_id = self._token_id(PAD_TOKEN)
        self.eos_id = self._token_id(EOS_TOKEN)

    def _token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the T5 tokenizer has no {token!r} token")
        return token_id

    @classmethod
    def from_dir(cls, folder: str | Path) -> T5Tokenizer:
        return cls(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")))

    def save(self, folder: str | Path) -> None:
        """Write `folder/tokenizer.json`, which `from_dir` and transformers' `T5TokenizerFast` read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def max_id(self) -> int:
        """The largest id `encode` can give: the text encoder's embedding needs more rows than this."""
        return max(self._tokenizer.get_vocab().values())

    def tokenize(self, text: str) -> list[int]:
        """The prompt's ids: no end token, no truncation, no padding."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, max_length: int) -> list[int]:
        """`max_length` ids: the prompt's (truncated), `</s>`, then `<pad>`s — as `T5TokenizerFast(text,
        padding="max_length", max_length=max_length, truncation=True)`."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids = [*self.tokenize(text)[: max_length - 1], self.eos_id]
        return ids + [self.pad_id] * (max_length - len(ids))
