"""Single files and split files in a family's original layout, read into diffusers layout.

These are the files A1111, ComfyUI, CivitAI and stable-diffusion.cpp users have: an SD checkpoint, FLUX's
transformer with `ae.safetensors`, `clip_l.safetensors` and a `t5xxl` file, an SD3.5 checkpoint with or
without its text encoders, ComfyUI's all-in-one bundles, as .safetensors, .gguf or (if allowed) pickles.
The main file's tensor names say its family (`engine.families.family_of_single_file`); the family says which
components such a file holds and where (its spec's `original.parts`), and, from names and shapes alone, their
configs and weight mappings (`original.read`). Here the files are read: a component given as a file of its
own (stable-diffusion.cpp's options: `--vae FILE`) wins over the same component inside the main file, and
weights are read one tensor at a time as they are converted (`LazyWeights`): MLX loads safetensors lazily and
each tensor is let go once it has been handed on, so a 24 GB transformer never sits in memory whole.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert.gguf_source import qwen3_tokenizer
from convert.source import PICKLE_SUFFIXES, read_state_dict
from mlx_sd_server.engine.components import ComponentKind, Mapper
from mlx_sd_server.engine.families import FAMILIES, family_of_single_file
from mlx_sd_server.engine.families.spec import FamilySpec
from mlx_sd_server.engine.model_io import component_kind
from mlx_sd_server.engine.source import (
    ArchitectureHints,
    CheckpointError,
    FilePart,
    OriginalComponent,
    OriginalModel,
    SourceModel,
    Tensors,
    Weights,
    float32,
    hint_option,
)
from mlx_sd_server.engine.text.qwen3 import QWEN3_ENCODER
from mlx_sd_server.engine.text.qwen25vl import QWEN25VL_ENCODER
from mlx_sd_server.engine.text.qwen_tokenizer import MERGES_FILE, VOCAB_FILE
from mlx_sd_server.engine.text.t5 import T5_ENCODER

log = logging.getLogger(__name__)
BPE_FILES = (VOCAB_FILE, MERGES_FILE)

PREDICTION_TYPES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "v-prediction": "v_prediction",
}

# The split files carry no T5 tokenizer; FLUX.1-schnell's repo is public (dev's is gated), and FLUX's and
# SD3's T5 use the same one.
T5_TOKENIZER_REPO = "black-forest-labs/FLUX.1-schnell"
T5_TOKENIZER_FILE = "tokenizer_2/tokenizer.json"
# Nor a Qwen3 tokenizer, unless it is a llama.cpp GGUF file: every Qwen3 size has the same one, which
# Z-Image-Turbo's public repo holds (tokenizer_config.json: its chat template).
QWEN3_TOKENIZER_REPO = "Tongyi-MAI/Z-Image-Turbo"
QWEN3_TOKENIZER_FILES = ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
NO_HINTS = ArchitectureHints()  # none given: the released models' values, taken as guesses


@dataclass
class DiffusersComponents:
    """A single file read at once: per component, (config.json dict, float32 state dict)."""

    family: str
    prediction_type: str
    inpainting: bool
    components: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=dict)


class LazyWeights:
    """A component's weights as float32 numpy (key, value) pairs in diffusers names, read and converted one
    tensor at a time: each iteration opens the file afresh and drops every tensor once it has been handed on.
    Tensors already in memory (a pickle's) are read from there."""

    def __init__(
        self, source: Path | Tensors, keys: list[str], mapper: Mapper, extra: tuple[tuple[str, np.ndarray], ...] = ()
    ):
        # (not `self.keys`: dict() would take this for a mapping)
        self.source, self.source_keys, self.mapper, self.extra = source, keys, mapper, extra

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        tensors = dict(read_state_dict(self.source)[0] if isinstance(self.source, Path) else self.source)
        for key in self.source_keys:
            yield from self.mapper(key, float32(tensors.pop(key)))
        yield from self.extra


def stated_prediction_type(metadata: Mapping[str, str], names: Mapping[str, Any], explicit: str | None) -> str | None:
    """The explicit choice, else what the file says (modelspec metadata, kohya's and ComfyUI's v markers), else
    None: the family's usual applies."""
    if explicit is not None:
        return _normalise_prediction_type(explicit, "the prediction_type argument")
    if "modelspec.prediction_type" in metadata:
        return _normalise_prediction_type(metadata["modelspec.prediction_type"], "modelspec.prediction_type")
    if metadata.get("ss_v_parameterization", "").lower() == "true" or "v_pred" in names:
        return "v_prediction"
    return None


def _normalise_prediction_type(value: str, source: str) -> str:
    try:
        return PREDICTION_TYPES[value.strip().lower()]
    except KeyError:
        raise CheckpointError(f"{source}: unknown prediction type {value!r} (epsilon or v_prediction)") from None


class Files:
    """The files read so far, each read once (a safetensors or GGUF file lazily; a pickle whole)."""

    def __init__(self, allow_pickle: bool = False):
        self.allow_pickle = allow_pickle
        self.read: dict[Path, tuple[Tensors, dict[str, str]]] = {}

    def tensors(self, path: Path) -> Tensors:
        if path not in self.read:
            if not path.is_file():
                raise CheckpointError(f"{path} does not exist")
            self.read[path] = read_state_dict(path, self.allow_pickle)
        return self.read[path][0]

    def metadata(self, path: Path) -> dict[str, str]:
        self.tensors(path)
        return self.read[path][1]

    def weights(self, path: Path, component: OriginalComponent) -> LazyWeights:
        source: Path | Tensors = self.tensors(path) if path.suffix in PICKLE_SUFFIXES else path
        return LazyWeights(source, component.keys, component.mapper, component.extra)


def family_of_file(path: Path, files: Files) -> FamilySpec:
    """The family whose original layout the file's tensor names show."""
    tensors = files.tensors(path)
    spec = family_of_single_file(tensors)
    if spec is not None and spec.original is None:  # recognised, but its single files are not read yet
        raise CheckpointError(
            f"{path} is a {spec.title} file: this version converts {spec.title} models from their diffusers "
            "folders only (e.g. `pull` the model's repository)"
        )
    if spec is None:
        expected = "; ".join(f"not {s.original.expects}" for s in FAMILIES if s.original is not None)
        raise CheckpointError(
            f"{path} holds no model this version converts: {expected}"
            + (f"; it has keys like {sorted(tensors)[:3]}" if tensors else "; it is empty")
        )
    return spec


def read_checkpoint(
    path: str | Path,
    *,
    given: Mapping[str, Path] | None = None,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    with_t5: bool = True,
    t5_tokenizer: Path | None = None,
    llm_tokenizer: Path | None = None,
    hints: ArchitectureHints = NO_HINTS,
) -> SourceModel:
    """A single file (and the component files `given` by their `convert` option, e.g. {"--vae": path}) of
    whichever family its tensor names show. Pickles (.ckpt/.pt/.bin) are refused unless `allow_pickle`;
    `prediction_type` overrides the file's; `with_t5=False` leaves the family's optional text encoders out.
    `t5_tokenizer`, `llm_tokenizer`: T5's and Qwen3's tokenizers, which the files may not carry.
    `hints`: what the files cannot tell; where one is not given its value is guessed, logged and recorded in
    the model's `guessed`."""
    files = Files(allow_pickle)
    spec = family_of_file(Path(path), files)
    tokenizers = GivenTokenizers(t5_tokenizer, llm_tokenizer)
    return _read(spec, Path(path), given or {}, files, prediction_type, with_t5, tokenizers, hints)[1]


def read_original(
    spec: FamilySpec,
    main: Path,
    given: Mapping[str, Path] | None = None,
    *,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    with_t5: bool = True,
    t5_tokenizer: Path | None = None,
    llm_tokenizer: Path | None = None,
    hints: ArchitectureHints = NO_HINTS,
) -> SourceModel:
    """`main` and the component files `given`, read as `spec`'s family (as read_checkpoint, which detects it)."""
    tokenizers = GivenTokenizers(t5_tokenizer, llm_tokenizer)
    return _read(spec, Path(main), given or {}, Files(allow_pickle), prediction_type, with_t5, tokenizers, hints)[1]


def load_checkpoint(
    path: str | Path,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    hints: ArchitectureHints = NO_HINTS,
) -> DiffusersComponents:
    """A single file read at once into diffusers-layout configs and float32 state dicts."""
    files = Files(allow_pickle)
    spec = family_of_file(Path(path), files)
    model, source = _read(spec, Path(path), {}, files, prediction_type, True, GivenTokenizers(), hints)
    return DiffusersComponents(
        source.family,
        source.prediction_type,
        model.inpainting,
        {name: (config, dict(weights)) for name, (config, weights) in source.components.items()},
    )


def _read(
    spec: FamilySpec,
    main: Path,
    given: Mapping[str, Path],
    files: Files,
    prediction_type: str | None,
    with_t5: bool,
    given_tokenizers: GivenTokenizers,
    hints: ArchitectureHints,
) -> tuple[OriginalModel, SourceModel]:
    layout = spec.original
    assert layout is not None, f"{spec.name} has no single files"
    names = files.tensors(main)
    parts = {
        name: part for name, part in layout.parts(names).items() if with_t5 or name not in spec.optional_text_encoders
    }
    for option in given:
        if option not in layout.options:
            takes = [p.option for name, p in parts.items() if p.option and name != spec.denoiser]
            others = " and ".join(s.title for s in FAMILIES if s.original is not None and option in s.original.options)
            raise CheckpointError(
                f"{option} is for {others or 'no model this version converts'}, and {main} is a "
                f"{spec.title} model, which takes {', '.join(takes) or 'no other files'} only"
            )
    found = locate_components(parts, main, given, files, spec)
    stated = stated_prediction_type(files.metadata(main), names, prediction_type)
    model = layout.read(
        spec, {name: (files.tensors(path), prefix) for name, (path, prefix) in found.items()}, stated, hints
    )
    components: dict[str, tuple[dict[str, Any], Weights]] = {
        name: (c.config, files.weights(found[name][0], c)) for name, c in model.components.items()
    }
    tokenizers = {
        name: tokenizer_folder(component_kind(name, config), found[name][0], given_tokenizers)
        for name, (config, _) in components.items()
        if component_kind(name, config).tokenizer_class
    }
    guessed = logged_guesses(model)
    return model, SourceModel(model.family, model.prediction_type, model.scheduler, components, tokenizers, guessed)


@dataclass(frozen=True)
class GivenTokenizers:
    """The tokenizers given for text encoders whose files may not carry one (`--t5-tokenizer`,
    `--llm-tokenizer`): a tokenizer.json, or a folder holding one; None: found as `tokenizer_folder` says."""

    t5: Path | None = None
    qwen3: Path | None = None


def tokenizer_folder(kind: ComponentKind, path: Path, given: GivenTokenizers) -> Path | None:
    """The folder of the tokenizer of a text encoder of `kind` read from `path`. Single files carry none, but
    llama.cpp's GGUF files of Qwen3 do; CLIP's vocabulary ships with this package (None: write_model makes it);
    T5's and Qwen3's are given, else downloaded once."""
    if kind is T5_ENCODER:
        return t5_tokenizer_folder(given.t5)
    if kind is QWEN3_ENCODER or kind is QWEN25VL_ENCODER:  # (Qwen2.5's vocabulary and added tokens are Qwen3's)
        return qwen3_tokenizer_folder(given.qwen3, path)
    return None


def logged_guesses(model: OriginalModel) -> dict[str, Any]:
    """The config values the files could not tell, by "component.key", each logged as `Guess` says: a warning
    where the shapes are not a released model's, else at info level."""
    guessed: dict[str, Any] = {}
    for name, component in model.components.items():
        for guess in component.guessed:
            guessed[f"{name}.{guess.key}"] = guess.value
            log.log(
                logging.INFO if guess.standard else logging.WARNING,
                "guessed %s = %s for %s (the file cannot tell%s; pass %s to override)",
                guess.key,
                guess.value,
                name,
                "" if guess.standard else ", and its shapes are not a released model's",
                hint_option(guess.hint),
            )
    return guessed


def locate_components(
    parts: Mapping[str, FilePart], main: Path, given: Mapping[str, Path], files: Files, spec: FamilySpec
) -> dict[str, tuple[Path, str]]:
    """Per part: (the file it is read from, its prefix there). The denoiser is read from `main`, another part
    from the file given with its option, else from `main`; a file given for a part that does not hold it, and
    required parts found nowhere, are errors naming the files and options to give."""
    found: dict[str, tuple[Path, str]] = {}
    missing, absent = [], []
    for name, part in parts.items():
        path = main if name == spec.denoiser else given.get(part.option) if part.option else None
        tensors = files.tensors(path or main)
        prefix = next((p for p in part.prefixes if p + part.marker in tensors), None)
        if prefix is not None:
            found[name] = (path or main, prefix)
            log.info("reading %s from %s", name, (path or main).name)
        elif path is not None:
            raise CheckpointError(
                f"{path} is not {part.description}: it has no {part.prefixes[0] + part.marker}; "
                f"it has keys like {sorted(tensors)[:3]}"
            )
        elif part.required and part.option:
            missing.append(f"{part.option} ({part.description})")
        elif part.required:
            absent.append(part.description)
    if absent:
        raise CheckpointError(f"{main} does not hold all of {spec.title}: it has no {', '.join(absent)}")
    if missing:
        raise CheckpointError(f"{main} does not hold all of {spec.title}: also give " + ", ".join(missing))
    return found


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
    return given_tokenizer_folder(Path(t5_tokenizer), "T5")


def qwen3_tokenizer_folder(llm_tokenizer: Path | str | None, path: Path) -> Path:
    """A folder holding the tokenizer of the Qwen3 text encoder read from `path`: the one given (a folder, or
    the tokenizer.json itself), else the one a llama.cpp GGUF file carries, else Z-Image-Turbo's (every Qwen3's),
    downloaded once into the Hugging Face cache (HF_HUB_OFFLINE uses only the cache)."""
    if llm_tokenizer is not None:
        return given_tokenizer_folder(Path(llm_tokenizer), "Qwen3")
    tokenizer = qwen3_tokenizer(path) if path.suffix == ".gguf" else None
    if tokenizer is not None:
        folder = Path(tempfile.mkdtemp(prefix="qwen3-tokenizer-"))
        tokenizer.save(folder)
        log.info("Qwen3's tokenizer: the one %s carries", path.name)
        return folder
    try:
        from huggingface_hub import hf_hub_download

        return Path([hf_hub_download(QWEN3_TOKENIZER_REPO, name) for name in QWEN3_TOKENIZER_FILES][0]).parent
    except Exception as err:
        raise CheckpointError(
            f"The Qwen3 text encoder needs its tokenizer, which {path.name} does not include, and it could not be "
            f"downloaded from {QWEN3_TOKENIZER_REPO} ({type(err).__name__}: {err}). Pass it with --llm-tokenizer: "
            "a tokenizer.json, or a folder holding one (e.g. the tokenizer folder of a Z-Image or FLUX.2 klein "
            "diffusers repo)."
        ) from err


def given_tokenizer_folder(path: Path, what: str) -> Path:
    """A folder holding the tokenizer.json given as `path`: the folder itself, or a file (copied into a folder
    of its own if it has another name: the pipeline reads a folder's tokenizer.json)."""
    if path.is_dir():
        # (a byte-level BPE's vocab.json and merges.txt do too: Qwen/Qwen-Image's tokenizer folder has only them)
        if not (path / "tokenizer.json").is_file() and not all((path / f).is_file() for f in BPE_FILES):
            raise CheckpointError(f"the {what} tokenizer folder {path} has no tokenizer.json")
        return path
    if not path.is_file():
        raise CheckpointError(f"the {what} tokenizer {path} does not exist")
    if path.name == "tokenizer.json":
        return path.parent
    folder = Path(tempfile.mkdtemp(prefix=f"{what.lower()}-tokenizer-"))
    shutil.copyfile(path, folder / "tokenizer.json")
    return folder
