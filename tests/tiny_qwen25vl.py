"""Tiny Qwen2.5-VL references built offline: a byte-level BPE tokenizer with Qwen2.5-VL's added tokens and a
random `Qwen2_5_VLForConditionalGeneration` (language model and vision tower).

Used by test_qwen25vl_text.py (the language model), the vision tower's tests and (next) the Qwen-Image
pipeline tests, so all agree on what "a tiny Qwen2.5-VL" is. Qwen-Image's pipelines format their prompts
themselves (no chat template), so the tokenizer folder carries none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_qwen3 import BPE_VOCAB_SIZE, VOCAB_SIZE, qwen_bpe_tokenizer, randomize

# Qwen2.5-VL's added tokens in its tokenizer.json's order (ids 151643.. there, BPE_VOCAB_SIZE.. here); the
# first 14 are "special", the rest not.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PLAIN_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]


def token_id(token: str) -> int:
    """The tiny tokenizer's id of an added token (test_qwen25vl_text.py checks these against the file)."""
    return BPE_VOCAB_SIZE + (SPECIAL_TOKENS + PLAIN_ADDED_TOKENS).index(token)


def write_qwen25vl_tokenizer(dst: Path) -> Path:
    """A Qwen2.5-VL-style tokenizer in `dst`: tokenizer.json (Qwen's BPE pipeline and Qwen2.5-VL's added
    tokens) and tokenizer_config.json (Qwen2Tokenizer, its specials, right padding)."""
    from tokenizers import AddedToken

    tokenizer = qwen_bpe_tokenizer()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in PLAIN_ADDED_TOKENS])
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "padding_side": "right",
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def qwen25vl_config(text_overrides: dict | None = None, vision_overrides: dict | None = None):
    """A transformers Qwen2_5_VLConfig: the language model 64 wide (4 heads of 16, 2 key/value heads, mRoPE
    runs 2, 3, 3 of its 8 frequencies, as 16, 24, 24 of 64 in Qwen2.5-VL-7B), 2 layers; the vision tower 32 wide
    (2 heads), 4 blocks, full attention in blocks 1 and 3 (windowed in 0 and 2), Qwen2.5-VL's patch (14),
    merge (2) and window (112) sizes, its output as wide as the language model."""
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        pad_token_id=None,
    )
    text.update(text_overrides or {})
    vision = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=text["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1, 3],
        tokens_per_second=2,
        hidden_act="silu",
    )
    vision.update(vision_overrides or {})
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def qwen25vl_model(seed: int = 0, text_overrides: dict | None = None, vision_overrides: dict | None = None):
    """A random transformers Qwen2_5_VLForConditionalGeneration, eval mode, float32 (its config: `.config`).
    Every parameter random, every norm weight (the vision tower's norm1, norm2 and merger ln_q too) around 1."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = randomize(Qwen2_5_VLForConditionalGeneration(qwen25vl_config(text_overrides, vision_overrides)), seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):  # `randomize` centred them on 0
                param.add_(1.0)
    return model
