"""Qwen's byte-level BPE tokenizer, from the `tokenizer.json` Qwen3 text encoders ship, and the chat prompt.

The file holds the whole pipeline (NFC, Qwen2's regex split, byte-level BPE, the added tokens `<|im_start|>`,
`<|im_end|>`, `<think>`...), which the `tokenizers` library runs as transformers' `Qwen2TokenizerFast` does
(transformers 5 rebuilds that same pipeline from the file's vocabulary and merges). We add the framing the
pipelines ask for: truncation to a maximum length, then `<|endoftext|>` padding on the right (Qwen3's
tokenizer_config sets no padding side: transformers' default) and the attention mask.

Pipelines do not tokenize the prompt alone but Qwen3's chat template applied to one user message
(`chat_prompt`, the string the template renders, without jinja).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

PAD_TOKEN = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers keep the template instead
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"  # the slow tokenizer's files (Qwen-Image's tokenizer folder)
# Qwen2's pre-tokenizer split (transformers' qwen2 PRETOKENIZE_REGEX)
SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def from_vocab_and_merges(folder: Path) -> Tokenizer:
    """The tokenizer a folder without tokenizer.json describes (vocab.json, merges.txt, the added tokens in
    tokenizer_config.json's added_tokens_decoder), built as transformers builds Qwen2TokenizerFast from them."""
    vocab = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
    lines = (folder / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    pairs = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    merges = [(a, b) for a, b in pairs]
    tokenizer = Tokenizer(
        BPE(vocab, merges, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")) if (folder / CONFIG_FILE).is_file() else {}
    added = sorted(((int(i), t) for i, t in (config.get("added_tokens_decoder") or {}).items()), key=lambda x: x[0])
    for token_id, token in added:
        options = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
        added_token = AddedToken(token["content"], special=bool(token.get("special")), **options)
        if token_id != tokenizer.get_vocab_size():
            raise ValueError(f"{folder}: added token {token['content']!r} has id {token_id}, not the next one")
        (tokenizer.add_special_tokens if token.get("special") else tokenizer.add_tokens)([added_token])
    return tokenizer


def chat_prompt(prompt: str, enable_thinking: bool) -> str:
    """`tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
    add_generation_prompt=True, enable_thinking=enable_thinking)` with Qwen3's template: the user turn, then
    the assistant's opening; with thinking disabled the template adds an empty think block.
    Z-Image's pipeline asks enable_thinking=True, FLUX.2 klein's False."""
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if enable_thinking else text + "<think>\n\n</think>\n\n"


class Qwen3Tokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None):
        # Framing is ours: a file may carry truncation or padding settings, which would cut `tokenize`.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        # Not used here (see chat_prompt); kept so that a saved folder still serves transformers' pipelines.
        self.chat_template = chat_template
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if pad_id is None:
            raise ValueError(f"the Qwen tokenizer has no {PAD_TOKEN!r} token")
        self.pad_id: int = pad_id

    @classmethod
    def from_dir(cls, folder: str | Path) -> Qwen3Tokenizer:
        folder = Path(folder)
        chat_template = None
        if (folder / CONFIG_FILE).is_file():
            chat_template = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("chat_template")
        if chat_template is None and (folder / CHAT_TEMPLATE_FILE).is_file():
            chat_template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (folder / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), chat_template)
        return cls(from_vocab_and_merges(folder), chat_template)

    def save(self, folder: str | Path) -> None:
        """Write `folder/tokenizer.json` and a tokenizer_config.json (with the chat template when one was read),
        which `from_dir` and transformers' `Qwen2TokenizerFast.from_pretrained` read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": PAD_TOKEN,
            "unk_token": None,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def max_id(self) -> int:
        """The largest id `encode` can give: the text encoder's embedding needs more rows than this."""
        return max(self._tokenizer.get_vocab().values())

    def tokenize(self, text: str) -> list[int]:
        """The text's ids (added tokens such as `<|im_start|>` written in it included): no truncation, no padding."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, max_length: int) -> tuple[list[int], list[int]]:
        """`max_length` ids and their attention mask: the text's ids (truncated), then `<|endoftext|>` padding
        masked 0 — as `Qwen2TokenizerFast(text, padding="max_length", max_length=max_length, truncation=True)`."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids = self.tokenize(text)[:max_length]
        padding = max_length - len(ids)
        return ids + [self.pad_id] * padding, [1] * len(ids) + [0] * padding
