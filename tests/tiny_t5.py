"""Tiny T5 v1.1 references built offline: a real (small) Unigram tokenizer and random T5 encoders.

Used by test_t5.py and by the FLUX pipeline tests, so all agree on what "a tiny T5" is.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in every T5 vocabulary
EXTRA_IDS = 100  # the <extra_id_N> sentinels real T5 vocabularies end with (ids in reverse order)

WORDS = """
a an the of in on at to for from with by and or but not no is are was were be been being has have had do does
did this that these those it its he she they we you i me my your our their his her them us there here what
which who whom whose when where why how all any both each few more most other some such only own same so than
too very can will just should now one two three four five six seven eight nine ten first last new old good
bad big small large little long short high low young great right left up down over under out off again then
once man woman men women child children person people boy girl dog dogs cat cats bird birds fish horse cow
tree trees flower flowers grass forest mountain mountains river lake sea ocean beach sky cloud clouds sun
moon star stars rain snow wind fire water stone rock sand city town street road house houses building room
window door wall table chair bed car cars train boat ship plane bridge castle tower garden park field farm
photo photograph picture painting drawing sketch portrait landscape style art artist detailed highly quality
best realistic photorealistic cinematic lighting light dark shadow night day morning evening sunset sunrise
red green blue yellow orange purple pink brown black white gray grey golden silver color colors colorful
bright soft sharp focus background foreground close view wide angle lens camera shot macro hdr 4k 8k ultra
beautiful pretty cute happy sad angry smiling standing sitting walking running flying holding wearing
looking eating playing reading writing sleeping dress shirt hat coat shoes glasses hair eyes face hand
hands head body robot astronaut knight wizard dragon monster alien space planet galaxy future futuristic
ancient medieval modern vintage retro fantasy magic oil watercolor digital anime cartoon render 3d sign
text says word words book paper glass metal wood wooden gold iron
""".split()
SUFFIXES = ["s", "es", "ed", "ing", "er", "est", "ly", "ion", "al", "ful", "ness", "ment", "y", "en", "ic"]
CHARACTERS = [chr(c) for c in range(33, 127)]  # every printable ASCII character but the space


def tokenizer_pieces() -> list[tuple[str, float]]:
    """(piece, log-probability score) in id order: specials, "▁", words, suffixes, characters, sentinels.

    Whole words score better than their spellings, so common words are one piece and anything else
    (in ASCII) still tokenizes, as single characters; other characters are <unk>.
    """
    scores = {t: 0.0 for t in SPECIALS} | {"▁": -3.0}
    for i, word in enumerate(dict.fromkeys(WORDS)):
        scores.setdefault(f"▁{word}", -5.0 - 0.01 * i)
    for i, suffix in enumerate(SUFFIXES):
        scores.setdefault(suffix, -8.0 - 0.01 * i)
    for i, char in enumerate(CHARACTERS):
        scores.setdefault(char, -10.0 - 0.001 * i)
        scores.setdefault(f"▁{char}", -9.0 - 0.001 * i)
    pieces = list(scores.items())
    return pieces + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]


def write_t5_tokenizer(dst: Path) -> Path:
    """A T5-style Unigram tokenizer.json in `dst`, laid out as transformers' T5Tokenizer builds one.

    No normalizer: real T5 files carry SentencePiece's precompiled charsmap, which cannot be built here
    (transformers keeps only that normalizer when it rebuilds the tokenizer from the file).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = tokenizer_pieces()
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    sentinels = [p for p, _ in pieces if p.startswith("<extra_id_")]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS + sentinels])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    return dst


def t5_vocab_size() -> int:
    return len(tokenizer_pieces())


def t5_config(gated: bool = True, **overrides):
    from transformers import T5Config

    kwargs = dict(
        vocab_size=t5_vocab_size(),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )
    kwargs.update(overrides)
    return T5Config(**kwargs)


def t5_encoder(seed: int = 0, gated: bool = True, **overrides):
    """A random transformers T5EncoderModel (eval mode); its layer-norm weights are randomised too
    (transformers initialises them to 1, which would hide a missing or misplaced norm weight)."""
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(t5_config(gated, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
    return model
