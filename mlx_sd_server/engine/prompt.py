"""Prompt syntax as A1111 users write it: emphasis weights and prompts longer than one CLIP window.

`(word)` multiplies attention by 1.1, `[word]` divides by 1.1, `(word:1.3)` sets 1.3; `\\(` is a literal
bracket; `BREAK` starts a new 75-token chunk. Long prompts are split into chunks of 75 tokens (at the
last comma when one is near the boundary), each encoded as its own 77-token window, and the windows'
embeddings are concatenated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

from mlx_sd_server.engine.tokenizer import CLIPTokenizer

CHUNK_TOKENS = 75  # 77 minus <|startoftext|> and <|endoftext|>
COMMA_LOOKBACK = 20  # split at a comma this close to the chunk boundary, as A1111 does
ROUND_UP, SQUARE_DOWN = 1.1, 1 / 1.1

_TOKEN_RE = re.compile(r"\\[\\()\[\]]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:|\\")
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs; unbalanced brackets are closed at the end."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN_RE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_UP)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_DOWN)
        else:
            for i, part in enumerate(_BREAK_RE.split(token)):
                if i:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for start in round_open:
        scale_from(start, ROUND_UP)
    for start in square_open:
        scale_from(start, SQUARE_DOWN)

    merged: list[tuple[str, float]] = []
    for fragment, weight in pieces:
        if merged and merged[-1][1] == weight and weight != -1.0:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return [(f, w) for f, w in merged if f] or [("", 1.0)]


@dataclass(frozen=True)
class Chunk:
    """One 77-token CLIP window: ids and a per-token emphasis weight."""

    ids: list[int]
    weights: list[float]


def _window(tokenizer: CLIPTokenizer, ids: list[int], weights: list[float]) -> Chunk:
    pad = tokenizer.max_length - 2 - len(ids)
    return Chunk(
        ids=[tokenizer.bos_id, *ids, tokenizer.eos_id] + [tokenizer.pad_id] * pad,
        weights=[1.0, *weights, 1.0] + [1.0] * pad,
    )


def chunk_prompt(tokenizer: CLIPTokenizer, text: str) -> list[Chunk]:
    """Tokenize with emphasis, then cut into 77-token windows. A short prompt gives exactly one window,
    identical to `tokenizer.encode(text)`."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    comma = tokenizer.tokenize(",")[0] if tokenizer.tokenize(",") else None

    def flush(at: int | None = None) -> None:
        nonlocal ids, weights
        cut = len(ids) if at is None else at
        chunks.append(_window(tokenizer, ids[:cut], weights[:cut]))
        ids, weights = ids[cut:], weights[cut:]

    for fragment, weight in parse_emphasis(text):
        if weight == -1.0:  # BREAK
            flush()
            continue
        for token in tokenizer.tokenize(fragment):
            if len(ids) == CHUNK_TOKENS:
                last_comma = max((i for i, t in enumerate(ids) if t == comma), default=-1)
                near = last_comma >= CHUNK_TOKENS - COMMA_LOOKBACK
                flush(last_comma + 1 if near else None)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        flush()
    return chunks


def pad_chunks(chunks: list[Chunk], count: int, empty: Chunk) -> list[Chunk]:
    """Cond and uncond must have the same number of windows to share a batch."""
    return chunks + [empty] * (count - len(chunks))


def apply_emphasis(hidden: mx.array, weights: mx.array) -> mx.array:
    """A1111's emphasis: scale each token's state by its weight, then restore the original mean."""
    if mx.all(weights == 1.0).item():
        return hidden
    original_mean = hidden.mean()
    hidden = hidden * weights
    return hidden * (original_mean / hidden.mean())
