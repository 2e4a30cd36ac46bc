"""Text encoders as single files hold them -> transformers' names and configs, read from shapes.

CLIP-L, CLIP-G and T5-XXL files (FLUX's and SD3's split files, ComfyUI's bundles) are already in transformers'
names; SD 2.x and SDXL checkpoints keep their OpenCLIP encoders in open_clip's (one packed q/k/v projection,
`ln_1`, `c_fc`...). Qwen3 files (Z-Image's and FLUX.2 klein's qwen_3_4b / qwen_3_8b) are in transformers' names
too; llama.cpp's GGUF files of it are renamed to them as they are read (convert.gguf_source). The head size,
T5's attention reach and Qwen3's rotary base are not in the weights (`ArchitectureHints`; a GGUF's metadata
says the last): where they are not given, the released models' are guesses (`Guess`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlx_sd_server.engine.source import (
    ArchitectureHints,
    CheckpointError,
    FilePart,
    Guess,
    OriginalComponent,
    Tensors,
    count_distinct,
    file_metadata,
    guess,
    known_keys,
    strip_prefix,
)

# Where split files and ComfyUI's bundles keep the text encoders. CLIP: the prefix ends where transformers'
# `text_model.` does (files saved by transformers 5 have none), so a text_projection beside it is left out.
CLIP_L = FilePart(
    "the CLIP-L text encoder (clip_l.safetensors)",
    "embeddings.token_embedding.weight",
    ("text_model.", "", "text_encoders.clip_l.transformer.text_model."),
    "--clip-l",
)
CLIP_G = FilePart(
    "the CLIP-G text encoder (clip_g.safetensors)",
    "embeddings.token_embedding.weight",
    ("text_model.", "", "text_encoders.clip_g.transformer.text_model."),
    "--clip-g",
)
T5_XXL = FilePart(
    "the T5-XXL text encoder (t5xxl_fp16.safetensors)",
    "encoder.block.0.layer.0.SelfAttention.q.weight",
    ("", "text_encoders.t5xxl.transformer."),
    "--t5xxl",
)
# Qwen3: ComfyUI's files hold Qwen3ForCausalLM's names (under `model.`, maybe beside an `lm_head`), others and
# llama.cpp's GGUF files (renamed as read) Qwen3Model's, without a prefix. q_norm: Qwen3's (Qwen2 has none).
QWEN3_LLM = FilePart(
    "the Qwen3 text encoder (e.g. qwen_3_4b.safetensors or Qwen3-4B-Instruct-2507-Q4_K_M.gguf)",
    "layers.0.self_attn.q_norm.weight",
    ("model.", ""),
    "--llm",
)
CLIP_WEIGHTS = ("embeddings.", "encoder.", "final_layer_norm.")  # under `text_model.`
T5_WEIGHTS = ("shared.", "encoder.")
T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # a copy of `shared.weight` some files hold instead of it
CLIP_WIDTHS = (768, 1024, 1280)  # the released CLIPs': OpenAI ViT-L, OpenCLIP ViT-H and bigG
T5_BUCKETS = 32  # every released T5's relative attention buckets (and reach, 128)
QWEN3_WEIGHTS = ("embed_tokens.", "layers.", "norm.")  # Qwen3Model's (under `model.` in a Qwen3ForCausalLM)
QWEN3_LM_HEAD = "lm_head.weight"  # a causal LM's output layer: not an encoder's
QWEN3_WIDTHS = (2560, 4096)  # the released encoders': Qwen3-4B (Z-Image, klein 4B) and Qwen3-8B (klein 9B)
QWEN3_GGUF_ARCHITECTURE = "qwen3"  # llama.cpp's `general.architecture`, and its hyperparameters' prefix
# Every Qwen3's (not in the weights; a GGUF file's metadata says them too)
QWEN3_RMS_NORM_EPS = 1e-6
QWEN3_CONTEXT = 40960  # max_position_embeddings: a bound on prompts, not used by the encoder's computation

OPEN_CLIP_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_FIXED_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}


def clip_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    positions: int,
    hidden_act: str,
    pad_token_id: int | None,
    projection_dim: int | None,
    hints: ArchitectureHints,
) -> dict[str, Any]:
    """transformers' CLIPTextConfig; `projection_dim` None: a CLIPTextModel, without a text_projection."""
    return {
        "architectures": ["CLIPTextModel" if projection_dim is None else "CLIPTextModelWithProjection"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab_size - 2,  # <|startoftext|>, <|endoftext|>: the last two entries of CLIP's vocabulary
        "eos_token_id": vocab_size - 1,
        "hidden_act": hidden_act,
        "hidden_size": hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": positions,
        "model_type": "clip_text_model",
        "num_attention_heads": max(1, hidden_size // hints.value("text_head_dim")),
        "num_hidden_layers": layers,
        "pad_token_id": vocab_size - 1 if pad_token_id is None else pad_token_id,
        "projection_dim": hidden_size if projection_dim is None else projection_dim,
        "vocab_size": vocab_size,
    }


def transformers_clip_config(
    shapes: Tensors, hidden_act: str, pad_token_id: int | None, hints: ArchitectureHints
) -> dict[str, Any]:
    """The config of CLIP weights in transformers' names (`text_model.` ..., and `text_projection.weight` if it
    has a projection)."""
    vocab_size, hidden_size = shapes["text_model.embeddings.token_embedding.weight"].shape
    projection = shapes.get("text_projection.weight")
    return clip_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        layers=count_distinct(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        positions=shapes["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act=hidden_act,
        pad_token_id=pad_token_id,
        projection_dim=None if projection is None else projection.shape[0],
        hints=hints,
    )


def clip_guessed(config: dict[str, Any], hints: ArchitectureHints) -> tuple[Guess, ...]:
    """A CLIP's head count, unless its head size was given: near-certain at the released widths."""
    standard = config["hidden_size"] in CLIP_WIDTHS
    return guess(hints, "text_head_dim", config, "num_attention_heads", standard)


def read_clip(tensors: Tensors, prefix: str, hints: ArchitectureHints, name: str = "CLIP-L") -> OriginalComponent:
    """OpenAI CLIP ViT-L in transformers' names under `prefix`, which ends where `text_model.` does: a
    CLIPTextModel, which pads with <|endoftext|>."""
    keys = known_keys(tensors, prefix, is_clip_weight, name)

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return [("text_model." + key[len(prefix) :], value)]

    shapes = {"text_model." + k[len(prefix) :]: tensors[k] for k in keys}
    config = transformers_clip_config(shapes, "quick_gelu", None, hints)
    return OriginalComponent(config, keys, mapper, guessed=clip_guessed(config, hints))


def read_projected_clip(
    tensors: Tensors, prefix: str, hints: ArchitectureHints, name: str = "CLIP-G"
) -> OriginalComponent:
    """CLIP (OpenCLIP bigG's, as clip_g.safetensors holds it) in transformers' names with its text_projection
    beside `text_model.`, whose pooled, projected output conditions the denoiser. GELU; pads with "!" (id 0)."""
    projection = prefix.removesuffix("text_model.") + "text_projection.weight"
    if projection not in tensors:
        raise CheckpointError(
            f"the {name} text encoder has no {projection}, which this model needs (its pooled, "
            "projected output conditions the denoiser)"
        )
    names = {k: "text_model." + k[len(prefix) :] for k in known_keys(tensors, prefix, is_clip_weight, name)}
    names[projection] = "text_projection.weight"
    config = transformers_clip_config({names[k]: tensors[k] for k in names}, "gelu", 0, hints)
    return OriginalComponent(
        config, list(names), lambda key, value: [(names[key], value)], guessed=clip_guessed(config, hints)
    )


def is_clip_weight(key: str) -> bool:
    """Whether a name under `text_model.` (prefix removed) is a CLIP weight (not its position-id buffer)."""
    return key.startswith(CLIP_WEIGHTS) and not key.endswith("position_ids")


def read_open_clip(tensors: Tensors, prefix: str, penultimate: bool, hints: ArchitectureHints) -> OriginalComponent:
    """OpenCLIP (SD 2.x's ViT-H, SDXL's bigG) in open_clip's names -> transformers' CLIP; it pads with "!" (id 0).

    SD 2.x uses the penultimate layer's output, so diffusers drops the last layer and the projection;
    SDXL's second encoder keeps both (its pooled, projected output conditions the UNet)."""
    clip = strip_prefix(tensors, prefix)
    layers = count_distinct(clip, r"transformer\.resblocks\.(\d+)\.") - (1 if penultimate else 0)

    def targets(key: str) -> list[str] | None:
        """The transformers names of one open_clip weight: [] for one diffusers drops, None if unknown."""
        if key in OPEN_CLIP_FIXED_NAMES:
            return [OPEN_CLIP_FIXED_NAMES[key]]
        if key == "text_projection":
            return [] if penultimate else ["text_projection.weight"]
        if (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", key)) is None:
            return None
        layer, module, param = f"text_model.encoder.layers.{m[1]}.", m[2], m[3]
        if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):  # one packed q/k/v projection -> three
            param = param.removeprefix("in_proj_")
            names = [f"{layer}self_attn.{part}.{param}" for part in ("q_proj", "k_proj", "v_proj")]
        elif module in OPEN_CLIP_NAMES:
            names = [f"{layer}{OPEN_CLIP_NAMES[module]}.{param}"]
        else:
            return None
        return names if int(m[1]) < layers else []

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        names = targets(key[len(prefix) :]) or []
        if len(names) == 3:
            return list(zip(names, np.split(value, 3), strict=True))
        if names == ["text_projection.weight"]:
            value = value.T.copy()  # x @ P -> Linear(P.T)
        return [(name, value) for name in names]

    known = known_keys(tensors, prefix, lambda key: targets(key) is not None, "OpenCLIP")
    vocab_size, hidden_size = clip["token_embedding.weight"].shape
    config = clip_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=clip["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        layers=layers,
        positions=clip["positional_embedding"].shape[0],
        hidden_act="gelu",
        pad_token_id=0,
        projection_dim=None if penultimate else clip["text_projection"].shape[1],
        hints=hints,
    )
    keys = [k for k in known if targets(k[len(prefix) :])]
    return OriginalComponent(config, keys, mapper, guessed=clip_guessed(config, hints))


def t5_config(state: Mapping[str, Any], relative_attention_max_distance: int = 128) -> dict[str, Any]:
    """The transformers T5Config (of a T5EncoderModel) for T5 encoder weights, from shapes. T5 v1.1 (FLUX's and
    SD3's T5-XXL) has a gated-GELU feed-forward (wi_0, wi_1), v1.0 a ReLU one (wi); the attention's maximum
    relative distance is not in the weights (128 in every released T5)."""
    block = "encoder.block.0.layer."
    vocab_size, d_model = state["shared.weight" if "shared.weight" in state else T5_TIED_EMBEDDING].shape
    buckets, heads = state[f"{block}0.SelfAttention.relative_attention_bias.weight"].shape
    gated = f"{block}1.DenseReluDense.wi_0.weight" in state
    d_ff = state[f"{block}1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0]
    layers = count_distinct(state, r"encoder\.block\.(\d+)\.")
    return {
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": d_ff,
        "d_kv": state[f"{block}0.SelfAttention.q.weight"].shape[0] // heads,
        "d_model": d_model,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new" if gated else "relu",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": gated,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": layers,
        "num_heads": heads,
        "num_layers": layers,
        "pad_token_id": 0,
        "relative_attention_max_distance": relative_attention_max_distance,
        "relative_attention_num_buckets": buckets,
        "tie_word_embeddings": False,
        "vocab_size": vocab_size,
    }


def read_t5(tensors: Tensors, prefix: str, hints: ArchitectureHints) -> OriginalComponent:
    """T5's encoder in transformers' names. The token embedding is `shared.weight`; files that also hold its
    tied copy have it dropped, those holding only the copy have it renamed."""
    keys = known_keys(tensors, prefix, lambda k: k.startswith(T5_WEIGHTS), "T5")
    if prefix + "shared.weight" in tensors and prefix + T5_TIED_EMBEDDING in keys:
        keys.remove(prefix + T5_TIED_EMBEDDING)

    def name(key: str) -> str:
        rest = key[len(prefix) :]
        return "shared.weight" if rest == T5_TIED_EMBEDDING else rest

    config = t5_config({name(k): tensors[k] for k in keys}, hints.value("t5_max_distance"))
    standard = config["relative_attention_num_buckets"] == T5_BUCKETS
    guessed = guess(hints, "t5_max_distance", config, "relative_attention_max_distance", standard)
    return OriginalComponent(config, keys, lambda key, value: [(name(key), value)], guessed=guessed)


def gguf_hyperparameters(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A llama.cpp Qwen3 GGUF file's hyperparameters (`qwen3.rope.freq_base`, ..., their prefix removed); none
    for other files."""
    if metadata.get("general.architecture") != QWEN3_GGUF_ARCHITECTURE:
        return {}
    prefix = QWEN3_GGUF_ARCHITECTURE + "."
    return {key[len(prefix) :]: value for key, value in metadata.items() if key.startswith(prefix)}


def qwen3_config(shapes: Tensors, gguf: Mapping[str, Any], hints: ArchitectureHints) -> dict[str, Any]:
    """The transformers Qwen3Config (of a Qwen3Model) for Qwen3 weights in Qwen3Model's names, from shapes (the
    q/k norms' width is the head size), and where shapes cannot tell, from a llama.cpp GGUF file's
    hyperparameters (`gguf`). The rotary base: the `llm_rope_theta` hint where given, else the file's, else the
    released models'."""
    vocab_size, hidden_size = shapes["embed_tokens.weight"].shape
    attention = "layers.0.self_attn."
    head_dim = shapes[f"{attention}q_norm.weight"].shape[0]
    scaling = gguf.get("rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"this Qwen3 text encoder scales its rotary embedding ({scaling}): not supported")
    rope_theta = hints.llm_rope_theta or gguf.get("rope.freq_base") or hints.value("llm_rope_theta")
    return {
        "architectures": ["Qwen3Model"],
        "attention_bias": f"{attention}q_proj.bias" in shapes,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"].shape[0],
        "max_position_embeddings": int(gguf.get("context_length", QWEN3_CONTEXT)),
        "model_type": "qwen3",
        "num_attention_heads": shapes[f"{attention}q_proj.weight"].shape[0] // head_dim,
        "num_hidden_layers": count_distinct(shapes, r"layers\.(\d+)\."),
        "num_key_value_heads": shapes[f"{attention}k_proj.weight"].shape[0] // head_dim,
        "rms_norm_eps": float(gguf.get("attention.layer_norm_rms_epsilon", QWEN3_RMS_NORM_EPS)),
        "rope_theta": float(rope_theta),
        "tie_word_embeddings": True,  # (the encoder has no output layer to tie)
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def read_qwen3(tensors: Tensors, prefix: str, hints: ArchitectureHints) -> OriginalComponent:
    """Qwen3 as a text encoder (transformers' Qwen3Model) from weights in Qwen3Model's names under `prefix`
    (`QWEN3_LLM`'s); an LM head beside them is left out. Its rotary base is a guess where neither the
    `llm_rope_theta` hint nor a GGUF file's metadata gives it."""
    known = known_keys(tensors, prefix, lambda k: k.startswith(QWEN3_WEIGHTS) or k == QWEN3_LM_HEAD, "Qwen3")
    keys = [k for k in known if k != prefix + QWEN3_LM_HEAD]

    def mapper(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return [(key[len(prefix) :], value)]

    gguf = gguf_hyperparameters(file_metadata(tensors))
    config = qwen3_config({k[len(prefix) :]: tensors[k] for k in keys}, gguf, hints)
    standard = config["hidden_size"] in QWEN3_WIDTHS
    guessed = () if "rope.freq_base" in gguf else guess(hints, "llm_rope_theta", config, "rope_theta", standard)
    return OriginalComponent(config, keys, mapper, guessed=guessed)
