"""State dicts (torch layout, original names) -> GGUF files as stable-diffusion.cpp's `-M convert --type T` writes them.

Written with the `gguf` package's GGUFWriter: each tensor's dims in ggml order (reversed), its data row-major.
Which tensors take the type follows stable-diffusion.cpp's ModelLoader::tensor_should_be_converted: not biases,
norms' `.scale`s, embeddings, FLUX's and the UNet's input/time/label embedding layers, nor (for block types)
tensors whose row length the block size does not divide (1-D norm weights do take it, as there); the others
keep their own type (float32 here), as do integer tensors. The gguf package quantizes F16, BF16, Q4_0, Q4_1,
Q5_0, Q5_1 and Q8_0 (bit-exact with ggml's reference quantizers); it cannot make K-quants, so Q2_K ... Q6_K
tensors are random blocks whose fp16 scales are set so that the weights come out about as large as the model's:
a random model in that type, which is all a reader's test needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
KEPT_NAME_PARTS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",  # FLUX
                   "x_embedder.", "t_embedder.", "y_embedder.", "pos_embed", "context_embedder.",  # MMDiT
                   "time_embed.", "label_emb.",  # UNet
                   "embedding")
# K-quant block layouts: (byte offset of d, of dmin or None) and about the largest |code * sub-scale| a block
# has, so that d = size / PEAK gives weights of about `size`.
K_SCALES = {"Q2_K": ((80, 82), 45), "Q3_K": ((108, None), 128), "Q4_K": ((0, 2), 945), "Q5_K": ((0, 2), 1953),
            "Q6_K": ((208, None), 4064)}
# llama.cpp's names for a T5 encoder (transformers' -> llama.cpp's), which stable-diffusion.cpp maps back.
LLAMA_CPP_T5_NAMES = {"shared.": "token_embd.", "encoder.final_layer_norm.": "enc.output_norm.",
                      "encoder.block.": "enc.blk.", "layer.0.SelfAttention.relative_attention_bias.": "attn_rel_b.",
                      "layer.0.SelfAttention.q.": "attn_q.", "layer.0.SelfAttention.k.": "attn_k.",
                      "layer.0.SelfAttention.v.": "attn_v.", "layer.0.SelfAttention.o.": "attn_o.",
                      "layer.0.layer_norm.": "attn_norm.", "layer.1.layer_norm.": "ffn_norm.",
                      "layer.1.DenseReluDense.wi_0.": "ffn_gate.", "layer.1.DenseReluDense.wi_1.": "ffn_up.",
                      "layer.1.DenseReluDense.wo.": "ffn_down."}


def takes_type(name: str, shape: tuple[int, ...], type_name: str) -> bool:
    """stable-diffusion.cpp's rule for whether `sd-cli -M convert --type` converts a tensor."""
    block_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
    if block_size > 1 and shape[-1] % block_size:
        return False
    if name.endswith((".bias", ".scale", ".weight_scale")):
        return False
    return not any(part in name for part in KEPT_NAME_PARTS)


def random_k_quant(shape: tuple[int, ...], type_name: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Random Q2_K ... Q6_K blocks (raw bytes, (rows, bytes per row)) for weights of about `size`."""
    qtype = GGMLQuantizationType[type_name]
    blocks = rng.integers(0, 256, quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    (d_at, dmin_at), peak = K_SCALES[type_name]
    per_block = GGML_QUANT_SIZES[qtype][1]
    view = blocks.reshape(-1, per_block)
    for at in (d_at, dmin_at):
        if at is not None:
            scale = (size / peak * rng.uniform(0.5, 1.0, len(view))).astype(np.float16)
            view[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks


def encode(name: str, value: np.ndarray, type_name: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(the data GGUFWriter takes, its ggml type name) for one tensor of a file of type `type_name`."""
    if not np.issubdtype(value.dtype, np.floating):
        return value, {8: "I64", 4: "I32"}[value.dtype.itemsize]
    value = value.astype(np.float32).reshape(value.shape or (1,))  # ggml has no 0-d tensors
    if not takes_type(name, value.shape, type_name) or type_name == "F32":
        return value, "F32"
    if type_name in K_SCALES:
        return random_k_quant(value.shape, type_name, float(np.abs(value).max()) or 1.0, rng), type_name
    return quants.quantize(value, GGMLQuantizationType[type_name]), type_name


def write_gguf(state: dict[str, np.ndarray], path: Path, type_name: str, seed: int = 0,
               rename=lambda name: name) -> Path:
    """`state` as a GGUF file of `type_name` (one of TYPES), names passed through `rename`."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "stable-diffusion")
    for name, value in state.items():
        data, written = encode(name, np.asarray(value), type_name, rng)
        if data.dtype == np.uint8:  # quantized bytes: GGUFWriter takes the byte shape and the type
            writer.add_tensor(rename(name), data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType[written])
        else:
            writer.add_tensor(rename(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def llama_cpp_t5_name(name: str) -> str:
    for new, old in LLAMA_CPP_T5_NAMES.items():
        name = name.replace(new, old)
    return name


def dequantized(path: Path) -> dict[str, np.ndarray]:
    """What the file holds, by gguf's own reader and dequantizer, in torch shapes (the reference for tests)."""
    from gguf import GGUFReader

    out = {}
    for tensor in GGUFReader(str(path)).tensors:
        shape = tuple(reversed(tensor.shape.tolist()))
        if tensor.tensor_type.name.startswith("I"):
            out[tensor.name] = np.array(tensor.data).reshape(shape)
        else:
            out[tensor.name] = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
    return out


def types_in(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
