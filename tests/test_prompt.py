"""A1111 prompt syntax (engine/prompt.py): emphasis, BREAK, chunking, and the checks that make a prompt safe to
queue (malformed weights, nesting, the chunk limit counted exactly as the encoder cuts)."""

from __future__ import annotations

import random
import time

import pytest

from mlx_sd_server.engine.text.prompt import (
    BREAK, CHUNK_TOKENS, MAX_NESTING, Break, check_prompt, chunk_prompt, parse_emphasis,
)
from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path
from mlx_sd_server.job import JobError


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_file(default_vocab_path())


def test_a1111_emphasis():
    assert parse_emphasis("a (b) [c] (d:1.5) \\(e\\)") == [
        ("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1 / 1.1), (" ", 1.0), ("d", 1.5), (" (e)", 1.0)]
    assert parse_emphasis("((a))") == [("a", 1.1 * 1.1)]
    assert parse_emphasis("(a") == [("a", 1.1)]  # unbalanced: closed at the end
    assert parse_emphasis("a) b]") == [("a) b]", 1.0)]
    assert parse_emphasis("time 10:30, (ratio 16:9.)") == [("time 10:30, ", 1.0), ("ratio 16", 9.0)]
    assert parse_emphasis("") == [("", 1.0)]


def test_break_is_a_marker_that_brackets_do_not_change():
    pieces = parse_emphasis("a BREAK (b BREAK c)")
    assert pieces == [("a", 1.0), ("BREAK", -1.0), ("b", 1.1), ("BREAK", -1.0), ("c", 1.1)]
    assert [isinstance(fragment, Break) for fragment, _ in pieces] == [False, True, False, True, False]
    assert not isinstance(parse_emphasis("BREAKING")[0][0], Break)
    assert BREAK == "BREAK"


def test_a_minus_one_weight_is_text_not_a_break(tokenizer):
    assert parse_emphasis("(cat:-1)") == [("cat", -1.0)]
    [chunk] = chunk_prompt(tokenizer, "(cat:-1)")
    cat = tokenizer.tokenize("cat")
    assert chunk.ids[1:1 + len(cat)] == cat and chunk.weights[1] == -1.0


@pytest.mark.parametrize("text", ["(cat:.)", "(cat:1.2.3)", "(cat:...)", "(cat:-.)", "(cat: 1.. )", "[(a:.5.)]",
                                  "((a:0.5):..)"])
def test_malformed_weights_are_refused(text):
    with pytest.raises(JobError) as caught:
        parse_emphasis(text)
    assert (caught.value.param, caught.value.code) == ("prompt", "invalid_prompt")
    assert "not a number" in caught.value.message


@pytest.mark.parametrize("text, weight", [("(a:1.)", 1.0), ("(a:.5)", 0.5), ("(a:+2)", 2.0), ("(a:-0.25)", -0.25),
                                          ("(a: 3 )", 3.0)])
def test_well_formed_weights(text, weight):
    assert parse_emphasis(text) == [("a", weight)]


def test_nesting_and_weights_are_bounded():
    assert parse_emphasis("(" * MAX_NESTING + "a")[0][0] == "a"
    for text in ("(" * (MAX_NESTING + 1) + "a", "[(" * (MAX_NESTING // 2 + 1), "(a:1000.5)", "((a:40):40)"):
        with pytest.raises(JobError):
            parse_emphasis(text)
    assert parse_emphasis("(a:1000)") == [("a", 1000.0)]


def test_parsing_the_worst_prompts_is_fast():
    for text in ("(a" * 5000, "(a" * 31 + ")a" * 4900, "[a(b" * 2500, "a:" * 5000, "\\(" * 5000, "BREAK " * 1666):
        started = time.monotonic()
        try:
            parse_emphasis(text)
        except JobError:
            pass
        assert time.monotonic() - started < 0.5, text[:20]


def check(text: str, max_chunks: int) -> bool:
    try:
        check_prompt(text, "prompt", max_chunks)
    except JobError as error:
        assert error.code == "prompt_too_long" and error.param == "prompt"
        return False
    return True


def test_check_prompt_agrees_with_the_encoder_cut(tokenizer):
    """Passed on the quick bound or counted with the tokenizer, the verdict is what chunk_prompt gives."""
    rng = random.Random(0)
    words = ["a", "cat", "photo,", "masterpiece", "(best quality:1.2),", "[blurry]", "BREAK", "東京", "🐱", ",", "x" * 30,
             "highly detailed", "\\(literal\\)"]
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 220)))
        chunks = len(chunk_prompt(tokenizer, text))
        for limit in (1, 2, 3, chunks - 1, chunks, chunks + 1):
            if limit >= 1:
                assert check(text, limit) == (chunks <= limit), (text, limit, chunks)


def test_check_prompt_counts_breaks_and_names_the_field():
    assert check("a BREAK " * 16, 16)
    assert not check("a BREAK " * 17, 16)
    with pytest.raises(JobError) as caught:
        check_prompt("BREAK " * 100, "negative_prompt", 16)
    assert (caught.value.param, caught.value.code) == ("negative_prompt", "prompt_too_long")
    with pytest.raises(JobError) as caught:
        check_prompt("(a:1.2.3)", "negative_prompt", 16)
    assert (caught.value.param, caught.value.code) == ("negative_prompt", "invalid_prompt")


def test_whitespace_is_free_and_long_words_are_counted(tokenizer):
    assert check("a cat" + " " * 9995, 1)  # the quick bound says maybe; the tokenizer says one chunk
    text = "a, " * 100  # 200 tokens: 3 chunks
    assert len(chunk_prompt(tokenizer, text)) == 3 and check(text, 3) and not check(text, 2)
    assert CHUNK_TOKENS == 75
