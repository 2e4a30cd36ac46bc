"""Prompt syntax as A1111 users write it: emphasis weights and prompts longer than one CLIP window.

`(word)` multiplies attention by 1.1, `[word]` divides by 1.1, `(word:1.3)` sets 1.3; `\\(` is a literal
bracket; `BREAK` starts a new 75-token chunk. Long prompts are split into chunks of 75 tokens (at the
last comma when one is near the boundary), each encoded as its own 77-token window, and the windows'
embeddings are concatenated.

A prompt is client input, so its syntax is checked rather than trusted: a malformed weight (`(cat:1.2.3)`),
brackets nested deeper than `MAX_NESTING` or a weight beyond `MAX_WEIGHT` is a `JobError`, and
`check_prompt` (called by `build_job`, before a job is queued) bounds the number of windows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from mlx_sd_server.engine.errors import JobError, shown
from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path

if TYPE_CHECKING:
    import mlx.core as mx

CHUNK_TOKENS = 75  # 77 minus <|startoftext|> and <|endoftext|>
COMMA_LOOKBACK = 20  # split at a comma this close to the chunk boundary, as A1111 does
MIN_CHUNK_TOKENS = CHUNK_TOKENS - COMMA_LOOKBACK + 1  # a chunk cut before the end of its text holds at least this
ROUND_UP, SQUARE_DOWN = 1.1, 1 / 1.1
MAX_NESTING = 32  # brackets open at once; nobody means more, and it keeps parsing linear
MAX_WEIGHT = 1000.0  # |weight| after nesting multiplies; beyond it the text encoder's states overflow

# A weight is matched loosely (as A1111 does) so that a malformed one is refused rather than read as text.
_TOKEN_RE = re.compile(r"\\[\\()\[\]]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:|\\")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


class Break(str):
    """The BREAK marker in `parse_emphasis`'s output: ("BREAK", -1.0), as A1111 writes it, but told apart from
    text by its type, so that neither brackets around it nor a (text:-1) weight can change what it is."""


BREAK = Break("BREAK")


class PromptSyntaxError(JobError):
    def __init__(self, message: str):
        super().__init__(message, "prompt", "invalid_prompt")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs; unbalanced brackets are closed at the end. A BREAK is
    (`BREAK`, -1.0), its fragment a `Break`. Raises PromptSyntaxError for a weight that is not a number,
    brackets nested deeper than MAX_NESTING, or a weight beyond MAX_WEIGHT."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:  # at most MAX_NESTING ranges cover a piece: linear overall
            if not isinstance(piece[0], Break):
                piece[1] *= factor

    def open_at(brackets: list[int], token: str) -> None:
        if len(round_open) + len(square_open) >= MAX_NESTING:
            raise PromptSyntaxError(
                f"brackets are nested more than {MAX_NESTING} deep (escape a literal one as \\{token})"
            )
        brackets.append(len(pieces))

    for match in _TOKEN_RE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            open_at(round_open, "(")
        elif token == "[":
            open_at(square_open, "[")
        elif weight is not None and round_open:
            if not _NUMBER_RE.fullmatch(weight):
                raise PromptSyntaxError(f"emphasis weight {shown(weight)} is not a number (write (text:1.2))")
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_UP)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_DOWN)
        else:
            for i, part in enumerate(_BREAK_RE.split(token)):
                if i:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in round_open:
        scale_from(start, ROUND_UP)
    for start in square_open:
        scale_from(start, SQUARE_DOWN)

    merged: list[tuple[str, float]] = []
    run: list[str] = []  # fragments of equal weight, joined once (no quadratic concatenation)
    run_weight = 1.0
    for fragment, weight in pieces:
        if fragment and not isinstance(fragment, Break) and abs(weight) > MAX_WEIGHT:
            raise PromptSyntaxError(f"emphasis weight {weight:g} (after nesting) is beyond ±{MAX_WEIGHT:g}")
        if run and (isinstance(fragment, Break) or weight != run_weight):
            merged.append(("".join(run), run_weight))
            run = []
        if isinstance(fragment, Break):
            merged.append((fragment, weight))
        else:
            run.append(fragment)
            run_weight = weight
    if run:
        merged.append(("".join(run), run_weight))
    return [(f, w) for f, w in merged if f] or [("", 1.0)]


def check_prompt(text: str, param: str, max_chunks: int) -> None:
    """Refuse (JobError on `param`) a prompt with bad emphasis syntax or more than `max_chunks` windows as
    `chunk_prompt` cuts them with CLIP's tokenizer (the vocabulary every SD model's text encoders share).
    Short prompts are passed on an upper bound (a token holds at least one byte of the normalised text)
    without tokenizing; only a long one is tokenized, with the packaged vocabulary."""
    try:
        pieces = parse_emphasis(text)
    except PromptSyntaxError as error:
        raise JobError(f"{param}: {error.message}", param, error.code) from None
    breaks = sum(isinstance(fragment, Break) for fragment, _ in pieces)
    if breaks > max_chunks:  # every BREAK ends a window
        raise JobError(
            f"{param} has {breaks} BREAKs, so at least {breaks} chunks of {CHUNK_TOKENS} tokens: over "
            f"this server's limit of {max_chunks}",
            param,
            "prompt_too_long",
        )
    bound, tokens = 0, 0
    for fragment, _ in pieces:
        if isinstance(fragment, Break):
            bound, tokens = bound + tokens // MIN_CHUNK_TOKENS + 1, 0
        else:
            tokens += len(unicodedata.normalize("NFC", fragment).lower().encode("utf-8"))
    if bound + tokens // MIN_CHUNK_TOKENS + 1 <= max_chunks:
        return
    chunks = len(chunk_prompt(_counting_tokenizer(), text))
    if chunks > max_chunks:
        raise JobError(
            f"{param} is {chunks} chunks of {CHUNK_TOKENS} tokens, over this server's limit of "
            f"{max_chunks} (each BREAK starts a new chunk)",
            param,
            "prompt_too_long",
        )


@lru_cache(maxsize=1)
def _counting_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file(default_vocab_path())


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
        if isinstance(fragment, Break):
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
    import mlx.core as mx  # here, so that checking a prompt (build_job) needs no MLX

    if mx.all(weights == 1.0).item():
        return hidden
    original_mean = hidden.mean()
    hidden = hidden * weights
    return hidden * (original_mean / hidden.mean())


def sequence_pieces(text: str) -> list[tuple[str, float]]:
    """A prompt's (fragment, weight) pieces for an encoder that reads it as one sequence (T5, and SD3's CLIPs):
    BREAK starts a new CLIP window on SD; here it is a word break."""
    return [(" ", 1.0) if fragment is BREAK else (fragment, weight) for fragment, weight in parse_emphasis(text)]


def weighted_ids(tokenizer: Any, pieces: list[tuple[str, float]], length: int) -> tuple[list[int], list[float]]:
    """`length` ids with a weight each: the text's, truncated to leave room for the end token, then the end
    token and padding (T5's framing; CLIP's after its start token). Unweighted text is tokenized whole,
    exactly as diffusers; weighted text fragment by fragment."""
    if all(weight == 1.0 for _, weight in pieces):
        ids = tokenizer.tokenize("".join(fragment for fragment, _ in pieces))
        weights = [1.0] * len(ids)
    else:
        ids, weights = [], []
        for fragment, weight in pieces:
            tokens = tokenizer.tokenize(fragment)
            ids += tokens
            weights += [weight] * len(tokens)
    ids, weights = ids[: length - 1], weights[: length - 1]
    padding = length - 1 - len(ids)
    return ids + [tokenizer.eos_id] + [tokenizer.pad_id] * padding, weights + [1.0] * (padding + 1)


TEMPLATE_SLOT = "\0"  # where the prompt goes in a template, to tokenize the template's parts around weighted text


def templated_ids(
    tokenizer: Any, text: str, template: Callable[[str], str], max_length: int
) -> tuple[list[int], list[float]]:
    """`template(text)` (a chat template around the prompt) as at most `max_length` ids with a weight each.
    Unweighted text is tokenized whole, exactly as diffusers; weighted text piece by piece, the template's own
    parts at weight 1."""
    pieces = sequence_pieces(text)
    if all(weight == 1.0 for _, weight in pieces):
        ids = tokenizer.tokenize(template("".join(fragment for fragment, _ in pieces)))
        return ids[:max_length], [1.0] * min(len(ids), max_length)
    head, tail = template(TEMPLATE_SLOT).split(TEMPLATE_SLOT)
    ids, weights = [], []
    for fragment, weight in [(head, 1.0), *pieces, (tail, 1.0)]:
        tokens = tokenizer.tokenize(fragment)
        ids += tokens
        weights += [weight] * len(tokens)
    return ids[:max_length], weights[:max_length]


def emphasised(states: mx.array, weights: Sequence[list[float]]) -> mx.array:
    """A1111 emphasis on each prompt's token states (B, L, D), with that prompt's weight per token."""
    import mlx.core as mx

    return mx.stack([apply_emphasis(s, mx.array(w)[:, None]) for s, w in zip(states, weights)])
