"""Z-Image's and Qwen3's files as their users have them, written from tiny diffusers/transformers models.

- the transformer in Tongyi-MAI's / ComfyUI's layout (`z_image_turbo_bf16.safetensors`, bare or under
  `model.diffusion_model.`): diffusers' names but for the per-patch-size embedders, the fused q/k/v projection
  and the attention's output and q/k norms, plus the RMSNorm ComfyUI's NextDiT carries unused (`norm_final`).
  Written here as the inverse of diffusers' conversion, independently of the reader (and checked against
  diffusers' own converter by the tests);
- Qwen3 as ComfyUI's `qwen_3_4b.safetensors` holds it (Qwen3ForCausalLM names: `model.`, an `lm_head`);
- Qwen3 as llama.cpp's convert_hf_to_gguf.py writes it: architecture `qwen3`, its tensor names (q and k
  unpermuted for Qwen3), its `qwen3.*` hyperparameters and its `tokenizer.ggml.*` vocabulary (normal tokens,
  the added ones as CONTROL when special, else USER_DEFINED, the embedding's extra rows as UNUSED `[PAD{i}]`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType

from gguf_layout import encode

COMFYUI_PREFIX = "model.diffusion_model."
EMBEDDER = "2-1"  # the tiny transformer's patch sizes: 2x2, one frame

# diffusers' names -> the original's (whole-name parts, replaced in this order)
ORIGINAL_NAMES = (
    (f"all_x_embedder.{EMBEDDER}.", "x_embedder."),
    (f"all_final_layer.{EMBEDDER}.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
QKV = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")

LLAMA_CPP_QWEN3 = {  # transformers' Qwen3Model names -> llama.cpp's
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}


def original_transformer_state(transformer, prefix: str = "") -> dict[str, np.ndarray]:
    """A diffusers ZImageTransformer2DModel's weights in the original layout, under `prefix`."""
    state = numpy_state(transformer)
    out = {}
    for key, value in state.items():
        if key.endswith(QKV[1:]):
            continue
        if key.endswith(QKV[0]):
            block = key.removesuffix(QKV[0])
            out[block + ".attention.qkv.weight"] = np.concatenate([state[block + part] for part in QKV])
            continue
        for new, old in ORIGINAL_NAMES:
            key = key.replace(new, old)
        out[key] = value
    dim = transformer.config.dim
    out["norm_final.weight"] = np.random.default_rng(7).standard_normal(dim).astype(np.float32)  # never applied
    return {prefix + key: value for key, value in out.items()}


def write_original_transformer(transformer, path: Path, prefix: str = "") -> Path:
    from safetensors.numpy import save_file

    save_file(original_transformer_state(transformer, prefix), str(path))
    return Path(path)


def comfyui_qwen3_state(qwen3_model, lm_head: bool = True) -> dict[str, np.ndarray]:
    """A transformers Qwen3Model's weights as qwen_3_4b.safetensors holds them: under `model.`, with an LM head."""
    out = {"model." + key: value for key, value in numpy_state(qwen3_model).items()}
    if lm_head:
        rows, width = out["model.embed_tokens.weight"].shape
        out["lm_head.weight"] = np.random.default_rng(8).standard_normal((rows, width)).astype(np.float32)
    return out


def llama_cpp_qwen3_name(name: str) -> str:
    """A transformers Qwen3Model (or Qwen3ForCausalLM) name -> llama.cpp's."""
    name = name.removeprefix("model.")
    fixed = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, layer, rest = name.split(".", 2)
    module, _, param = rest.rpartition(".")
    return f"blk.{layer}.{LLAMA_CPP_QWEN3[module]}.{param}"


def tokenizer_vocabulary(tokenizer_json: Path, rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's converter lists a Qwen tokenizer for an embedding of `rows`."""
    document = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    by_id = {i: (token, TokenType.NORMAL) for token, i in document["model"]["vocab"].items()}
    for added in document["added_tokens"]:
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    tokens, types = zip(*(by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(rows)), strict=True)
    merges = [m if isinstance(m, str) else " ".join(m) for m in document["model"]["merges"]]
    return list(tokens), [int(t) for t in types], merges


def write_llama_cpp_qwen3(qwen3_model, path: Path, type_name: str, tokenizer_json: Path | None,
                          chat_template: str | None = None, seed: int = 0) -> Path:
    """A transformers Qwen3Model as llama.cpp's convert_hf_to_gguf.py (and llama-quantize to `type_name`)
    writes it: tied embeddings, so no `output.weight`."""
    config = qwen3_model.config
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "qwen3")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if tokenizer_json is not None:
        tokens, types, merges = tokenizer_vocabulary(tokenizer_json, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
    for name, value in numpy_state(qwen3_model).items():
        data, written = encode(name, value, type_name, rng)
        if data.dtype == np.uint8:
            writer.add_tensor(llama_cpp_qwen3_name(name), data, raw_shape=data.shape,
                              raw_dtype=GGMLQuantizationType[written])
        else:
            writer.add_tensor(llama_cpp_qwen3_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
