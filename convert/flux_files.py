"""FLUX.1 (schnell, dev) from the files its users have, read into diffusers layout.

FLUX is usually downloaded as four files, each in its original layout:

    flux1-dev.safetensors / flux1-schnell.safetensors  -> transformer     (Black Forest Labs' names; ComfyUI saves
                                                                           them under `model.diffusion_model.`)
    ae.safetensors                                     -> vae             (the LDM autoencoder layout, no quant convs)
    clip_l.safetensors                                 -> text_encoder    (transformers CLIPTextModel names)
    t5xxl_fp16.safetensors (or bf16, fp8_e4m3fn)       -> text_encoder_2  (transformers T5EncoderModel names)

ComfyUI's all-in-one checkpoints hold all four in one file, under `model.diffusion_model.`, `vae.` or
`first_stage_model.`, `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.`.

As for single-file SD checkpoints (convert.checkpoint), each component's config.json is inferred from tensor
shapes. The transformer and T5 weights (24 GB and 9.5 GB in bf16) are read one tensor at a time, as they are
converted: MLX loads safetensors lazily, and each tensor is let go once it has been handed on.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from convert.checkpoint import (
    ArchitectureHints, CheckpointError, _count, _float32, _text_config, convert_vae, read_state_dict,
)
from convert.source import SourceModel

log = logging.getLogger(__name__)

# The released repos' scheduler_config.json (FlowMatchEulerDiscreteScheduler). dev, guidance-distilled, shifts
# its sigmas by the image size; schnell, timestep-distilled for 1-4 steps, does not shift them.
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                      "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
                          "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}

# The split files carry no T5 tokenizer; schnell's repo is public (dev's is gated) and both use the same one.
T5_TOKENIZER_REPO = "black-forest-labs/FLUX.1-schnell"
T5_TOKENIZER_FILE = "tokenizer_2/tokenizer.json"

DEFAULT_AXES_DIMS_ROPE = [16, 56, 56]  # the rotary embedding's (index, height, width) split of FLUX's 128 head dims

# Per component: what it is (for messages), a key only it has, where it may sit in a file (split files have
# it at the top, ComfyUI's bundles under a prefix), and which keys under that prefix are its weights (their
# beginnings, or a test of the key). CLIP-L and T5-XXL are SD3's too (convert.sd3_files).
# CLIP: the prefix ends where transformers' `text_model.` does, so a text_projection beside it is left out.
CLIP_L = ("the CLIP-L text encoder (clip_l.safetensors)", "embeddings.token_embedding.weight",
          ("text_model.", "", "text_encoders.clip_l.transformer.text_model."),
          ("embeddings.", "encoder.", "final_layer_norm."))
T5_XXL = ("the T5-XXL text encoder (t5xxl_fp16.safetensors)", "encoder.block.0.layer.0.SelfAttention.q.weight",
          ("", "text_encoders.t5xxl.transformer."), ("shared.", "encoder."))
COMPONENTS = {
    "transformer": ("the FLUX transformer (flux1-dev.safetensors or flux1-schnell.safetensors)",
                    "double_blocks.0.img_attn.qkv.weight", ("", "model.diffusion_model."),
                    lambda rest: is_bfl_transformer_key(rest)),
    "vae": ("the FLUX autoencoder (ae.safetensors)",
            "encoder.down.0.block.0.conv1.weight", ("", "vae.", "first_stage_model."), None),
    "text_encoder": CLIP_L,
    "text_encoder_2": T5_XXL,
}

# The command-line option (stable-diffusion.cpp's) that gives each component as its own file.
OPTIONS = {"transformer": "--diffusion-model", "vae": "--vae", "text_encoder": "--clip-l", "text_encoder_2": "--t5xxl"}

# --- the BFL transformer layout ---------------------------------------------------------------------------

# BFL module -> diffusers FluxTransformer2DModel module. A tuple is a fused projection, split along its output
# axis into hidden-size parts (the last part takes the rest: the single blocks' MLP input).
FLUX_NAMES: dict[str, str | tuple[str, ...]] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
DOUBLE_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
SINGLE_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
BLOCKS = {"double_blocks": ("transformer_blocks", DOUBLE_BLOCK_NAMES),
          "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK_NAMES)}
PARAM_NAMES = {"scale": "weight"}  # the RMSNorms' parameter
# BFL's final modulation outputs (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
SHIFT_SCALE_MODULES = {"final_layer.adaLN_modulation.1"}
BFL_PREFIX = "model.diffusion_model."


def _bfl_target(module: str) -> tuple[str, str | tuple[str, ...]] | None:
    """A BFL module name -> (diffusers block prefix, diffusers module name or fused parts); None if unknown."""
    if m := re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", module):
        block, names = BLOCKS[m[1]]
        target = names.get(m[3])
        return None if target is None else (f"{block}.{m[2]}.", target)
    target = FLUX_NAMES.get(module)
    return None if target is None else ("", target)


def is_bfl_transformer_key(key: str) -> bool:
    return _bfl_target(key.removeprefix(BFL_PREFIX).rpartition(".")[0]) is not None


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a .safetensors or .gguf file's header; none if it is not one or is unreadable (the
    single-file reader then says what is wrong)."""
    if path.suffix == ".gguf":
        from convert.gguf_source import read_gguf

        try:
            return list(read_gguf(path)[0])
        except CheckpointError:
            return []
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                return list(f.keys())
        except Exception:
            return []
    return []


def is_flux_file(path: Path) -> bool:
    """Whether a .safetensors or .gguf file holds a FLUX transformer in BFL layout (alone or all-in-one);
    reads the file's header only."""
    return any(name.removeprefix(BFL_PREFIX).startswith("double_blocks.") for name in tensor_names(path))


def map_bfl_transformer_weight(key: str, value: np.ndarray, hidden_size: int) -> list[tuple[str, np.ndarray]]:
    """One BFL transformer (key, value) as diffusers FluxTransformer2DModel pairs; fused projections are split
    into views of `value`. `hidden_size`: num_attention_heads * attention_head_dim."""
    module, _, param = key.removeprefix(BFL_PREFIX).rpartition(".")
    found = _bfl_target(module)
    if found is None:
        raise KeyError(f"not a FLUX transformer weight: {key}")
    prefix, target = found
    param = PARAM_NAMES.get(param, param)
    if isinstance(target, tuple):
        parts = np.split(value, [hidden_size * i for i in range(1, len(target))])
        return [(f"{prefix}{name}.{param}", part) for name, part in zip(target, parts)]
    if module in SHIFT_SCALE_MODULES:
        shift, scale = np.split(value, 2)
        value = np.concatenate([scale, shift])
    return [(f"{prefix}{target}.{param}", value)]


def flux_transformer_config(state: dict[str, Any], axes_dims_rope: list[int] | None = None) -> dict[str, Any]:
    """The diffusers FluxTransformer2DModel config.json for BFL transformer weights; only their shapes are read.

    The rotary embedding's split of the head dims cannot be read from shapes: FLUX's is [16, 56, 56] for its
    128-dim heads; models with other head sizes must say theirs (`axes_dims_rope`)."""
    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    keys = set(state)
    hidden_size, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if axes_dims_rope is None:
        if head_dim != sum(DEFAULT_AXES_DIMS_ROPE):
            raise CheckpointError(
                f"this FLUX transformer has {head_dim}-dim attention heads, not FLUX.1's 128, so its rotary "
                f"embedding's split of them is unknown: pass axes_dims_rope (three numbers summing to {head_dim})"
            )
        axes_dims_rope = DEFAULT_AXES_DIMS_ROPE
    elif len(axes_dims_rope) != 3 or sum(axes_dims_rope) != head_dim:
        raise CheckpointError(f"axes_dims_rope {list(axes_dims_rope)} must be three numbers summing to the "
                              f"head size, {head_dim}")
    out_channels = state["final_layer.linear.weight"].shape[0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": head_dim,
        "axes_dims_rope": list(axes_dims_rope),
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
        "in_channels": in_channels,
        "joint_attention_dim": state["txt_in.weight"].shape[1],
        "num_attention_heads": hidden_size // head_dim,
        "num_layers": _count(keys, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(keys, r"single_blocks\.(\d+)\."),
        "out_channels": None if out_channels == in_channels else out_channels,  # FLUX Fill: 384 in, 64 out
        "patch_size": 1,
        "pooled_projection_dim": state["vector_in.in_layer.weight"].shape[1],
    }


# --- T5 ---------------------------------------------------------------------------------------------------

def t5_config(state: dict[str, Any], relative_attention_max_distance: int = 128) -> dict[str, Any]:
    """The transformers T5Config (of a T5EncoderModel) for T5 encoder weights, from shapes. T5 v1.1 (FLUX's
    T5-XXL) has a gated-GELU feed-forward (wi_0, wi_1), v1.0 a ReLU one (wi); the attention's maximum
    relative distance is not in the weights (128 in every released T5)."""
    block = "encoder.block.0.layer."
    vocab_size, d_model = state["shared.weight" if "shared.weight" in state else "encoder.embed_tokens.weight"].shape
    buckets, heads = state[f"{block}0.SelfAttention.relative_attention_bias.weight"].shape
    gated = f"{block}1.DenseReluDense.wi_0.weight" in state
    d_ff = state[f"{block}1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0]
    layers = _count(set(state), r"encoder\.block\.(\d+)\.")
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


# --- reading files ----------------------------------------------------------------------------------------

def _open(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors as lazy MLX arrays (nothing is read until a tensor is used). fp8 (e4m3)
    tensors, which MLX loads as their raw bytes, are decoded (lazily too). A GGUF file's tensors are read
    when used too (convert.gguf_source)."""
    import mlx.core as mx

    if path.suffix == ".gguf":
        return read_state_dict(path)[0]
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: FLUX and SD3 files are read from .safetensors or .gguf only")
    raw, _ = read_state_dict(path)  # checks the header against the file size first
    if any(k.endswith(("scaled_fp8", ".scale_weight")) for k in raw):
        raise CheckpointError(f"{path} is a ComfyUI 'scaled fp8' file, which is not supported: use the fp16, "
                              "bf16 or plain fp8 (e4m3fn) version")
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    for key, entry in header.items():
        if key != "__metadata__" and entry["dtype"] == "F8_E4M3":
            raw[key] = mx.from_fp8(raw[key], mx.float32)
    return raw


class LazyWeights:
    """A component's weights as float32 numpy (key, value) pairs, read and converted one tensor at a time:
    each iteration opens the file afresh and drops every tensor once it has been handed on."""

    def __init__(self, path: Path, keys: list[str], convert: Callable[[str, np.ndarray], list]):
        # (not `self.keys`: dict() would take this for a mapping)
        self.path, self.source_keys, self.convert = path, keys, convert

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        raw = _open(self.path)
        for key in self.source_keys:
            yield from self.convert(key, _float32(raw.pop(key)))


def _find(component: tuple, raw: dict[str, Any]) -> str | None:
    """Where a component (a COMPONENTS entry) sits in a file: its key prefix, or None if the file does not
    hold it."""
    _, marker, prefixes, _ = component
    return next((p for p in prefixes if p + marker in raw), None)


def _component_keys(name: str, component: tuple, raw: dict[str, Any], prefix: str) -> list[str]:
    """The keys under `prefix` that are the component's weights. Others are skipped, with a warning (naming
    the component `name`) unless they are extras these files are known to carry (CLIP's projection, logit
    scale and position ids)."""
    accepted = component[3]
    keys, unknown = [], []
    for key in (k for k in raw if k.startswith(prefix)):
        rest = key[len(prefix):]
        if callable(accepted):
            ok = accepted(rest)
        else:
            ok = rest.startswith(accepted) and not rest.endswith("position_ids")
        (keys if ok else unknown).append(key)
    unknown = [k for k in unknown if not k.endswith(("text_projection.weight", "logit_scale", "position_ids"))]
    if unknown:
        log.warning("ignoring %d unrecognised %s weights, e.g. %s", len(unknown), name, unknown[:3])
    return keys


def locate_components(files: dict[str, Path | None], main: Path, table: dict[str, tuple], options: dict[str, str],
                      model: str) -> dict[str, tuple[Path, dict[str, Any], str]]:
    """Per component of `table`: (file, its lazily opened tensors, the component's key prefix in it). A
    component is read from the file given for it, else from `main` (an all-in-one checkpoint); a given file
    that does not hold it, and components found nowhere, are errors naming the files and options to give."""
    opened: dict[Path, dict[str, Any]] = {}  # lazily loaded: only shapes are read here
    found: dict[str, tuple[Path, dict[str, Any], str]] = {}
    missing = []
    for name, given in files.items():
        path = Path(given if given is not None else main)
        if path not in opened:
            if not path.is_file():
                raise CheckpointError(f"{path} does not exist")
            opened[path] = _open(path)
        raw = opened[path]
        prefix = _find(table[name], raw)
        if prefix is not None:
            found[name] = (path, raw, prefix)
            log.info("reading %s from %s", name, path.name)
        elif given is not None:
            description, marker, prefixes, _ = table[name]
            raise CheckpointError(f"{path} is not {description}: it has no {prefixes[0] + marker}; it has keys "
                                  f"like {sorted(raw)[:3]}")
        else:
            missing.append(f"{options[name]} ({table[name][0]})")
    if missing:
        raise CheckpointError(f"{main} does not hold all of {model}: also give " + ", ".join(missing))
    return found


def _read_transformer(path: Path, raw: dict[str, Any], prefix: str, axes_dims_rope) -> tuple[dict, LazyWeights]:
    keys = _component_keys("transformer", COMPONENTS["transformer"], raw, prefix)
    config = flux_transformer_config(_strip_prefix(raw, prefix), axes_dims_rope)
    hidden_size = config["num_attention_heads"] * config["attention_head_dim"]
    return config, LazyWeights(path, keys, partial(map_bfl_transformer_weight, hidden_size=hidden_size))


def _read_vae(raw: dict[str, Any], prefix: str, hints: ArchitectureHints, family: str = "flux") -> tuple[dict, Any]:
    config, state = convert_vae(_strip_prefix(raw, prefix), family, hints)  # 84M parameters: read at once
    return config, state.items()


def _read_clip(path: Path, raw: dict[str, Any], prefix: str, hints: ArchitectureHints) -> tuple[dict, LazyWeights]:
    """CLIP-L in transformers names under `text_model.`; its text_projection (unused by FLUX) is left out."""
    keys = _component_keys("CLIP-L", CLIP_L, raw, prefix)
    shapes = {"text_model." + k[len(prefix):]: raw[k] for k in keys}
    config = _text_config(shapes, "quick_gelu", None, with_projection=False, hints=hints)
    return config, LazyWeights(path, keys, lambda k, v: [("text_model." + k[len(prefix):], v)])


def _read_t5(path: Path, raw: dict[str, Any], prefix: str, max_distance: int) -> tuple[dict, LazyWeights]:
    """T5's encoder in transformers names. The token embedding is `shared.weight`; files that also hold its
    tied copy `encoder.embed_tokens.weight` have it dropped, those holding only the copy have it renamed."""
    keys = _component_keys("T5", T5_XXL, raw, prefix)
    tied = prefix + "encoder.embed_tokens.weight"
    if prefix + "shared.weight" in raw and tied in keys:
        keys.remove(tied)
    rename = {"encoder.embed_tokens.weight": "shared.weight"}
    config = t5_config(_strip_prefix({k: raw[k] for k in keys}, prefix), max_distance)
    return config, LazyWeights(path, keys, lambda k, v: [(rename.get(k[len(prefix):], k[len(prefix):]), v)])


def _strip_prefix(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}


def t5_tokenizer_folder(t5_tokenizer: Path | str | None) -> Path:
    """A folder holding T5's tokenizer.json: the one given (a folder, or the file itself), else the one in
    FLUX.1-schnell's repo (SD3's is the same T5 v1.1 tokenizer), downloaded once into the Hugging Face cache
    (HF_HUB_OFFLINE uses only the cache)."""
    if t5_tokenizer is None:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(T5_TOKENIZER_REPO, T5_TOKENIZER_FILE)).parent
        except Exception as err:
            raise CheckpointError(
                "The T5 text encoder needs its tokenizer, which the FLUX and SD3 files do not include, and it could "
                f"not be downloaded from {T5_TOKENIZER_REPO} ({type(err).__name__}: {err}). Pass it with "
                "--t5-tokenizer: a tokenizer.json, or a folder holding one (e.g. the tokenizer_2 folder of a "
                "FLUX.1 diffusers repo, or the tokenizer_3 folder of an SD3 one)."
            ) from err
    path = Path(t5_tokenizer)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"the T5 tokenizer folder {path} has no tokenizer.json")
        return path
    if not path.is_file():
        raise CheckpointError(f"the T5 tokenizer {path} does not exist")
    if path.name == "tokenizer.json":
        return path.parent
    folder = Path(tempfile.mkdtemp(prefix="t5-tokenizer-"))  # the pipeline reads a folder's tokenizer.json
    shutil.copyfile(path, folder / "tokenizer.json")
    return folder


def read_flux_files(diffusion_model: Path, vae: Path | None = None, clip_l: Path | None = None,
                    t5xxl: Path | None = None, *, t5_tokenizer: Path | None = None,
                    axes_dims_rope: list[int] | None = None, t5_max_distance: int = 128,
                    hints: ArchitectureHints = ArchitectureHints()) -> SourceModel:
    """FLUX.1's split files (or one ComfyUI all-in-one checkpoint as `diffusion_model`, the others None) as the
    conversion pipeline's `SourceModel` in diffusers layout. A file given for a component wins over the same
    component inside the all-in-one. dev (guidance-distilled) and schnell are told apart by the guidance
    embedding. `hints`: CLIP's head size and the VAE's group count, for tests' tiny models."""
    files = {"transformer": diffusion_model, "vae": vae, "text_encoder": clip_l, "text_encoder_2": t5xxl}
    found = locate_components(files, diffusion_model, COMPONENTS, OPTIONS, "FLUX")

    components = {
        "transformer": _read_transformer(*found["transformer"], axes_dims_rope),
        "vae": _read_vae(*found["vae"][1:], hints),
        "text_encoder": _read_clip(*found["text_encoder"], hints),
        "text_encoder_2": _read_t5(*found["text_encoder_2"], t5_max_distance),
    }
    dev = components["transformer"][0]["guidance_embeds"]
    return SourceModel(
        family="flux",
        prediction_type="flow",
        scheduler=dict(FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER),
        components=components,
        tokenizers={"text_encoder": None, "text_encoder_2": t5_tokenizer_folder(t5_tokenizer)},
    )
