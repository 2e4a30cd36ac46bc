"""Z-Image's split files (the original-layout transformer, FLUX.1's ae.safetensors, a Qwen3 `--llm` file) and
their GGUF forms -> diffusers layout, against the diffusers folder they were written from.

A tiny random Z-Image pipeline (tiny_zimage) is saved as a diffusers folder and written as the files users have
(zimage_layout: the transformer bare and under ComfyUI's prefix, checked against diffusers' own converter; Qwen3
as ComfyUI's qwen_3_4b.safetensors and as llama.cpp's GGUF with its vocabulary). Read back as Z-Image's
(`engine.families.zimage.single_file`), they give exactly the folder's weights and the configs that define the
architecture; GGUF files give exactly their dequantized tensors; the Qwen3 GGUF's hidden states match
transformers' and its own tokenizer tokenizes as the original; a split-file `convert` generates the image the
folder's conversion does.
"""

from __future__ import annotations

import dataclasses
import logging

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import tiny_qwen3
import tiny_zimage
from convert.checkpoint import QWEN3_TOKENIZER_FILES, QWEN3_TOKENIZER_REPO, read_original
from convert.gguf_source import qwen3_tokenizer
from convert.model import convert_model, write_model
from gguf_layout import dequantized
from mlx_sd_server.cli import main as cli
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.zimage.single_file import TURBO_SCHEDULER, zimage_transformer_config
from mlx_sd_server.engine.families.zimage.spec import SPEC as ZIMAGE
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError, Guess
from mlx_sd_server.engine.text.qwen_tokenizer import Qwen3Tokenizer, chat_prompt
from mlx_sd_server.job import ModelDefaults, build_job
from parity import max_rel_err
from test_flux_files import vae_file_state
from test_gguf import stored
from test_pipeline import ReplayNoise, mean_abs_diff, ours_image
from zimage_layout import (
    COMFYUI_PREFIX, comfyui_qwen3_state, llama_cpp_qwen3_name, numpy_state, original_transformer_state,
    write_llama_cpp_qwen3, write_original_transformer,
)

AXES = [8, 12, 12]  # the tiny transformer's rotary split of its 32-dim heads
# and the tiny VAE's groups, and Qwen3-4B's rotary base (the tiny Qwen3's), which no safetensors file says
TINY = ArchitectureHints(axes_dims_rope=tuple(AXES), norm_num_groups=8, llm_rope_theta=1_000_000)
TRANSFORMER_ARCHITECTURE = ("all_patch_size", "all_f_patch_size", "in_channels", "dim", "n_layers", "n_refiner_layers",
                            "n_heads", "n_kv_heads", "norm_eps", "qk_norm", "cap_feat_dim", "rope_theta", "t_scale",
                            "axes_dims")
QWEN3_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "attention_bias")
PROMPTS = ["a photo of a cat", "", "A Beautiful  landscape,\tpainting\nof mountains; 8k!",
           "東京 🐱 café naïve A\u030a", "a sign that says <|im_end|> and <think> and <|endoftext|>"]


def read_zimage(diffusion_model, vae=None, llm=None, *, llm_tokenizer=None, hints=TINY):
    """Z-Image's files read as `convert --diffusion-model FILE --vae FILE --llm FILE` reads them."""
    given = {option: path for option, path in (("--vae", vae), ("--llm", llm)) if path}
    return read_original(ZIMAGE, diffusion_model, given, llm_tokenizer=llm_tokenizer, hints=hints)


def config_of(config: dict, keys) -> dict:
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    return {key: plain(config[key]) for key in keys}


class Shape:
    """A tensor as the config readers see it: its shape only."""

    def __init__(self, *shape):
        self.shape = shape


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    """The tiny pipeline (a diffusers folder, named as Turbo), its split files, and its folder's conversion."""
    root = tmp_path_factory.mktemp("zimage-files")
    pipe = tiny_zimage.make_pipeline(root / "diffusers")
    files = {
        "transformer": write_original_transformer(pipe.transformer, root / "z_image_turbo_bf16.safetensors"),
        "comfyui": write_original_transformer(pipe.transformer, root / "z_image_turbo_comfy.safetensors",
                                              COMFYUI_PREFIX),
        "vae": root / "ae.safetensors", "llm": root / "qwen_3_4b.safetensors",
        "llm_bare": root / "qwen3_bare.safetensors", "tokenizer": root / "diffusers" / "tokenizer",
    }
    save_file(vae_file_state(pipe.vae), str(files["vae"]))
    save_file(comfyui_qwen3_state(pipe.text_encoder), str(files["llm"]))
    save_file(numpy_state(pipe.text_encoder), str(files["llm_bare"]))
    files["llm_gguf"] = write_llama_cpp_qwen3(pipe.text_encoder, root / "Qwen3-tiny-F32.gguf", "F32",
                                              files["tokenizer"] / "tokenizer.json", tiny_qwen3.QWEN3_CHAT_TEMPLATE)
    folder = convert_model(root / "diffusers", root / "z-image-turbo-folder", dtype="float32", progress=False)
    return root, pipe, files, folder


# --- the transformer ------------------------------------------------------------------------------------

def test_the_layout_writer_is_what_diffusers_converts(zimage):
    """The test's writer against diffusers' own single-file converter: it must give back the model's weights."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    _, pipe, _, _ = zimage
    for prefix in ("", COMFYUI_PREFIX):
        state = {k: torch.from_numpy(v) for k, v in original_transformer_state(pipe.transformer, prefix).items()}
        converted = convert_z_image_transformer_checkpoint_to_diffusers(state)
        expected = pipe.transformer.state_dict()
        assert sorted(converted) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("which", ["transformer", "comfyui"], ids=["bare", "comfyui-prefixed"])
def test_transformer_file_reads_to_the_diffusers_weights_and_config(zimage, which):
    root, pipe, files, _ = zimage
    source = read_zimage(files[which], files["vae"], files["llm"], llm_tokenizer=files["tokenizer"])
    config, weights = source.components["transformer"]
    assert config_of(config, TRANSFORMER_ARCHITECTURE) == config_of(pipe.transformer.config, TRANSFORMER_ARCHITECTURE)
    ours, expected = dict(weights), numpy_state(pipe.transformer)
    assert sorted(ours) == sorted(expected)  # (ComfyUI's unused norm_final left out)
    for key, value in expected.items():
        assert np.array_equal(ours[key], value), key
    assert source.family == "zimage" and source.prediction_type == "flow" and source.scheduler == TURBO_SCHEDULER
    assert source.guessed == {}  # everything the files cannot tell was given (TINY)


def test_released_shapes_take_z_image_s_rotary_split_as_a_guess():
    """Turbo's shapes (3840 wide, 128-dim heads): the split is Z-Image's 32,48,48, taken as a guess; other head
    sizes must be told."""
    from mlx_sd_server.engine.families.zimage.single_file import read_transformer

    dim = 3840
    state = {"x_embedder.weight": Shape(dim, 64), "layers.0.attention.q_norm.weight": Shape(128),
             "layers.0.attention.qkv.weight": Shape(3 * dim, dim), "layers.0.feed_forward.w1.weight": Shape(10240, dim),
             "layers.0.adaLN_modulation.0.weight": Shape(4 * dim, 256), "noise_refiner.0.ffn_norm1.weight": Shape(dim),
             "noise_refiner.1.ffn_norm1.weight": Shape(dim), "cap_embedder.0.weight": Shape(2560)}
    latent = ZIMAGE.latent["zimage"]
    component = read_transformer(state, "", latent, ArchitectureHints())
    assert component.config["axes_dims"] == [32, 48, 48] and component.config["n_heads"] == 30
    assert component.config["all_patch_size"] == [2] and component.config["n_refiner_layers"] == 2
    assert component.guessed == (Guess("axes_dims", [32, 48, 48], "axes_dims_rope", True),)
    state["layers.0.attention.q_norm.weight"] = Shape(96)
    with pytest.raises(CheckpointError, match="96-dim attention heads.*--axes-dims-rope"):
        zimage_transformer_config(state, latent.channels)
    with pytest.raises(CheckpointError, match="summing to the head size, 96"):
        zimage_transformer_config(state, latent.channels, (32, 48, 48))


def test_shapes_z_image_cannot_have_are_refused(zimage):
    _, pipe, _, _ = zimage
    state = original_transformer_state(pipe.transformer)
    for change, message in [
        (lambda s: s.update({"x_embedder.weight": np.zeros((64, 48), np.float32)}), "48 values per token"),
        (lambda s: s.pop("layers.0.attention.q_norm.weight"), "no q/k norms"),
        (lambda s: s.update({"layers.0.attention.qkv.weight": np.zeros((128, 64), np.float32)}), "not Z-Image's"),
        (lambda s: s.update({"siglip_embedder.0.weight": np.zeros(8, np.float32)}), "Omni"),
    ]:
        changed = dict(state)
        change(changed)
        with pytest.raises(CheckpointError, match=message):
            zimage_transformer_config(changed, 16, AXES)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_gguf_transformer_converts_to_exactly_its_dequantized_weights(zimage, tmp_path, type_name):
    """stable-diffusion.cpp's GGUF of the original layout (`z_image_turbo-Q4_0.gguf`), against the same file
    dequantized by the gguf package and saved as safetensors; the fused q/k/v keeps the file's blocks."""
    from gguf_layout import write_gguf

    root, pipe, files, _ = zimage
    path = write_gguf(original_transformer_state(pipe.transformer, COMFYUI_PREFIX),
                      tmp_path / f"z_image_turbo-{type_name}.gguf", type_name)
    twin = tmp_path / "twin.safetensors"
    save_file(dequantized(path), str(twin))

    def convert(diffusion_model, name):
        source = read_zimage(diffusion_model, files["vae"], files["llm"], llm_tokenizer=files["tokenizer"])
        return write_model(source, tmp_path / name, name=name, dtype="float32", progress=False)

    ours, reference = convert(path, "gguf"), convert(twin, "twin")
    weights, layers = stored(ours, "transformer")
    expected, _ = stored(reference, "transformer")
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(weights[key], value), key
    bits = {"Q8_0": 8, "Q4_0": 4}[type_name]
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        for part in ("to_q", "to_k", "to_v", "to_out.0"):
            assert layers[f"{block}.attention.{part}"] == (bits, 32), (block, part)
    assert "all_x_embedder.2-1" not in layers  # stable-diffusion.cpp keeps the embedders float
    manifest = read_manifest(ours)
    job = build_job({"prompt": "a cat", "steps": 2, "size": "64x64"}, defaults=ModelDefaults(**manifest["defaults"]),
                    capabilities=capabilities(manifest))
    images = ours_image(DiffusionPipeline(load_model(ours, dtype="float32")), job, None)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


# --- Qwen3 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["llm", "llm_bare"], ids=["comfyui-with-lm-head", "qwen3model-names"])
def test_qwen3_safetensors_read_to_the_transformers_weights_and_config(zimage, which, caplog):
    root, pipe, files, _ = zimage
    caplog.set_level(logging.INFO)
    source = read_zimage(files["transformer"], files["vae"], files[which], llm_tokenizer=files["tokenizer"],
                         hints=dataclasses.replace(TINY, llm_rope_theta=None))
    config, weights = source.components["text_encoder"]
    assert config_of(config, QWEN3_ARCHITECTURE) == config_of(pipe.text_encoder.config.to_dict() | {
        "rope_theta": pipe.text_encoder.config.rope_parameters["rope_theta"]}, QWEN3_ARCHITECTURE)
    ours, expected = dict(weights), numpy_state(pipe.text_encoder)
    assert sorted(ours) == sorted(expected)  # (the LM head left out)
    for key, value in expected.items():
        assert np.array_equal(ours[key], value), key
    # the rotary base is not in a safetensors file: Qwen3-4B's, a guess (a warning at the tiny width)
    assert source.guessed == {"text_encoder.rope_theta": 1_000_000.0}
    assert any("--llm-rope-theta" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert not any("unrecognised" in r.getMessage() for r in caplog.records)
    given = read_zimage(files["transformer"], files["vae"], files[which], llm_tokenizer=files["tokenizer"],
                        hints=dataclasses.replace(TINY, llm_rope_theta=500_000))
    assert given.components["text_encoder"][0]["rope_theta"] == 500_000 and given.guessed == {}


def test_qwen3_4b_shapes_and_gguf_hyperparameters():
    """Qwen3-4B's shapes give its config (grouped key/value heads, 128-dim heads unlike 2560 / 32); its rotary
    base from a .safetensors file is a near-certain guess at that width; a GGUF's own base is not a guess, and a
    scaled rotary embedding (which the encoder does not compute) is refused."""
    from mlx_sd_server.engine.text.single_file import read_qwen3

    width, layers = 2560, 36
    state = {"embed_tokens.weight": Shape(151936, width), "norm.weight": Shape(width)}
    for i in range(layers):
        state |= {f"layers.{i}.self_attn.q_proj.weight": Shape(4096, width),
                  f"layers.{i}.self_attn.k_proj.weight": Shape(1024, width),
                  f"layers.{i}.self_attn.q_norm.weight": Shape(128),
                  f"layers.{i}.mlp.gate_proj.weight": Shape(9728, width)}
    component = read_qwen3({"model." + k: v for k, v in state.items()}, "model.", ArchitectureHints())
    expected = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
    assert {key: component.config[key] for key in expected} == expected
    assert component.guessed == (Guess("rope_theta", 1e6, "llm_rope_theta", True),)

    class GGUFTensors(dict):
        metadata = {"general.architecture": "qwen3", "qwen3.rope.freq_base": 5e6}

    component = read_qwen3(GGUFTensors(state), "", ArchitectureHints())
    assert component.config["rope_theta"] == 5e6 and component.guessed == ()
    GGUFTensors.metadata = {**GGUFTensors.metadata, "qwen3.rope.scaling.type": "yarn"}
    with pytest.raises(CheckpointError, match="scales its rotary embedding \\(yarn\\)"):
        read_qwen3(GGUFTensors(state), "", ArchitectureHints())


def qwen3_states(folder, ids: np.ndarray) -> list[np.ndarray]:
    model = load_model(folder, dtype="float32")
    return [np.array(state) for state in model.text_encoders["text_encoder"](mx.array(ids))]


def test_qwen3_gguf_in_llama_cpp_names_gives_transformers_hidden_states(zimage, tmp_path):
    """An F32 llama.cpp GGUF of a Qwen3 whose rotary base and norm epsilon are not Qwen3-4B's: the file's metadata
    must reach the config for the states to match transformers'."""
    root, pipe, files, _ = zimage
    model = tiny_qwen3.qwen3_model(seed=9, rope_theta=50_000.0, rms_norm_eps=1e-5)
    path = write_llama_cpp_qwen3(model, tmp_path / "Qwen3-F32.gguf", "F32", files["tokenizer"] / "tokenizer.json")
    source = read_zimage(files["transformer"], files["vae"], path, llm_tokenizer=files["tokenizer"],
                         hints=dataclasses.replace(TINY, llm_rope_theta=None))
    config = source.components["text_encoder"][0]
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (50_000.0, 1e-5, 512)
    assert source.guessed == {}  # the file says its rotary base
    folder = write_model(source, tmp_path / "z", name="z", dtype="float32", progress=False)
    ids = np.array([[5, 17, 300, 901, 2, 44, 61, 899]])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    errors = [max_rel_err(ours, reference) for ours, reference in zip(qwen3_states(folder, ids), expected)]
    print("Qwen3 from a llama.cpp GGUF (F32): hidden states max rel err", f"{max(errors):.1e}")
    assert len(errors) == model.config.num_hidden_layers + 1 and max(errors) <= 1e-4


def test_qwen3_gguf_quantized_converts_to_exactly_its_dequantized_weights(zimage, tmp_path):
    root, pipe, files, _ = zimage
    path = write_llama_cpp_qwen3(pipe.text_encoder, tmp_path / "Qwen3-Q8_0.gguf", "Q8_0",
                                 files["tokenizer"] / "tokenizer.json")
    twin = tmp_path / "qwen3-twin.safetensors"
    values = dequantized(path)
    save_file({name: values[llama_cpp_qwen3_name(name)] for name in numpy_state(pipe.text_encoder)}, str(twin))

    def convert(llm, name):
        source = read_zimage(files["transformer"], files["vae"], llm, llm_tokenizer=files["tokenizer"])
        return write_model(source, tmp_path / name, name=name, dtype="float32", progress=False)

    weights, layers = stored(convert(path, "gguf"), "text_encoder")
    expected, _ = stored(convert(twin, "twin"), "text_encoder")
    assert sorted(weights) == sorted(expected) and set(layers.values()) == {(8, 32)}
    assert "layers.0.self_attn.q_proj" in layers
    for key, value in expected.items():
        assert np.array_equal(weights[key], value), key


def test_qwen3_gguf_carries_its_tokenizer(zimage, tmp_path):
    """The vocabulary in a llama.cpp GGUF's metadata tokenizes as the tokenizer.json it was made from, the
    added tokens (special or not) included, and keeps the chat template; `convert` uses it when none is given."""
    root, pipe, files, _ = zimage
    original = Qwen3Tokenizer.from_dir(files["tokenizer"])
    ours = qwen3_tokenizer(files["llm_gguf"])
    assert ours is not None and ours.chat_template == tiny_qwen3.QWEN3_CHAT_TEMPLATE
    assert ours.pad_id == original.pad_id and ours.max_id == original.max_id
    for prompt in PROMPTS:
        for text in (prompt, chat_prompt(prompt, True), chat_prompt(prompt, False)):
            assert ours.tokenize(text) == original.tokenize(text), text
            assert ours.encode(text, 40) == original.encode(text, 40), text
    source = read_zimage(files["transformer"], files["vae"], files["llm_gguf"])  # no --llm-tokenizer
    folder = source.tokenizers["text_encoder"]
    assert Qwen3Tokenizer.from_dir(folder).tokenize(chat_prompt(PROMPTS[2], True)) == original.tokenize(
        chat_prompt(PROMPTS[2], True))
    without = write_llama_cpp_qwen3(pipe.text_encoder, tmp_path / "no-vocabulary.gguf", "F32", None)
    assert qwen3_tokenizer(without) is None


def test_qwen3_tokenizer_given_or_downloaded(zimage, tmp_path, monkeypatch):
    import huggingface_hub

    root, pipe, files, _ = zimage

    def read(llm_tokenizer):
        return read_zimage(files["transformer"], files["vae"], files["llm"], llm_tokenizer=llm_tokenizer)

    assert read(files["tokenizer"] / "tokenizer.json").tokenizers["text_encoder"] == files["tokenizer"]
    copy = tmp_path / "qwen.json"
    copy.write_bytes((files["tokenizer"] / "tokenizer.json").read_bytes())
    assert (read(copy).tokenizers["text_encoder"] / "tokenizer.json").read_bytes() == copy.read_bytes()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        read(tmp_path)
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(files["tokenizer"].parent / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert read(None).tokenizers["text_encoder"] == files["tokenizer"]
    assert asked == [(QWEN3_TOKENIZER_REPO, name) for name in QWEN3_TOKENIZER_FILES]

    def offline(repo_id, filename, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="--llm-tokenizer"):
        read(None)


# --- the whole model ------------------------------------------------------------------------------------

def generate(folder) -> np.ndarray:
    manifest = read_manifest(folder)
    job = build_job({"prompt": "a photo of a cat", "sample_method": "euler", "steps": 3, "width": 80, "height": 64},
                    defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))
    initial = np.random.default_rng(0).standard_normal((1, 16, 8, 10)).astype(np.float32)
    return ours_image(DiffusionPipeline(load_model(folder, dtype="float32"), paste_back=False), job,
                      ReplayNoise(initial, []))


@pytest.mark.parametrize("llm", ["llm", "llm_gguf"], ids=["qwen3-safetensors", "qwen3-gguf"])
def test_split_file_convert_generates_the_folder_s_image(zimage, tmp_path, llm):
    """`convert --diffusion-model --vae --llm` (the GGUF with its own tokenizer), then an image: the same weights
    as the diffusers folder's conversion, the same manifest settings (Turbo, by name), the same image."""
    root, pipe, files, folder = zimage
    argv = ["convert", "--diffusion-model", str(files["transformer"]), "--vae", str(files["vae"]), "--llm",
            str(files[llm]), "--dtype", "float32", "--axes-dims-rope", ",".join(map(str, AXES)),
            "--norm-num-groups", "8", "--llm-rope-theta", "1000000", "--model-dir", str(tmp_path)]
    if llm == "llm":
        argv += ["--llm-tokenizer", str(files["tokenizer"])]
    assert cli(argv) == 0
    split = tmp_path / "z_image_turbo_bf16"  # (named after the transformer's file, as the model directory does)
    ours, reference = read_manifest(split), read_manifest(folder)
    assert ours["family"] == "zimage" and ours["name"] == "z_image_turbo_bf16"
    assert ours["defaults"] == reference["defaults"] and ours["defaults"]["steps"] == 8  # Turbo's, by name
    assert ours["scheduler"] == reference["scheduler"] and ours["scheduler"]["shift"] == 3.0
    assert "guessed" not in ours
    for name in ("transformer", "vae", "text_encoder"):
        weights = mx.load(str(split / ours["components"][name]["weights"]))
        expected = mx.load(str(folder / reference["components"][name]["weights"]))
        assert sorted(weights) == sorted(expected), name
        for key in expected:
            assert np.array_equal(np.array(weights[key]), np.array(expected[key])), f"{name}: {key}"
    diff = mean_abs_diff(generate(split), generate(folder))
    print(f"Z-Image split files ({llm}) against the diffusers folder's conversion: image mean abs diff {diff:.2e}")
    assert diff <= 1 / 255


def test_split_files_say_what_is_missing(zimage, tmp_path, capsys):
    root, pipe, files, _ = zimage
    assert cli(["convert", "--diffusion-model", str(files["transformer"]), str(tmp_path / "x")]) == 1
    message = capsys.readouterr().err
    assert "--vae" in message and "--llm" in message and "Qwen3" in message
    assert cli(["convert", "--diffusion-model", str(files["transformer"]), "--vae", str(files["vae"]), "--llm",
                str(files["vae"]), str(tmp_path / "y")]) == 1
    assert "is not the Qwen3 text encoder" in capsys.readouterr().err
    assert cli(["convert", "--diffusion-model", str(files["transformer"]), "--t5xxl", str(files["llm"]),
                str(tmp_path / "z")]) == 1
    assert "--t5xxl is for" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_serve_and_the_service_take_the_split_files(tmp_path, monkeypatch):
    """`serve --diffusion-model ... --llm ... --llm-tokenizer ...` reaches the split files the registry converts,
    and `service install` writes those options with absolute paths (the service starts elsewhere)."""
    from pathlib import Path

    from convert.cli import split_files
    from convert.model import SplitFiles
    from mlx_sd_server import service
    from mlx_sd_server.cli import build_parser

    monkeypatch.chdir(tmp_path)
    names = ("z.safetensors", "ae.safetensors", "qwen.gguf", "tokenizer.json")
    for name in names:
        (tmp_path / name).write_bytes(b"")
    options = [part for flag, name in zip(("--diffusion-model", "--vae", "--llm", "--llm-tokenizer"), names)
               for part in (flag, name)]
    expected = SplitFiles(Path(names[0]), vae=Path(names[1]), llm=Path(names[2]), llm_tokenizer=Path(names[3]))
    assert split_files(build_parser().parse_args(["serve", *options])) == expected
    argv = service.serve_argv(build_parser().parse_args(["service", "install", *options]))
    for flag, name in (("--llm", "qwen.gguf"), ("--llm-tokenizer", "tokenizer.json")):
        assert argv[argv.index(flag) + 1] == str(tmp_path / name)
