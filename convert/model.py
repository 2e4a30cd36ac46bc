"""Hugging Face weights -> this server's MLX model folders (docs/model-format.md).

Every input (a diffusers folder, a single-file checkpoint) is first read into a `SourceModel` in diffusers
layout; each component's weights then go through that component's pure key/value mapping function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from convert.checkpoint import NO_HINTS, read_checkpoint
from convert.diffusers_folder import is_diffusers_folder, read_diffusers_folder, tokenizer_folder
from convert.gguf_source import to_mlx
from mlx_sd_server.engine.families import FAMILIES, spec_for
from mlx_sd_server.engine.families.spec import PIPELINE
from mlx_sd_server.engine.model_io import CONVERTING, DTYPES, component_kind, save_component, write_manifest
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError, SourceModel
from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path
from mlx_sd_server.paths import folder_written_atomically

log = logging.getLogger(__name__)

QUANTIZE_GROUP_SIZE = 64


@dataclass(frozen=True)
class SplitFiles:
    """A model as the separate component files users have (FLUX.1: the BFL transformer, `ae.safetensors`,
    `clip_l.safetensors`, a `t5xxl` file; SD3/SD3.5: the checkpoint, `clip_l`, `clip_g` and `t5xxl` files;
    Z-Image: its transformer, `ae.safetensors` and a Qwen3 `llm` file; T5's and Qwen3's tokenizers are not
    among them, see convert.checkpoint), as stable-diffusion.cpp's options name them."""

    diffusion_model: Path
    vae: Path | None = None
    clip_l: Path | None = None
    clip_g: Path | None = None
    t5xxl: Path | None = None
    t5_tokenizer: Path | None = None
    llm: Path | None = None
    llm_tokenizer: Path | None = None

    def given(self) -> dict[str, Path]:
        """The component files given, by their `convert` option (`--vae`, `--clip-l`, ...)."""
        files = {
            "--vae": self.vae,
            "--clip-l": self.clip_l,
            "--clip-g": self.clip_g,
            "--t5xxl": self.t5xxl,
            "--llm": self.llm,
        }
        return {option: path for option, path in files.items() if path is not None}


def read_source(
    src: Path | SplitFiles,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    with_t5: bool = True,
    hints: ArchitectureHints = NO_HINTS,
) -> SourceModel:
    """A diffusers folder, a single-file checkpoint or split files, read into diffusers layout. `with_t5=False`
    leaves the family's optional text encoders out (SD3's T5: the model then reads zeros in its place, as
    diffusers' pipeline allows). `hints`: what single files cannot tell (a diffusers folder's configs say it)."""
    source = _read_source(src, allow_pickle, prediction_type, with_t5, hints)
    if not with_t5:
        optional = spec_for(source.family).optional_text_encoders
        if not optional:
            titles = " and ".join(spec.title for spec in FAMILIES if spec.optional_text_encoders)
            raise ValueError(f"only {titles} models run without T5; this is a {source.family} model")
        for name in optional:
            source.components.pop(name, None)  # (a diffusers folder's: its weights are never read)
            source.tokenizers.pop(name, None)
    return source


def _read_source(
    src: Path | SplitFiles, allow_pickle: bool, prediction_type: str | None, with_t5: bool, hints: ArchitectureHints
) -> SourceModel:
    if isinstance(src, SplitFiles):
        return read_checkpoint(
            src.diffusion_model,
            given=src.given(),
            allow_pickle=allow_pickle,
            prediction_type=prediction_type,
            with_t5=with_t5,
            t5_tokenizer=src.t5_tokenizer,
            llm_tokenizer=src.llm_tokenizer,
            hints=hints,
        )
    if is_diffusers_folder(src):
        if hints != NO_HINTS:
            log.warning("%s is a diffusers folder, whose configs say what the architecture options give: ignored", src)
        return read_diffusers_folder(src, allow_pickle=allow_pickle, prediction_type=prediction_type)
    if src.is_file():  # a single file of any family, or a clear error naming what it lacks
        return read_checkpoint(
            src, allow_pickle=allow_pickle, prediction_type=prediction_type, with_t5=with_t5, hints=hints
        )
    raise FileNotFoundError(f"{src} is neither a diffusers folder nor a checkpoint file")


def source_configs(source: SourceModel) -> dict[str, dict[str, Any]]:
    """What a family's `variant_of` reads: the components' configs, and the pipeline's settings (spec.PIPELINE)."""
    configs = {component: config for component, (config, _) in source.components.items()}
    return configs | ({PIPELINE: source.pipeline} if source.pipeline else {})


def model_defaults(source: SourceModel, name: str) -> dict[str, Any]:
    """The generation defaults of the model's family variant (turbo, LCM, dev, schnell, ...; see its spec)."""
    variant = spec_for(source.family).variant_of(source.family, source.prediction_type, source_configs(source), name)
    # None is no default of its own: guidance (only models with a guidance embedding have one), strength (the table's)
    return {key: value for key, value in dataclasses.asdict(variant.defaults).items() if value is not None}


def _tokenizer_for(source: SourceModel, encoder: str, config: dict[str, Any]) -> Any:
    folder = source.tokenizers.get(encoder)
    if folder is not None and Path(folder).exists():
        return component_kind(encoder, config).tokenizer_class.from_dir(folder)
    # Single files carry no tokenizer: every CLIP here uses CLIP's vocabulary, padded as its spec says.
    pad_token = spec_for(source.family).clip_pad_token(source.family, encoder)
    return CLIPTokenizer.from_bpe_file(default_vocab_path(), pad_token=pad_token)


def check_vocabulary(encoder: str, config: dict[str, Any], tokenizer: Any) -> None:
    """Refuse a text encoder whose token embedding has fewer rows than its tokenizer has ids: every id past
    them would be read out of bounds at run time (a single file's CLIP with 536 rows for CLIP's 49,408
    tokens gave NaN images and crashes)."""
    # the embedding's rows (a single file's config is read off its shape); transformers 5 nests a
    # vision-language model's under text_config
    rows = config.get("vocab_size") or config["text_config"]["vocab_size"]
    if tokenizer.max_id >= rows:
        raise CheckpointError(
            f"{encoder}: its token embedding has {rows} rows, but its tokenizer has {tokenizer.vocab_size} tokens "
            f"(ids up to {tokenizer.max_id}): this text encoder does not fit its tokenizer (for a single file, "
            "CLIP's own vocabulary; a damaged or cut-down checkpoint?)"
        )


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
    tokenizers = {
        component: _tokenizer_for(source, component, config)
        for component, (config, _) in source.components.items()
        if component_kind(component, config).tokenizer_class is not None
    }
    for component, tokenizer in tokenizers.items():  # before anything is written
        check_vocabulary(component, source.components[component][0], tokenizer)
    quantization = {"bits": quantize, "group_size": QUANTIZE_GROUP_SIZE} if quantize else None
    spec = spec_for(source.family)
    configs = source_configs(source)
    variant = (
        spec.variant_of(source.family, source.prediction_type, configs, name) if spec.denoiser in configs else None
    )
    with folder_written_atomically(dst) as work:
        (work / CONVERTING).write_text(str(os.getpid()))  # a running server answers requests for it 409 meanwhile
        entries: dict[str, Any] = {}
        for component, (config, weights) in source.components.items():
            kind = component_kind(component, config)
            mapped = (
                (key, to_mlx(value))  # an MLX array, or a GGUF tensor's exact MLX-quantized form
                for k, v in tqdm(weights, desc=component, unit=" tensors", disable=not progress, leave=False)
                for key, value in kind.mapper(k, v)
            )
            entries[component] = save_component(work, component, config, mapped, DTYPES[dtype], quantization)
            if component in tokenizers:  # each text encoder carries its tokenizer
                folder = tokenizer_folder(component)
                tokenizers[component].save(work / folder)
                entries[component]["tokenizer"] = folder
            if variant is not None and component in variant.text_lengths:
                entries[component]["max_length"] = variant.text_lengths[component]
            log.info("converted %s", component)
        manifest: dict[str, Any] = {
            "name": name,
            "family": source.family,
            "prediction_type": source.prediction_type,
            "scheduler": {key: source.scheduler.get(key, default) for key, default in spec.scheduler.items()},
            "dtype": dtype,
            # As asked; else, if a GGUF's 4/8-bit layers kept their quantization, the setting most of them have.
            "quantization": quantization or _usual_quantization(entries),
            "components": entries,
        }
        if source.pipeline:
            manifest["pipeline"] = source.pipeline
        if source.guessed:  # what a single file could not tell (docs/model-format.md)
            manifest["guessed"] = source.guessed
        if origin:
            manifest["source"] = {"from": origin, "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if source_sha256:
            manifest["source_sha256"] = source_sha256
        if variant is not None:
            manifest["defaults"] = model_defaults(source, name)
        write_manifest(work, manifest)
        (work / CONVERTING).unlink()
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
    hints: ArchitectureHints = NO_HINTS,
) -> Path:
    """Convert a diffusers folder, single-file checkpoint or split files at `src` into a model folder at `dst`.
    The manifest records where it came from: `origin` (e.g. a repo id), else `src`'s absolute path.
    `with_t5=False`: an SD3 model without T5; `hints`: what single files cannot tell (see read_source)."""
    src, dst = src if isinstance(src, SplitFiles) else Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} already exists and is not empty")
    source = read_source(src, allow_pickle=allow_pickle, prediction_type=prediction_type, with_t5=with_t5, hints=hints)
    if origin is None:
        origin = str((src.diffusion_model if isinstance(src, SplitFiles) else src).expanduser().resolve())
    single_file = src if isinstance(src, Path) and src.is_file() else None
    return write_model(
        source,
        dst,
        name=name or dst.name,
        dtype=dtype,
        quantize=quantize,
        progress=progress,
        origin=origin,
        source_sha256=file_sha256(single_file) if single_file else None,
    )


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 16 MB pieces (A1111 hashes checkpoints the same way)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(16 * 2**20):
            digest.update(piece)
    return digest.hexdigest()
