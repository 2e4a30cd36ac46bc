"""Tiny Qwen3 references built offline: a byte-level BPE tokenizer laid out as Qwen3's and random Qwen3 models.

Used by test_qwen3.py and (next) by the Z-Image and FLUX.2 klein pipeline tests, so all agree on what "a tiny
Qwen3" is. The tokenizer folder carries a tokenizer_config.json with Qwen3's chat template, so that
transformers' `Qwen2TokenizerFast.from_pretrained` (what diffusers' pipelines load) can apply it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_t5 import WORDS

# The chat template of the released hybrid-thinking Qwen3 models (Qwen/Qwen3-4B, Qwen3-8B: Z-Image's and
# FLUX.2 klein's text encoders), from their tokenizer_config.json. No copy ships in the installed packages
# (transformers, diffusers, tokenizers), so it is reproduced here from the released file.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 (the released text)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # in Qwen's order, after the BPE vocabulary
THINK_TOKENS = ["<think>", "</think>"]  # added tokens that are not "special" in Qwen3's files
BPE_VOCAB_SIZE = 900  # 256 byte symbols and ~640 merges
VOCAB_SIZE = 1000  # the tiny models' embedding rows: more than the tokenizer's ids (BPE + 5 added tokens)


def corpus() -> list[str]:
    """Sentences over tiny_t5's word list, with punctuation, digits and newlines, to learn merges from."""
    words = list(dict.fromkeys(WORDS))
    lines = [" ".join(words[i : i + 9]) for i in range(0, len(words), 9)]
    return lines + [f"{line.capitalize()}, {i} times!\n\n" for i, line in enumerate(lines)] + ["user\nassistant\n\n"]


def qwen_bpe_tokenizer():
    """A `tokenizers.Tokenizer` laid out as Qwen's (NFC, Qwen2's regex split, byte-level BPE trained on
    `corpus()`), without added tokens: Qwen3's and Qwen2.5-VL's (tiny_qwen25vl.py) tiny tokenizers add theirs."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # Qwen's split, as in its files

    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                              byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def write_qwen3_tokenizer(dst: Path) -> Path:
    """A Qwen3-style tokenizer in `dst`: tokenizer.json (NFC, Qwen2's regex split, byte-level BPE, the added
    tokens) and tokenizer_config.json (Qwen2Tokenizer, Qwen3's specials and chat template)."""
    from tokenizers import AddedToken

    tokenizer = qwen_bpe_tokenizer()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
              "chat_template": QWEN3_CHAT_TEMPLATE}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def qwen3_config(**overrides):
    """Heads x head_dim (4 x 24) unlike the hidden size (64), as in Qwen3-4B (32 x 128 against 2560)."""
    from transformers import Qwen3Config

    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=1_000_000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=None)
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random, norm weights around 1: all-ones norms would hide a missing or misplaced one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def qwen3_model(seed: int = 0, causal_lm: bool = False, **overrides):
    """A random transformers Qwen3Model (or Qwen3ForCausalLM), eval mode, float32."""
    from transformers import Qwen3ForCausalLM, Qwen3Model

    model_class = Qwen3ForCausalLM if causal_lm else Qwen3Model
    return randomize(model_class(qwen3_config(**overrides)), seed)
