"""Reading a file's tensors: safetensors (fp8 decoded), GGUF (convert.gguf_source) and torch pickles (refused
unless allowed), by name, read lazily where the format allows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np

from convert.gguf_source import read_gguf
from mlx_sd_server.engine.source import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PICKLE_WRAPPERS = ("state_dict", "params_ema", "params")  # what a pickle's tensors may be nested under
CHECKPOINT_SUFFIXES = (".safetensors", ".gguf") + PICKLE_SUFFIXES
# Quantized weights whose scales are tensors of their own (ComfyUI's older `scale_weight`, its mixed-precision
# `weight_scale` + `comfy_quant`): read one tensor at a time, they would convert unscaled.
SCALED_WEIGHT_SUFFIXES = ("scaled_fp8", ".scale_weight", ".weight_scale", ".comfy_quant")
# ComfyUI's older scaled fp8 files (e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors): an empty `scaled_fp8` tensor, and
# beside each fp8 `X.weight` a scalar `X.scale_weight` (the weight is fp8 * scale) and maybe an `X.scale_input`
# (for fp8 matmuls; not needed by float weights). These are read scaled, as ComfyUI's ops dequantize them.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT, SCALE_INPUT = ".scale_weight", ".scale_input"


class PickleRefusedError(ValueError):
    def __init__(self, path: Path):
        super().__init__(
            f"{path} is a pickle file, which can run arbitrary code when loaded. Convert a .safetensors "
            "version if there is one, or pass --allow-pickle if you trust this file."
        )


def read_state_dict(path: Path, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """A checkpoint's tensors by name (lazy MLX arrays, numpy from a pickle, GGUF tensors read when used) and
    its metadata (safetensors' metadata, GGUF's string fields)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return read_gguf(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefusedError(path)
        try:
            return read_pickle(path), {}
        except Exception as err:  # torch's errors for corrupt or non-tensor pickles are long and deep
            raise CheckpointError(f"cannot read {path} as a torch checkpoint: {err}") from err
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: unknown checkpoint format (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")
    header = safetensors_header(path)
    import mlx.core as mx  # reads bfloat16, which numpy cannot

    try:
        tensors = cast(dict[str, Any], mx.load(str(path)))  # (a .safetensors file loads as a dict)
    except Exception as err:
        raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err
    if SCALED_FP8_MARKER in tensors:
        tensors = descaled(tensors, header)
    if any(k.endswith(SCALED_WEIGHT_SUFFIXES) for k in tensors):
        raise CheckpointError(
            f"{path} is a 'scaled fp8' file (ComfyUI's, BFL's fp8 or fp8mixed files: scales stored beside the "
            "weights), which is not supported: use the fp16, bf16 or plain fp8 (e4m3fn) version, or a GGUF"
        )
    for key, entry in header.items():  # fp8 (e4m3) tensors, which MLX loads as their raw bytes, decoded lazily
        if key in tensors and entry["dtype"] == "F8_E4M3" and tensors[key].dtype == mx.uint8:
            tensors[key] = mx.from_fp8(tensors[key], mx.float32)
    return tensors, header.get("__metadata__") or {}


def descaled(tensors: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    """A ComfyUI scaled fp8 file's tensors (SCALED_FP8_MARKER) with each `X.weight` multiplied by its scalar
    `X.scale_weight` (lazily: MLX arrays), the scales and the marker dropped."""
    import mlx.core as mx

    out = {k: v for k, v in tensors.items() if k != SCALED_FP8_MARKER and not k.endswith((SCALE_WEIGHT, SCALE_INPUT))}
    for key in (k for k in tensors if k.endswith(SCALE_WEIGHT)):
        scale, weight = tensors[key], key.removesuffix(SCALE_WEIGHT) + ".weight"
        if scale.size != 1 or weight not in out:
            raise CheckpointError(f"{key}: a scaled fp8 file's scale must be one number beside its weight")
        value = mx.from_fp8(out[weight], mx.float32) if header[weight]["dtype"] == "F8_E4M3" else out[weight]
        out[weight] = value.astype(mx.float32) * scale.astype(mx.float32).reshape(())
    return out


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header, checked against the file's size (a partial download is common)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (corrupt or truncated header)")
        try:
            header = json.loads(f.read(header_len))
            data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header: {err})") from None
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + header_len + data_end} bytes, the file has {size}. "
            "Download it again."
        )
    return header


def unwrapped(state: dict[str, Any]) -> dict[str, Any]:
    """A torch checkpoint's tensors from under the key that holds them: A1111-era checkpoints keep them under
    `state_dict`, basicsr's (Real-ESRGAN's .pth upscalers) under `params_ema` or `params`."""
    return next((state[k] for k in PICKLE_WRAPPERS if isinstance(state.get(k), dict)), state)


def read_pickle(path: Path) -> dict[str, np.ndarray]:
    """Load a pickle checkpoint with torch's restricted unpickler (tensors only). Torch is optional."""
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"reading {path} needs torch (pip install torch), or use a .safetensors file") from None
    state = unwrapped(torch.load(str(path), map_location="cpu", weights_only=True))
    return {
        k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items() if hasattr(v, "numpy")
    }
