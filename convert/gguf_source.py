"""GGUF files as a source: the same name -> tensor dict a .safetensors file gives, read with the `gguf` package.

stable-diffusion.cpp writes (`sd-cli -M convert`) and reads GGUF files that keep each tensor's original name
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`, BFL's FLUX names ...),
so the original-layout reader (convert.checkpoint) takes them unchanged. ggml lists a tensor's dimensions
fastest first (the reverse of torch's); its data is laid out like torch's, row-major, so a tensor is its data
read in the reversed shape. T5 files made by llama.cpp's converter
(e.g. `t5-v1_1-xxl-encoder-Q8_0.gguf`) use llama.cpp's names, which are renamed to transformers' as
stable-diffusion.cpp does; so are its Qwen3 files (`Qwen3-4B-Instruct-2507-Q4_K_M.gguf`, architecture `qwen3`),
whose scalar metadata (`qwen3.rope.freq_base`, ...) the reader finds beside the tensors (`GGUFTensors`) and
whose vocabulary (`tokenizer.ggml.*`) becomes a tokenizer.json (`qwen3_tokenizer`).

Tensors are read when used (`GGUFTensor.dequantize`): float32 numpy, dequantized by `gguf.quants` for the
quantized types (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K), so a 12B FLUX transformer is read
one tensor at a time. Q4_0, Q4_1 and Q8_0 blocks (32 weights, an fp16 scale, 4 or 8-bit codes) are exactly
MLX's affine quantization with group size 32:

    Q4_0: w = d * (q - 8)   -> MLX: bits 4, scale d, bias -8 d
    Q4_1: w = d * q + m     -> MLX: bits 4, scale d, bias m
    Q8_0: w = d * q (int8)  -> MLX: bits 8, codes q + 128, scale d, bias -128 d

so a 2-D tensor of these types also carries its blocks repacked into MLX's layout (`QuantizedArray.packed`).
Where the weight arrives unchanged, or split into whole rows (FLUX's fused q/k/v), at one of our Linear
layers, the converter stores these arrays instead of re-quantizing the float values (`to_mlx`,
model_io.save_component): the converted layer computes with exactly the file's weights, at the file's size.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_sd_server.engine.source import CheckpointError
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer
from mlx_sd_server.engine.text.single_file import QWEN3_GGUF_ARCHITECTURE

log = logging.getLogger(__name__)

# The ggml types read here: stored floats, and the quantizations stable-diffusion.cpp and ComfyUI-GGUF write.
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # e.g. CLIP's position_ids: read as they are
# ggml type -> MLX bits, for the types whose 32-weight blocks MLX's affine quantization holds exactly.
MLX_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
MLX_GROUP_SIZE = 32

# llama.cpp's T5 encoder names -> transformers', replaced in this order, each at its first occurrence
# (stable-diffusion.cpp's name_conversion.cpp); in its own files, or under the prefix sd-cli's convert gives T5.
T5_PREFIX = "text_encoders.t5xxl.transformer."
LLAMA_CPP_T5_NAMES = (
    ("enc.", "encoder."),
    ("blk.", "block."),
    ("output_norm.", "final_layer_norm."),
    ("attn_q.", "layer.0.SelfAttention.q."),
    ("attn_k.", "layer.0.SelfAttention.k."),
    ("attn_v.", "layer.0.SelfAttention.v."),
    ("attn_o.", "layer.0.SelfAttention.o."),
    ("attn_norm.", "layer.0.layer_norm."),
    ("ffn_norm.", "layer.1.layer_norm."),
    ("ffn_up.", "layer.1.DenseReluDense.wi_1."),
    ("ffn_down.", "layer.1.DenseReluDense.wo."),
    ("ffn_gate.", "layer.1.DenseReluDense.wi_0."),
    ("attn_rel_b.", "layer.0.SelfAttention.relative_attention_bias."),
    ("token_embd.", "shared."),
)
# llama.cpp's Qwen3 names -> transformers' Qwen3Model's. Its converter stores Qwen3's q and k projections as
# transformers has them (it permutes them only for its LLaMA-architecture models, whose rotary pairing differs;
# Qwen2 and Qwen3 use transformers' rotate-half pairing), so only the names change.
# Qwen2-VL's and Qwen2.5-VL's language models (`qwen2vl`, Qwen-Image's text encoder) have the same names, less
# the q/k norms and with q/k/v biases (`.bias`); their vision towers are llama.cpp's separate mmproj files.
LLAMA_CPP_QWEN_ARCHITECTURES = (QWEN3_GGUF_ARCHITECTURE, "qwen2vl")
LLAMA_CPP_QWEN3_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
LLAMA_CPP_QWEN3_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Qwen's tokenizer (llama.cpp's tokenizer model "gpt2" with pre-tokenizer "qwen2"): NFC, this split, byte-level
# BPE, as transformers' Qwen2Tokenizer builds it from a vocabulary and merges.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's token types (gguf.TokenType): the BPE vocabulary, and the added tokens matched before it
NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN = 1, 3, 4


# --- MLX's quantized layout -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedRows:
    """A 2-D weight in MLX's affine quantized layout (group size 32): uint32 codes (rows, columns * bits / 32),
    float32 scales and biases (rows, columns / 32). Rows are independent, so any range of them is one too."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int

    def rows(self, start: int, stop: int) -> PackedRows:
        return PackedRows(self.weight[start:stop], self.scales[start:stop], self.biases[start:stop], self.bits)


def pack_for_mlx(blocks: np.ndarray, ggml_type: str) -> PackedRows:
    """A 2-D Q4_0/Q4_1/Q8_0 tensor's raw bytes (rows, bytes per row) in MLX's layout, exactly (module doc).

    A Q4 block holds weight j in the low nibble of byte j and weight j + 16 in the high one; MLX packs
    weights in order, two per byte, the first in the low nibble (eight per little-endian uint32)."""
    rows = blocks.shape[0]
    d_end = 4 if ggml_type == "Q4_1" else 2
    blocks = blocks.reshape(rows, -1, d_end + (32 if ggml_type == "Q8_0" else 16))
    half = blocks[..., :d_end].copy().view(np.float16).astype(np.float32)  # (rows, groups, 1 or 2)
    d, codes = half[..., 0], blocks[..., d_end:]
    if ggml_type == "Q8_0":
        packed = codes ^ np.uint8(0x80)  # int8 q -> uint8 q + 128 (two's complement)
        biases = -128 * d
    else:
        q = np.concatenate([codes & np.uint8(0x0F), codes >> np.uint8(4)], axis=-1)  # weights 0..31 in order
        packed = q[..., 0::2] | (q[..., 1::2] << np.uint8(4))
        biases = half[..., 1] if ggml_type == "Q4_1" else -8 * d
    weight = np.ascontiguousarray(packed).reshape(rows, -1).view("<u4")
    return PackedRows(weight, d, biases, MLX_BITS[ggml_type])


class QuantizedArray(np.ndarray):
    """A dequantized float32 weight (read-only) that also carries its exact MLX-layout blocks (`packed`).

    Numpy operations give plain float values (`packed` None), except views of whole rows (`x[a:b]`,
    `np.split(x, ..., axis=0)`), which keep their rows' blocks. (A view lies inside its parent's memory,
    which a new array cannot, so a same-strided array starting at a row boundary inside it is those rows.)"""

    packed: PackedRows | None = None

    @classmethod
    def of(cls, values: np.ndarray, packed: PackedRows) -> QuantizedArray:
        array = values.view(cls)
        array.packed = packed
        array.flags.writeable = False  # an in-place change would part the values from their blocks
        return array

    def __array_finalize__(self, parent: Any) -> None:
        self.packed = None
        source = getattr(parent, "packed", None)
        if source is None or self.ndim != 2 or self.shape[1] != parent.shape[1] or self.strides != parent.strides:
            return
        start, rest = divmod(self.ctypes.data - parent.ctypes.data, parent.strides[0])
        if rest == 0 and start >= 0 and start + self.shape[0] <= parent.shape[0]:
            self.packed = source.rows(start, start + self.shape[0])


def to_mlx(value: np.ndarray) -> Any:
    """A converted weight as save_component takes it: an MLX array, or, for a tensor that still holds its GGUF
    blocks, a `QuantizedWeight` that save_component stores as it is if it lands on a Linear layer."""
    import mlx.core as mx

    packed = getattr(value, "packed", None)
    if packed is None:
        return mx.array(value)
    from mlx_sd_server.engine.model_io import QuantizedWeight

    return QuantizedWeight(
        mx.array(packed.weight), mx.array(packed.scales), mx.array(packed.biases), packed.bits, MLX_GROUP_SIZE
    )


# --- reading ----------------------------------------------------------------------------------------------


class GGUFTensors(dict[str, "GGUFTensor"]):
    """A GGUF file's tensors by name, with its scalar metadata (`metadata`: key -> str, int, float or bool),
    which readers of what the shapes cannot tell consult (`engine.source.file_metadata`)."""

    metadata: dict[str, Any]


class GGUFTensor:
    """One tensor of a GGUF file, read and dequantized only when used; `shape` is torch's (ggml's reversed)."""

    def __init__(self, path: Path, tensor: Any):
        self.path, self.tensor = path, tensor
        self.type = tensor.tensor_type.name
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self) -> np.ndarray:
        """The values as float32 numpy (integers as they are); Q4_0/Q4_1/Q8_0 matrices as `QuantizedArray`."""
        from gguf import quants

        data = self.tensor.data
        if self.type in INTEGER_TYPES:
            return np.array(data).reshape(self.shape)
        try:
            values = quants.dequantize(data, self.tensor.tensor_type).astype(np.float32, copy=False)
        except Exception as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.tensor.name} ({self.type}): {err}") from err
        values = values.reshape(self.shape)
        if self.type in MLX_BITS and len(self.shape) == 2:
            return QuantizedArray.of(values, pack_for_mlx(np.asarray(data), self.type))
        return values

    def __repr__(self) -> str:
        return f"GGUFTensor({self.tensor.name!r}, {self.type}, shape={self.shape})"


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as err:  # the reader's errors for short or foreign files are numpy reshape errors and the like
        raise CheckpointError(
            f"cannot read {path} as a GGUF file (corrupt or truncated? {err}). Download it again."
        ) from err


def _field_value(field: Any) -> Any:
    """A metadata field's value: a str, number or bool, or a list of them (an array)."""
    from gguf import GGUFValueType

    def item(types: list[Any], index: int) -> Any:
        part = field.parts[index]
        if types[-1] == GGUFValueType.STRING:
            return str(bytes(part), "utf-8", "replace")
        if types[-1] == GGUFValueType.FLOAT32:  # the decimal it was written from (1e-06, not 9.99999997e-07)
            return float(str(part[0]))
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [item(field.types, index) for index in field.data]
    return item(field.types, field.data[0])


def read_gguf(path: Path) -> tuple[GGUFTensors, dict[str, str]]:
    """A GGUF file's tensors by name (read lazily, with the file's scalar metadata) and its string metadata. A
    corrupt or truncated file, or a ggml type not read here, is a CheckpointError."""
    from gguf import GGUFValueType

    path = Path(path)
    reader = _reader(path)
    tensors = {t.name: GGUFTensor(path, t) for t in reader.tensors}
    unknown = sorted({t.type for t in tensors.values()} - set(FLOAT_TYPES + QUANTIZED_TYPES + INTEGER_TYPES))
    if unknown:
        raise CheckpointError(
            f"{path} holds tensors of ggml type {', '.join(unknown)}, which are not read here "
            f"(these are: {', '.join(FLOAT_TYPES + QUANTIZED_TYPES)})"
        )
    scalars = {
        name: _field_value(field) for name, field in reader.fields.items() if field.types[0] != GGUFValueType.ARRAY
    }
    qwen3 = scalars.get("general.architecture") in LLAMA_CPP_QWEN_ARCHITECTURES
    rename = _llama_cpp_qwen3_name if qwen3 else _llama_cpp_t5_name
    renamed = GGUFTensors((rename(name), tensor) for name, tensor in tensors.items())
    renamed.metadata = scalars
    counts = Counter(tensor.type for tensor in tensors.values())
    log.debug("%s: %s", path.name, ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    return renamed, {name: value for name, value in scalars.items() if isinstance(value, str)}


def _llama_cpp_qwen3_name(name: str) -> str:
    """A Qwen3 weight in llama.cpp's names in transformers' Qwen3Model's; any other name as it is."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", name):
        module = LLAMA_CPP_QWEN3_BLOCK_NAMES.get(m[2])
        return name if module is None else f"layers.{m[1]}.{module}.{m[3]}"
    module, _, param = name.rpartition(".")
    return f"{LLAMA_CPP_QWEN3_NAMES[module]}.{param}" if module in LLAMA_CPP_QWEN3_NAMES else name


def qwen3_tokenizer(path: Path) -> Qwen3Tokenizer | None:
    """The Qwen tokenizer a llama.cpp GGUF file carries in its `tokenizer.ggml.*` metadata, as transformers'
    Qwen2Tokenizer builds it from the vocabulary and merges, with the added tokens at their ids (and the chat
    template, `tokenizer.chat_template`); None if the file carries no Qwen tokenizer (model "gpt2" with
    pre-tokenizer "qwen2")."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    fields = _reader(Path(path)).fields

    def value(key: str) -> Any:
        return _field_value(fields[key]) if key in fields else None

    if value("tokenizer.ggml.model") != "gpt2" or value("tokenizer.ggml.pre") != "qwen2":
        return None
    tokens, types, merges = (
        value("tokenizer.ggml.tokens"),
        value("tokenizer.ggml.token_type"),
        value("tokenizer.ggml.merges"),
    )
    if not tokens or not types or merges is None or len(tokens) != len(types):
        raise CheckpointError(f"{path}: its tokenizer metadata is incomplete (tokens, token types or merges)")
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types, strict=True)) if kind == NORMAL_TOKEN}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(
        BPE(
            vocab,
            pairs,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The added tokens at the ids the file gives them (llama.cpp's CONTROL tokens are the special ones)
    document = json.loads(tokenizer.to_str())
    document["added_tokens"] = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == CONTROL_TOKEN,
        }
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (CONTROL_TOKEN, USER_DEFINED_TOKEN)
    ]
    return Qwen3Tokenizer(Tokenizer.from_str(json.dumps(document)), value("tokenizer.chat_template"))


def _llama_cpp_t5_name(name: str) -> str:
    """A T5 encoder weight in llama.cpp's names (alone, or under stable-diffusion.cpp's t5xxl prefix) in
    transformers'; any other name as it is."""
    prefix = T5_PREFIX if name.startswith(T5_PREFIX) else ""
    rest = name[len(prefix) :]
    if not rest.startswith(("enc.", "token_embd.")):
        return name
    for old, new in LLAMA_CPP_T5_NAMES:
        rest = rest.replace(old, new, 1)
    return prefix + rest
