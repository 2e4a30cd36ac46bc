"""Upscaler files: telling ESRGAN (RRDBNet) and SRVGGNetCompact apart by their tensor names, inferring their
hyperparameters from the tensors' shapes as spandrel 0.4.2 does, renaming ESRGAN's key layouts into ours, and
the converted folders (`config.json` + `model.safetensors` in our layout) that `convert` writes.

ESRGAN's key layouts (all read as Real-ESRGAN's names, networks.RRDBNet):
- old ESRGAN (and 4x-UltraSharp-style files): `model.0` (conv_first), `model.1.sub.N.RDBj.convk.0`,
  `model.1.sub.<num_block>` (conv_body), then `model.3`, `model.6`, ... one per 2x upsample, and the last two
  convs two and four places after the last upsample;
- BSRGAN/RealSR: `conv_first`, `RRDB_trunk.N.RDBj.convk`, `trunk_conv`, `upconvK`, `HRconv`, `conv_last`;
- Real-ESRGAN (basicsr): `conv_first`, `body.N.rdbj.convk`, `conv_body`, `conv_upK`, `conv_hr`, `conv_last`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from convert.source import PICKLE_SUFFIXES, read_state_dict, safetensors_header, unwrapped
from mlx_sd_server.engine.model_io import DTYPES
from mlx_sd_server.engine.source import CheckpointError
from mlx_sd_server.paths import folder_written_atomically
from mlx_sd_server.upscale.networks import (
    ESRGAN,
    SRVGG,
    RRDBNetConfig,
    SRVGGConfig,
    UpscaleNetwork,
    build_network,
)

CONFIG_FILE = "config.json"  # {"arch", "config" (the network's hyperparameters), "dtype", "source"}
WEIGHTS_FILE = "model.safetensors"  # our layout: networks' parameter names, (out, kh, kw, in) convolutions
COMMON_PREFIXES = ("module.", "netG.")  # DataParallel's and BasicSR-era trainers' prefixes, as spandrel drops
UPSCALER_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES

# spandrel's detection: any of these key sets is an RRDBNet; SRVGGNetCompact has body.0 and body.1 weights
ESRGAN_KEY_SETS = (
    ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"),  # old ESRGAN
    ("model.0.weight", "model.1.sub.0.RDB1.conv1x1.weight"),  # ESRGAN+
    ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"),  # Real-ESRGAN
    ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight"),  # BSRGAN
)
SRVGG_KEYS = ("body.0.weight", "body.1.weight")

DENSE_CONV = r"(conv[1-5]|conv1x1)"  # a dense block's convolutions (conv1x1: ESRGAN+)
BLOCK_KEYS = (  # an RRDB's weights in each layout -> body.N.rdbJ.convK
    re.compile(rf"model\.1\.sub\.(\d+)\.RDB([1-3])\.{DENSE_CONV}(?:\.0)?\.(weight|bias)"),
    re.compile(rf"RRDB_trunk\.(\d+)\.RDB([1-3])\.{DENSE_CONV}\.(weight|bias)"),
    re.compile(rf"body\.(\d+)\.rdb([1-3])\.{DENSE_CONV}\.(weight|bias)"),
)
OLD_TRUNK_CONV = re.compile(r"model\.1\.sub\.\d+\.(weight|bias)")  # the conv after the last RRDB
OLD_SEQUENCE = re.compile(r"model\.(\d+)\.(weight|bias)")
UPSAMPLE_CONV = re.compile(r"(?:upconv|conv_up)(\d+)\.(weight|bias)")
RENAMED = {"trunk_conv": "conv_body", "HRconv": "conv_hr"}  # BSRGAN's names
OURS = ("conv_first", "conv_body", "conv_hr", "conv_last")
SRVGG_KEY = re.compile(r"body\.(\d+)\.(weight|bias)")


@dataclass(frozen=True)
class UpscalerWeights:
    """An upscaler file read: its architecture, hyperparameters and weights in our layout."""

    arch: str
    config: RRDBNetConfig | SRVGGConfig
    weights: dict[str, mx.array]


def without_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` with a prefix every key shares (COMMON_PREFIXES) dropped, as spandrel canonicalizes."""
    out = dict(state)
    for prefix in COMMON_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def upscaler_arch(keys: Iterable[str]) -> str | None:
    """ESRGAN or SRVGG, when the tensor names are one of theirs (spandrel's detection), else None."""
    names = set(without_prefix(dict.fromkeys(keys)))
    if any(all(k in names for k in key_set) for key_set in ESRGAN_KEY_SETS):
        return ESRGAN
    if all(k in names for k in SRVGG_KEYS):
        return SRVGG
    return None


def tensor_names(path: Path, allow_pickle: bool) -> list[str]:
    """A file's tensor names without reading its tensors (a pickle is memory-mapped where its format allows);
    none for a pickle that is not allowed, or another format."""
    if path.suffix == ".safetensors":
        return [k for k in safetensors_header(path) if k != "__metadata__"]
    if path.suffix not in PICKLE_SUFFIXES or not allow_pickle:
        return []
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # torch's pre-1.6 pickle format, which cannot be mapped: read it whole
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    return list(unwrapped(state)) if isinstance(state, dict) else []


def is_upscaler_file(path: Path, allow_pickle: bool) -> bool:
    """Whether `convert` should read `path` as an upscaler rather than a diffusion model."""
    try:
        return path.is_file() and upscaler_arch(tensor_names(path, allow_pickle)) is not None
    except Exception:  # not readable as either: the model converter says what is wrong with it
        return False


def seq_len(keys: Iterable[str], prefix: str) -> int:
    """One more than the largest N of the `prefix.N.*` keys (spandrel's get_seq_len), 0 if there are none."""
    found = [int(k[len(prefix) + 1 :].split(".", 1)[0]) for k in keys if k.startswith(prefix + ".")]
    return max(found, default=-1) + 1


def esrgan_upsamples(keys: Iterable[str]) -> int:
    """How many 2x upsampling stages an RRDBNet file has: from the old layout's sequence length (a conv, the
    trunk, three modules per upsample, conv, activation, conv) or the newer layouts' numbered upsample convs."""
    keys = list(keys)
    if "model.0.weight" in keys:
        return (seq_len(keys, "model") - 5) // 3
    numbers = [int(m.group(1)) for k in keys if (m := UPSAMPLE_CONV.fullmatch(k))]
    return max(numbers, default=0)


def esrgan_key(key: str, upsamples: int) -> str | None:
    """An RRDBNet tensor's name in our layout, from any of the three layouts; None for a name none of them has."""
    for pattern in BLOCK_KEYS:
        if m := pattern.fullmatch(key):
            block, rdb, conv, kind = m.groups()
            return f"body.{block}.rdb{rdb}.{conv}.{kind}"
    if m := OLD_TRUNK_CONV.fullmatch(key):
        return f"conv_body.{m.group(1)}"
    if m := OLD_SEQUENCE.fullmatch(key):
        index, kind = int(m.group(1)), m.group(2)
        names = {0: "conv_first", 3 * upsamples + 2: "conv_hr", 3 * upsamples + 4: "conv_last"}
        names.update({3 * i: f"conv_up{i}" for i in range(1, upsamples + 1)})
        return f"{names[index]}.{kind}" if index in names else None
    if m := UPSAMPLE_CONV.fullmatch(key):
        return f"conv_up{m.group(1)}.{m.group(2)}"
    layer, _, kind = key.partition(".")
    layer = RENAMED.get(layer, layer)
    return f"{layer}.{kind}" if layer in OURS and kind in ("weight", "bias") else None


def esrgan_config(shapes: Mapping[str, tuple[int, ...]]) -> RRDBNetConfig:
    """An RRDBNet's hyperparameters from its tensors' shapes (our names, torch's OIHW shapes), as spandrel
    infers them; the pixel-unshuffle factor of Real-ESRGAN's x2/x1 models from conv_first's input channels."""
    in_ch, num_feat = shapes["conv_first.weight"][1], shapes["conv_first.weight"][0]
    out_ch = shapes["conv_last.weight"][0]
    upsamples = sum(1 for k in shapes if UPSAMPLE_CONV.fullmatch(k) and k.endswith(".weight"))
    unshuffle = 1
    if in_ch in (out_ch * 4, out_ch * 16):  # spandrel's test: the input is the image pixel-unshuffled 2x or 4x
        unshuffle = math.isqrt(in_ch // out_ch)
    if 2**upsamples % unshuffle:
        raise ValueError(f"a {unshuffle}x pixel-unshuffled input with {upsamples} 2x upsamples has no integer scale")
    return RRDBNetConfig(
        num_in_ch=in_ch // unshuffle**2,
        num_out_ch=out_ch,
        num_feat=num_feat,
        num_block=seq_len(shapes, "body"),
        num_grow_ch=shapes["body.0.rdb1.conv1.weight"][0],
        scale=2**upsamples // unshuffle,
        unshuffle=unshuffle,
        plus=any(".conv1x1." in k for k in shapes),
    )


def srvgg_config(shapes: Mapping[str, tuple[int, ...]]) -> SRVGGConfig:
    """SRVGGNetCompact's hyperparameters from its tensors' shapes, as spandrel infers them: the last conv's
    outputs are out_ch * scale^2, out_ch taken as the input's channels, else 3, 4 or 1."""
    last = seq_len(shapes, "body") - 1
    in_ch, num_feat = shapes["body.0.weight"][1], shapes["body.0.weight"][0]
    shuffled = shapes[f"body.{last}.bias"][0]
    for out_ch in (in_ch, 3, 4, 1):
        scale = math.isqrt(shuffled // out_ch)
        if shuffled % out_ch == 0 and scale * scale * out_ch == shuffled:
            return SRVGGConfig(in_ch, out_ch, num_feat, (last - 2) // 2, scale)
    raise ValueError(f"its last convolution's {shuffled} outputs are no channel count times a square scale")


def to_ours(value: Any) -> mx.array:
    """A tensor as an MLX float32 array, convolution weights (out, in, kh, kw) -> (out, kh, kw, in)."""
    array = value.astype(mx.float32) if isinstance(value, mx.array) else mx.array(np.asarray(value, np.float32))
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def map_weights(path: Path, state: Mapping[str, Any]) -> UpscalerWeights:
    """A file's tensors (any key layout) as our network's: an error naming the file for tensors that no layout
    has or shapes the inferred network does not take."""
    state = without_prefix(state)
    arch = upscaler_arch(state)
    if arch is None:
        raise CheckpointError(
            f"{path} is not an upscaler this server reads (ESRGAN/Real-ESRGAN RRDBNet or SRVGGNetCompact): it has "
            f"keys like {sorted(state)[:3]}"
        )
    if arch == ESRGAN:
        upsamples = esrgan_upsamples(state)
        renamed = {k: esrgan_key(k, upsamples) for k in state}
    else:
        renamed = {k: k if SRVGG_KEY.fullmatch(k) else None for k in state}
    unknown = sorted(k for k, ours in renamed.items() if ours is None)
    if unknown:
        raise CheckpointError(f"{path}: tensors no {arch} layout has: {', '.join(unknown[:5])}")
    named = {old: ours for old, ours in renamed.items() if ours is not None}  # (all of them, now)
    weights = {ours: to_ours(state[old]) for old, ours in named.items()}
    shapes = {ours: tuple(state[old].shape) for old, ours in named.items()}
    try:
        config = esrgan_config(shapes) if arch == ESRGAN else srvgg_config(shapes)
        build_network(arch, config.to_dict()).load_weights(list(weights.items()), strict=True)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: not a consistent {arch} network ({err})") from None
    if (config.num_in_ch, config.num_out_ch) != (3, 3):
        raise CheckpointError(
            f"{path}: a {config.num_in_ch}-channel in, {config.num_out_ch}-channel out network; upscalers here "
            "take and make RGB images"
        )
    return UpscalerWeights(arch, config, weights)


def read_upscaler(path: str | os.PathLike, allow_pickle: bool = False) -> UpscalerWeights:
    """An upscaler file (.safetensors; .pth/.pt/.ckpt only with `allow_pickle`, read by torch's weights-only
    unpickler: no code runs) in our layout."""
    path = Path(path)
    if path.suffix not in UPSCALER_SUFFIXES:
        raise CheckpointError(f"{path}: an upscaler is a {', '.join(UPSCALER_SUFFIXES)} file")
    tensors, _ = read_state_dict(path, allow_pickle)
    return map_weights(path, tensors)


def convert_upscaler(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float16", allow_pickle: bool = False
) -> Path:
    """Write the upscaler file `src` as a converted folder `dst`, atomically (a failed conversion leaves
    nothing; a folder of that name that is not empty is refused)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} already exists and is not empty")
    upscaler = read_upscaler(src, allow_pickle)
    return write_converted(upscaler, dst, dtype=dtype, origin=str(src.expanduser().resolve()))


def write_converted(upscaler: UpscalerWeights, dst: Path, *, dtype: str = "float16", origin: str | None = None) -> Path:
    """`upscaler` as a converted folder `dst` (CONFIG_FILE + WEIGHTS_FILE), written beside it and renamed into
    place, so that a server listing the folder never sees half of one."""
    with folder_written_atomically(dst) as work:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in upscaler.weights.items()}
        mx.save_safetensors(str(work / WEIGHTS_FILE), weights)
        config: dict[str, Any] = {
            "arch": upscaler.arch,
            "scale": upscaler.config.scale,
            "config": upscaler.config.to_dict(),
            "dtype": dtype,
        }
        if origin:
            config["source"] = {"from": origin, "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return dst


def read_config(folder: Path) -> dict[str, Any]:
    """A converted upscaler's config.json."""
    return json.loads((folder / CONFIG_FILE).read_text())


def load_network(folder: Path) -> UpscaleNetwork:
    """A converted upscaler's network, its weights in float32 (what it computes in)."""
    config = read_config(folder)
    network = build_network(config["arch"], config["config"])
    network.load_weights(str(folder / WEIGHTS_FILE), strict=True)
    network.set_dtype(mx.float32)
    mx.eval(network.parameters())
    return network
