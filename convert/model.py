"""Hugging Face weights -> this server's MLX model folders (docs/model-format.md).

Every input (a diffusers folder, a single-file checkpoint) is first read into a `SourceModel` in diffusers
layout; each component's weights then go through that component's pure key/value mapping function.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from convert.clip import map_clip_weight
from convert.controlnet import map_controlnet_weight
from convert.flux import map_flux_transformer_weight
from convert.gguf_source import to_mlx
from convert.sd3 import map_sd3_transformer_weight
from convert.source import SourceModel
from convert.t5 import map_t5_weight
from convert.unet import map_unet_weight
from convert.vae import map_vae_weight
from mlx_sd_server.engine.families.sd3 import T5_MAX_LENGTH as SD3_T5_MAX_LENGTH
from mlx_sd_server.engine.model_io import (
    DTYPES, TEXT_ENCODERS, component_class, component_kind, save_component, write_manifest,
)
from mlx_sd_server.engine.tokenizer import CLIPTokenizer, default_vocab_path

log = logging.getLogger(__name__)

# By the class the component's config names (see model_io.component_kind).
MAPPERS: dict[str, Callable] = {
    "CLIPTextModel": map_clip_weight,
    "CLIPTextModelWithProjection": map_clip_weight,
    "T5EncoderModel": map_t5_weight,
    "UNet2DConditionModel": map_unet_weight,
    "FluxTransformer2DModel": map_flux_transformer_weight,
    "SD3Transformer2DModel": map_sd3_transformer_weight,
    "AutoencoderKL": map_vae_weight,
    "ControlNetModel": map_controlnet_weight,
}
QUANTIZE_GROUP_SIZE = 64
# The scheduler settings a manifest keeps, by parameterization: the beta table, or the flow shift.
SCHEDULER_KEYS = {
    "beta": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "flow": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}
# T5 tokens FLUX.1 reads: dev (with a guidance embedding) was trained on 512, schnell on 256.
FLUX_T5_MAX_LENGTH = {True: 512, False: 256}
# SD3/SD3.5 defaults from the model cards' examples. The transformer's config tells the releases apart (SD3.5
# normalises queries and keys, only SD3.5-medium has MMDiT-X dual attention); large-turbo, whose config is
# large's, only by its name.
SD3_DEFAULTS = {
    "sd3-medium": {"steps": 28, "cfg_scale": 7.0},
    "sd3.5-medium": {"steps": 40, "cfg_scale": 4.5},
    "sd3.5-large": {"steps": 28, "cfg_scale": 3.5},
    "sd3.5-large-turbo": {"steps": 4, "cfg_scale": 1.0},
}


@dataclass(frozen=True)
class SplitFiles:
    """A model as the separate component files users have (FLUX.1: the BFL transformer, `ae.safetensors`,
    `clip_l.safetensors`, a `t5xxl` file; SD3/SD3.5: the checkpoint, `clip_l`, `clip_g` and `t5xxl` files; T5's
    tokenizer is not among them, see convert.flux_files)."""

    diffusion_model: Path
    vae: Path | None = None
    clip_l: Path | None = None
    clip_g: Path | None = None
    t5xxl: Path | None = None
    t5_tokenizer: Path | None = None


def read_source(src: Path | SplitFiles, allow_pickle: bool = False, prediction_type: str | None = None,
                with_t5: bool = True) -> SourceModel:
    """A diffusers folder, a single-file checkpoint or split files, read into diffusers layout. `with_t5=False`
    leaves SD3's T5 out (the model then reads zeros in its place, as diffusers' pipeline allows)."""
    source = _read_source(src, allow_pickle, prediction_type, with_t5)
    if not with_t5:
        if source.family != "sd3":
            raise ValueError(f"only SD3/SD3.5 models run without T5; this is a {source.family} model")
        source.components.pop("text_encoder_3", None)  # (a diffusers folder's: its weights are never read)
        source.tokenizers.pop("text_encoder_3", None)
    return source


def _read_source(src: Path | SplitFiles, allow_pickle: bool, prediction_type: str | None, with_t5: bool) -> SourceModel:
    from convert.diffusers_folder import is_diffusers_folder, read_diffusers_folder
    from convert.flux_files import is_flux_file, read_flux_files
    from convert.sd3_files import is_sd3_file, read_sd3_files

    if isinstance(src, SplitFiles):
        if src.clip_g is not None and is_flux_file(src.diffusion_model):
            raise ValueError(f"--clip-g is for SD3/SD3.5, and {src.diffusion_model} is a FLUX.1 transformer, which "
                             "takes --clip-l and --t5xxl only")
        if src.clip_g is not None or is_sd3_file(src.diffusion_model):
            return read_sd3_files(src.diffusion_model, src.vae, src.clip_l, src.clip_g, src.t5xxl,
                                  t5_tokenizer=src.t5_tokenizer, with_t5=with_t5)
        return read_flux_files(src.diffusion_model, src.vae, src.clip_l, src.t5xxl, t5_tokenizer=src.t5_tokenizer)
    if is_diffusers_folder(src):
        return read_diffusers_folder(src, allow_pickle=allow_pickle, prediction_type=prediction_type)
    if src.is_file() and is_flux_file(src):  # an all-in-one FLUX file, or a clear error naming the missing parts
        return read_flux_files(src)
    if src.is_file() and is_sd3_file(src):  # SD3/SD3.5, with its text encoders or a clear error naming them
        return read_sd3_files(src, with_t5=with_t5)
    if src.is_file():
        from convert.checkpoint import read_checkpoint

        return read_checkpoint(src, allow_pickle=allow_pickle, prediction_type=prediction_type)
    raise FileNotFoundError(f"{src} is neither a diffusers folder nor a checkpoint file")


def model_defaults(source: SourceModel, name: str) -> dict[str, Any]:
    """Generation defaults that suit the model: turbo and LCM models need few steps and little guidance;
    FLUX.1-dev ~28 steps with distilled guidance 3.5, schnell 4 steps, both without CFG; SD3/SD3.5 as
    `SD3_DEFAULTS`."""
    if source.family == "sd3":
        config = source.components["transformer"][0]
        release = ("sd3.5-large-turbo" if "turbo" in name.lower() else "sd3-medium" if not config.get("qk_norm")
                   else "sd3.5-medium" if config.get("dual_attention_layers") else "sd3.5-large")
        return {**SD3_DEFAULTS[release], "sample_method": "euler", "scheduler": "discrete",
                "width": 1024, "height": 1024}
    if source.family == "flux":
        if source.components["transformer"][0].get("guidance_embeds"):
            flux = {"steps": 28, "cfg_scale": 1.0, "guidance": 3.5}
        else:
            flux = {"steps": 4, "cfg_scale": 1.0}
        return {**flux, "sample_method": "euler", "scheduler": "discrete", "width": 1024, "height": 1024}
    lowered = name.lower()
    unet_config = source.components.get("unet", ({}, ()))[0]
    size = {"sdxl": 1024, "sd2": 768 if source.prediction_type == "v_prediction" else 512}.get(source.family, 512)
    defaults: dict[str, Any] = {"steps": 20, "cfg_scale": 7.0, "sample_method": "euler_a", "scheduler": "discrete"}
    if "turbo" in lowered:
        defaults = {"steps": 1, "cfg_scale": 1.0, "sample_method": "euler_a", "scheduler": "trailing"}
        size = 512
    elif unet_config.get("time_cond_proj_dim"):  # LCM-distilled: guidance is an input, not a second pass
        defaults = {"steps": 4, "cfg_scale": 8.5, "sample_method": "lcm", "scheduler": "lcm"}
    elif "lcm" in lowered:  # e.g. LCM-LoRA fused into a base model
        defaults = {"steps": 4, "cfg_scale": 1.5, "sample_method": "lcm", "scheduler": "lcm"}
    return {**defaults, "width": size, "height": size}


def _tokenizer_for(source: SourceModel, encoder: str, config: dict[str, Any]) -> Any:
    folder = source.tokenizers.get(encoder)
    if folder is not None and Path(folder).exists():
        return component_kind(encoder, config).tokenizer_class.from_dir(folder)
    # Single files carry no tokenizer: all SD, SD3 and FLUX CLIPs use CLIP's vocabulary, padded by family.
    clip_l = encoder == "text_encoder" and source.family in ("sdxl", "flux", "sd3")
    pad = "<|endoftext|>" if source.family == "sd1" or clip_l else "!"
    return CLIPTokenizer.from_bpe_file(default_vocab_path(), pad_token=pad)


def write_model(
    source: SourceModel,
    dst: Path,
    *,
    name: str,
    dtype: str = "float16",
    quantize: int | None = None,
    progress: bool = True,
    origin: str | None = None,
    source_sha256: str | None = None,
) -> Path:
    """Write `source` as a converted folder at `dst`, atomically: a failed conversion leaves nothing.
    `origin` (the source path or Hugging Face repo id) goes into the manifest's `source`, with the time;
    `source_sha256` (a single file's) is what A1111 shortens into the images' `Model hash`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.partial-"))
    quantization = {"bits": quantize, "group_size": QUANTIZE_GROUP_SIZE} if quantize else None
    try:
        entries: dict[str, Any] = {}
        for component, (config, weights) in source.components.items():
            mapper = MAPPERS[component_class(component, config)]
            mapped = (
                (key, to_mlx(value))  # an MLX array, or a GGUF tensor's exact MLX-quantized form
                for k, v in tqdm(weights, desc=component, unit=" tensors", disable=not progress, leave=False)
                for key, value in mapper(k, v)
            )
            entries[component] = save_component(work, component, config, mapped, DTYPES[dtype], quantization)
            if component in TEXT_ENCODERS:  # each text encoder carries its tokenizer
                folder = component.replace("text_encoder", "tokenizer")
                _tokenizer_for(source, component, config).save(work / folder)
                entries[component]["tokenizer"] = folder
            if source.family == "flux" and component == "text_encoder_2":
                guidance = bool(source.components["transformer"][0].get("guidance_embeds"))
                entries[component]["max_length"] = FLUX_T5_MAX_LENGTH[guidance]
            if source.family == "sd3" and component == "text_encoder_3":
                entries[component]["max_length"] = SD3_T5_MAX_LENGTH
            log.info("converted %s", component)
        manifest: dict[str, Any] = {
            "name": name,
            "family": source.family,
            "prediction_type": source.prediction_type,
            "scheduler": {
                key: source.scheduler.get(key, default)
                for key, default in SCHEDULER_KEYS["flow" if source.prediction_type == "flow" else "beta"].items()
            },
            "dtype": dtype,
            # As asked; else, if a GGUF's 4/8-bit layers kept their quantization, the setting most of them have.
            "quantization": quantization or _usual_quantization(entries),
            "components": entries,
        }
        if origin:
            manifest["source"] = {"from": origin, "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if source_sha256:
            manifest["source_sha256"] = source_sha256
        if "unet" in source.components or "transformer" in source.components:
            manifest["defaults"] = model_defaults(source, name)
        write_manifest(work, manifest)
        if dst.exists():
            dst.rmdir()
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _usual_quantization(entries: dict[str, dict[str, Any]]) -> dict[str, int] | None:
    settings = Counter(tuple(sorted(e["quantization"].items())) for e in entries.values() if "quantization" in e)
    return dict(settings.most_common(1)[0][0]) if settings else None


def convert_model(
    src: str | os.PathLike | SplitFiles,
    dst: str | os.PathLike,
    *,
    dtype: str = "float16",
    quantize: int | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    name: str | None = None,
    progress: bool = True,
    origin: str | None = None,
    with_t5: bool = True,
) -> Path:
    """Convert a diffusers folder, single-file checkpoint or split files at `src` into a model folder at `dst`.
    The manifest records where it came from: `origin` (e.g. a repo id), else `src`'s absolute path.
    `with_t5=False`: an SD3 model without T5 (see read_source)."""
    src, dst = src if isinstance(src, SplitFiles) else Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} already exists and is not empty")
    source = read_source(src, allow_pickle=allow_pickle, prediction_type=prediction_type, with_t5=with_t5)
    if origin is None:
        origin = str((src.diffusion_model if isinstance(src, SplitFiles) else src).expanduser().resolve())
    single_file = isinstance(src, Path) and src.is_file()
    return write_model(source, dst, name=name or dst.name, dtype=dtype, quantize=quantize, progress=progress,
                       origin=origin, source_sha256=file_sha256(src) if single_file else None)


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 16 MB pieces (A1111 hashes checkpoints the same way)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(16 * 2**20):
            digest.update(piece)
    return digest.hexdigest()
