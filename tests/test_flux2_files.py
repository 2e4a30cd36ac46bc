"""FLUX.2 klein's split files (BFL's transformer, flux2-vae.safetensors, a Qwen3 `--llm` file) and the
transformer's GGUF forms -> diffusers layout, against the diffusers folder they were written from.

A tiny random klein pipeline (tiny_flux2) is saved as a diffusers folder and written as the files users have
(flux2_layout: the transformer bare and under ComfyUI's prefix, checked against diffusers' own converter; the
autoencoder as BFL's AutoEncoder holds it; Qwen3 as ComfyUI's qwen_3_4b.safetensors and as llama.cpp's GGUF).
Read back as FLUX.2's (`engine.families.flux2.single_file`), they give exactly the folder's weights and the
configs that define the architecture; GGUF files give exactly their dequantized tensors; a split-file `convert`
generates the image the folder's conversion does (and diffusers' pipeline does).
"""

from __future__ import annotations

import dataclasses
import logging

import mlx.core as mx
import numpy as np
import pytest
import tiny_flux2
import tiny_qwen3
import torch
from flux2_layout import (
    COMFYUI_PREFIX,
    bfl_transformer_state,
    bfl_vae_name,
    bfl_vae_state,
    numpy_state,
    write_bfl_transformer,
)
from gguf_layout import dequantized, write_gguf
from safetensors.numpy import save_file
from test_gguf import stored
from test_pipeline import ReplayNoise, mean_abs_diff, ours_image
from zimage_layout import write_llama_cpp_qwen3

from convert.checkpoint import read_original
from convert.model import convert_model, write_model
from mlx_sd_server.cli import main as cli
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.flux2.single_file import flux2_transformer_config, flux2_vae_config
from mlx_sd_server.engine.families.flux2.spec import SPEC as FLUX2
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError
from mlx_sd_server.job import ModelDefaults, build_job

AXES = (4, 4, 4, 4)  # the tiny transformer's rotary split of its 16-dim heads
# and the tiny VAE's groups, and Qwen3-4B's rotary base (the tiny Qwen3's), which no safetensors file says
TINY = ArchitectureHints(axes_dims_rope=AXES, norm_num_groups=8, llm_rope_theta=1_000_000)
TRANSFORMER_ARCHITECTURE = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                            "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                            "timestep_guidance_channels", "mlp_ratio", "axes_dims_rope", "rope_theta", "eps",
                            "guidance_embeds")
VAE_ARCHITECTURE = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                    "decoder_block_out_channels", "layers_per_block", "act_fn", "latent_channels", "norm_num_groups",
                    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "batch_norm_eps",
                    "batch_norm_momentum", "patch_size")
PROMPT = "a photo of a cat"
WIDTH, HEIGHT = 96, 64


def read_flux2(diffusion_model, vae=None, llm=None, *, llm_tokenizer=None, hints=TINY):
    """FLUX.2's files read as `convert --diffusion-model FILE --vae FILE --llm FILE` reads them."""
    given = {option: path for option, path in (("--vae", vae), ("--llm", llm)) if path}
    return read_original(FLUX2, diffusion_model, given, llm_tokenizer=llm_tokenizer, hints=hints)


def config_of(config: dict, keys) -> dict:
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    return {key: plain(config.get(key)) for key in keys}


class Shape:
    """A tensor as the config readers see it: its shape only."""

    def __init__(self, *shape):
        self.shape = shape


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    """The tiny pipeline (a diffusers folder, distilled), its split files, and its folder's conversion."""
    root = tmp_path_factory.mktemp("flux2-files")
    pipe = tiny_flux2.make_pipeline(root / "diffusers")
    files = {
        "transformer": write_bfl_transformer(pipe.transformer, root / "flux-2-klein-4b.safetensors"),
        "comfyui": write_bfl_transformer(pipe.transformer, root / "flux-2-klein-4b-comfy.safetensors", COMFYUI_PREFIX),
        "vae": root / "flux2-vae.safetensors", "llm": root / "qwen_3_4b.safetensors",
        "tokenizer": root / "diffusers" / "tokenizer",
    }
    save_file(bfl_vae_state(pipe.vae), str(files["vae"]))
    save_file(numpy_state(pipe.text_encoder), str(files["llm"]))  # Qwen3ForCausalLM: `model.*` and an lm_head
    files["llm_gguf"] = write_llama_cpp_qwen3(pipe.text_encoder.model, root / "Qwen3-tiny-F32.gguf", "F32",
                                              files["tokenizer"] / "tokenizer.json", tiny_qwen3.QWEN3_CHAT_TEMPLATE)
    folder = convert_model(root / "diffusers", root / "klein-folder", dtype="float32", progress=False)
    return root, pipe, files, folder


# --- the transformer ------------------------------------------------------------------------------------

def test_the_layout_writer_is_what_diffusers_converts(flux2):
    """The test's writer against diffusers' own single-file converter: it must give back the model's weights."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    _, pipe, _, _ = flux2
    state = {k: torch.from_numpy(v) for k, v in bfl_transformer_state(pipe.transformer).items()}
    converted = convert_flux2_transformer_checkpoint_to_diffusers(state)
    expected = pipe.transformer.state_dict()
    assert sorted(converted) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("which", ["transformer", "comfyui"], ids=["bare", "comfyui-prefixed"])
def test_transformer_file_reads_to_the_diffusers_weights_and_config(flux2, which, caplog):
    root, pipe, files, _ = flux2
    caplog.set_level(logging.WARNING)
    source = read_flux2(files[which], files["vae"], files["llm"], llm_tokenizer=files["tokenizer"])
    config, weights = source.components["transformer"]
    assert config_of(config, TRANSFORMER_ARCHITECTURE) == config_of(pipe.transformer.config, TRANSFORMER_ARCHITECTURE)
    ours, expected = dict(weights), numpy_state(pipe.transformer)
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(ours[key], value), key
    assert source.family == "flux2" and source.prediction_type == "flow"
    assert source.scheduler == dict(FLUX2.scheduler)  # klein's: dynamic shifting, FLUX.2's empirical mu
    assert source.guessed == {}  # everything the files cannot tell was given (TINY)
    assert not any("unrecognised" in r.getMessage() for r in caplog.records)


def released_transformer_shapes(hidden: int, heads: int, double: int, single: int, text: int) -> dict[str, Shape]:
    """A klein transformer file's shapes (BFL's names), as Klein4BParams / Klein9BParams build it."""
    head, mlp = hidden // heads, 3 * hidden
    state = {"img_in.weight": Shape(hidden, 128), "txt_in.weight": Shape(hidden, text),
             "time_in.in_layer.weight": Shape(hidden, 256), "time_in.out_layer.weight": Shape(hidden, hidden),
             "single_stream_modulation.lin.weight": Shape(3 * hidden, hidden),
             "final_layer.linear.weight": Shape(128, hidden)}
    for i in range(double):
        state |= {f"double_blocks.{i}.img_attn.norm.query_norm.scale": Shape(head),
                  f"double_blocks.{i}.img_mlp.0.weight": Shape(2 * mlp, hidden)}
    for i in range(single):
        state |= {f"single_blocks.{i}.linear1.weight": Shape(3 * hidden + 2 * mlp, hidden)}
    return state


@pytest.mark.parametrize("size, shapes, expected", [
    ("4B", (3072, 24, 5, 20, 7680), {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                                     "joint_attention_dim": 7680}),
    ("9B", (4096, 32, 8, 24, 12288), {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                                      "joint_attention_dim": 12288}),
])
def test_released_shapes_give_diffusers_klein_configs(size, shapes, expected):
    """klein 4B's and 9B's shapes give diffusers' configs for them (scripts/convert_flux2_to_diffusers.py's
    klein-4b and klein-9b); the rotary split of their 128-dim heads is FLUX.2's, a near-certain guess."""
    from mlx_sd_server.engine.families.flux2.single_file import read_transformer

    state = released_transformer_shapes(*shapes)
    config = flux2_transformer_config(state)
    assert config == {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128,
                      "out_channels": None, "attention_head_dim": 128, "timestep_guidance_channels": 256,
                      "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6,
                      "guidance_embeds": False, **expected}, size
    component = read_transformer({COMFYUI_PREFIX + k: v for k, v in state.items()}, COMFYUI_PREFIX,
                                 ArchitectureHints())
    assert [(g.key, g.value, g.hint, g.standard) for g in component.guessed] == [
        ("axes_dims_rope", [32, 32, 32, 32], "axes_dims_rope", True)]


def test_other_head_sizes_need_the_rotary_split(flux2):
    root, pipe, files, _ = flux2
    with pytest.raises(CheckpointError, match="16-dim attention heads.*--axes-dims-rope"):
        read_flux2(files["transformer"], files["vae"], files["llm"], llm_tokenizer=files["tokenizer"],
                   hints=dataclasses.replace(TINY, axes_dims_rope=None))
    with pytest.raises(CheckpointError, match="four numbers summing to the head size, 16"):
        read_flux2(files["transformer"], files["vae"], files["llm"], llm_tokenizer=files["tokenizer"],
                   hints=dataclasses.replace(TINY, axes_dims_rope=(8, 8)))


def test_flux2_dev_is_refused(flux2, tmp_path, capsys):
    """A guidance embedding (FLUX.2 dev, whose text encoder is Mistral) is refused as for diffusers folders."""
    root, pipe, files, _ = flux2
    from diffusers import Flux2Transformer2DModel

    dev = Flux2Transformer2DModel(**{**pipe.transformer.config, "guidance_embeds": True})
    path = write_bfl_transformer(dev, tmp_path / "flux2-dev.safetensors")
    assert "guidance_in.in_layer.weight" in bfl_transformer_state(dev)
    with pytest.raises(CheckpointError, match="guidance embedding \\(FLUX.2 dev\\)"):
        read_flux2(path, files["vae"], files["llm"], llm_tokenizer=files["tokenizer"])
    assert cli(["convert", "--diffusion-model", str(path), str(tmp_path / "dev")]) == 1  # before asking for --llm
    message = capsys.readouterr().err
    assert "guidance embedding (FLUX.2 dev)" in message and "--llm" not in message


def test_scaled_fp8_files_are_refused(flux2, tmp_path):
    """Weights whose scales are tensors of their own (BFL's flux-2-klein-4b-fp8, ComfyUI's qwen_3_8b_fp8mixed)
    would convert unscaled."""
    root, pipe, files, _ = flux2
    transformer = bfl_transformer_state(pipe.transformer, COMFYUI_PREFIX)
    transformer[COMFYUI_PREFIX + "double_blocks.0.img_attn.qkv.weight_scale"] = np.ones((), np.float32)
    save_file(transformer, str(tmp_path / "flux-2-klein-4b-fp8.safetensors"))
    llm = numpy_state(pipe.text_encoder)
    llm["model.layers.0.mlp.up_proj.comfy_quant"] = np.frombuffer(b'{"format": "float8_e4m3fn"}', np.uint8).copy()
    save_file(llm, str(tmp_path / "qwen_3_4b_fp8mixed.safetensors"))
    for diffusion_model, llm_file in ((tmp_path / "flux-2-klein-4b-fp8.safetensors", files["llm"]),
                                      (files["transformer"], tmp_path / "qwen_3_4b_fp8mixed.safetensors")):
        with pytest.raises(CheckpointError, match="'scaled fp8' file .*not supported"):
            read_flux2(diffusion_model, files["vae"], llm_file, llm_tokenizer=files["tokenizer"])


# --- the autoencoder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bfl", "top-level-quant-convs", "vae-prefixed"])
def test_vae_file_reads_to_the_diffusers_weights_and_config(flux2, layout, tmp_path, caplog):
    """BFL's flux2-vae.safetensors (its step counter dropped), and the same with the quant convs at the top
    (the LDM layout's place, which ComfyUI also reads) or under a bundle's `vae.`."""
    root, pipe, files, _ = flux2
    caplog.set_level(logging.WARNING)
    path = files["vae"]
    if layout != "bfl":
        state = bfl_vae_state(pipe.vae, "vae." if layout == "vae-prefixed" else "")
        if layout == "top-level-quant-convs":
            state = {k.removeprefix("encoder.").removeprefix("decoder.") if "quant_conv" in k else k: v
                     for k, v in state.items()}
            assert "quant_conv.weight" in state and "post_quant_conv.weight" in state
        path = tmp_path / "vae.safetensors"
        save_file(state, str(path))
    source = read_flux2(files["transformer"], path, files["llm"], llm_tokenizer=files["tokenizer"])
    config, weights = source.components["vae"]
    assert config["_class_name"] == "AutoencoderKLFlux2"
    assert config_of(config, VAE_ARCHITECTURE) == config_of(pipe.vae.config, VAE_ARCHITECTURE)
    ours = dict(weights)
    expected = {k: v for k, v in numpy_state(pipe.vae).items() if k != "bn.num_batches_tracked"}
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(ours[key], value), key
    assert not any("unrecognised" in r.getMessage() for r in caplog.records)


def test_released_vae_shapes_give_diffusers_config():
    """The released autoencoder's shapes (diffusers' AutoencoderKLFlux2 defaults, built on the meta device)
    give its config; its group norms' count is a near-certain guess at those widths."""
    from diffusers import AutoencoderKLFlux2

    from mlx_sd_server.engine.families.flux2.single_file import read_vae

    with torch.device("meta"):
        released = AutoencoderKLFlux2()
    config = dict(released.config)
    state = {bfl_vae_name(k, config): Shape(*v.shape) for k, v in released.state_dict().items()}
    ours = flux2_vae_config(state, FLUX2.latent["flux2"], 1024, ArchitectureHints())
    assert config_of(ours, VAE_ARCHITECTURE) == config_of(config, VAE_ARCHITECTURE)
    component = read_vae(state, "", FLUX2.latent["flux2"], 1024, ArchitectureHints())
    assert [(g.key, g.value, g.standard) for g in component.guessed] == [("norm_num_groups", 32, True)]


def test_a_flux1_autoencoder_is_not_flux2s(flux2, tmp_path):
    """FLUX.1's ae.safetensors (no batch norm) given as --vae, and an autoencoder of other latent channels."""
    root, pipe, files, _ = flux2
    state = {k: v for k, v in bfl_vae_state(pipe.vae).items() if not k.startswith("bn.")}
    save_file(state, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match="is not the FLUX.2 autoencoder.*bn.running_mean"):
        read_flux2(files["transformer"], tmp_path / "ae.safetensors", files["llm"], llm_tokenizer=files["tokenizer"])
    other = tiny_flux2.vae()
    from diffusers import AutoencoderKLFlux2

    other = AutoencoderKLFlux2(**{**other.config, "latent_channels": 16})
    save_file(bfl_vae_state(other), str(tmp_path / "vae16.safetensors"))
    with pytest.raises(CheckpointError, match="16 latent channels, and FLUX.2's has 32"):
        read_flux2(files["transformer"], tmp_path / "vae16.safetensors", files["llm"], llm_tokenizer=files["tokenizer"])


# --- the text encoder -----------------------------------------------------------------------------------

def test_qwen3_safetensors_reads_to_the_transformers_weights(flux2):
    """ComfyUI's qwen_3_4b.safetensors (Qwen3ForCausalLM's names, an LM head) -> the encoder's weights."""
    root, pipe, files, _ = flux2
    source = read_flux2(files["transformer"], files["vae"], files["llm"], llm_tokenizer=files["tokenizer"])
    config, weights = source.components["text_encoder"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (tiny_flux2.HIDDEN, tiny_flux2.TEXT_LAYERS)
    ours, expected = dict(weights), numpy_state(pipe.text_encoder.model)
    assert sorted(ours) == sorted(expected)  # (the LM head left out)
    for key, value in expected.items():
        assert np.array_equal(ours[key], value), key
    assert source.tokenizers["text_encoder"] == files["tokenizer"]


def test_a_text_encoder_klein_cannot_read_is_refused(flux2, tmp_path):
    """Another width than the transformer reads (Qwen3-4B's file with klein 9B's), or too few layers."""
    root, pipe, files, _ = flux2
    narrow = tiny_qwen3.qwen3_model(seed=5, causal_lm=True, num_hidden_layers=tiny_flux2.TEXT_LAYERS, hidden_size=48)
    save_file(numpy_state(narrow), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(CheckpointError, match="reads 3 stacked 64-wide Qwen3 hidden states.*48 wide"):
        read_flux2(files["transformer"], files["vae"], tmp_path / "narrow.safetensors",
                   llm_tokenizer=files["tokenizer"])
    shallow = tiny_qwen3.qwen3_model(seed=5, causal_lm=True, num_hidden_layers=12)
    save_file(numpy_state(shallow), str(tmp_path / "shallow.safetensors"))
    with pytest.raises(CheckpointError, match="has 12 layers"):
        read_flux2(files["transformer"], files["vae"], tmp_path / "shallow.safetensors",
                   llm_tokenizer=files["tokenizer"])


# --- GGUF -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name, prefix", [("Q8_0", ""), ("Q4_0", COMFYUI_PREFIX)],
                         ids=["Q8_0-bare", "Q4_0-comfyui-prefixed"])
def test_gguf_transformer_converts_to_exactly_its_dequantized_weights(flux2, tmp_path, type_name, prefix):
    """A quantized klein transformer (BFL's names, bare as city96's files or prefixed as stable-diffusion.cpp's):
    its weights are the file's, dequantized, and its Q8_0/Q4_0 linear layers keep the file's blocks."""
    root, pipe, files, _ = flux2
    path = write_gguf(bfl_transformer_state(pipe.transformer, prefix), tmp_path / f"klein-{type_name}.gguf",
                      type_name)
    twin = tmp_path / f"klein-{type_name}-twin.safetensors"
    save_file(dequantized(path), str(twin))

    def convert(diffusion_model, name):
        source = read_flux2(diffusion_model, files["vae"], files["llm"], llm_tokenizer=files["tokenizer"])
        return write_model(source, tmp_path / name, name=name, dtype="float32", progress=False)

    ours, reference = convert(path, "gguf"), convert(twin, "twin")
    weights, layers = stored(ours, "transformer")
    expected, _ = stored(reference, "transformer")
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(weights[key], value), key
    bits = {"Q8_0": 8, "Q4_0": 4}[type_name]
    quantized = [f"transformer_blocks.0.attn.{part}" for part in ("to_q", "to_k", "to_v", "add_q_proj", "to_out.0")]
    quantized += ["transformer_blocks.0.ff.linear_in", "single_transformer_blocks.2.attn.to_qkv_mlp_proj",
                  "single_transformer_blocks.0.attn.to_out", "double_stream_modulation_img.linear"]
    for layer in quantized:
        assert layers[layer] == (bits, 32), layer
    assert "x_embedder" not in layers  # stable-diffusion.cpp keeps the input layers float
    error = max(float(np.abs(weights[k] - v).max()) for k, v in numpy_state(pipe.transformer).items())
    print(f"FLUX.2 klein {type_name} GGUF: largest weight error against the float model {error:.2e}")
    image = generate(ours)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and np.isfinite(image).all()


# --- the whole model ------------------------------------------------------------------------------------

def noise(seed: int = 0) -> np.ndarray:
    """Noise in the transformer's latent space, NCHW as diffusers takes `latents`: 128 channels at 1/16."""
    return np.random.default_rng(seed).standard_normal((1, 128, HEIGHT // 16, WIDTH // 16)).astype(np.float32)


def generate(folder) -> np.ndarray:
    manifest = read_manifest(folder)
    job = build_job({"prompt": PROMPT, "width": WIDTH, "height": HEIGHT},  # the manifest's 4 euler steps
                    defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))
    return ours_image(DiffusionPipeline(load_model(folder, dtype="float32"), paste_back=False), job,
                      ReplayNoise(noise(), []))


@pytest.mark.parametrize("llm", ["llm", "llm_gguf"], ids=["qwen3-safetensors", "qwen3-gguf"])
def test_split_file_convert_generates_the_folder_s_image(flux2, tmp_path, llm):
    """`convert --diffusion-model --vae --llm` (the GGUF with its own tokenizer), then an image: the same weights
    as the diffusers folder's conversion, the same manifest settings (distilled, by name), the same image, and
    diffusers' Flux2KleinPipeline's."""
    root, pipe, files, folder = flux2
    argv = ["convert", "--diffusion-model", str(files["transformer"]), "--vae", str(files["vae"]), "--llm",
            str(files[llm]), "--dtype", "float32", "--axes-dims-rope", ",".join(map(str, AXES)),
            "--norm-num-groups", "8", "--llm-rope-theta", "1000000", "--model-dir", str(tmp_path)]
    if llm == "llm":
        argv += ["--llm-tokenizer", str(files["tokenizer"])]
    assert cli(argv) == 0
    split = tmp_path / "flux-2-klein-4b"  # (named after the transformer's file, as the model directory does)
    ours, reference = read_manifest(split), read_manifest(folder)
    assert ours["family"] == "flux2" and ours["name"] == "flux-2-klein-4b"
    assert ours["defaults"] == reference["defaults"] and ours["defaults"]["steps"] == 4  # distilled, by name
    assert ours["scheduler"] == reference["scheduler"]
    assert "guessed" not in ours
    for name in ("transformer", "vae", "text_encoder"):
        weights = mx.load(str(split / ours["components"][name]["weights"]))
        expected = mx.load(str(folder / reference["components"][name]["weights"]))
        assert sorted(weights) == sorted(expected), name
        for key in expected:
            assert np.array_equal(np.array(weights[key]), np.array(expected[key])), f"{name}: {key}"
    image = generate(split)
    diff = mean_abs_diff(image, generate(folder))
    with torch.no_grad():
        diffusers_image = pipe(prompt=PROMPT, width=WIDTH, height=HEIGHT, latents=torch.from_numpy(noise()),
                               num_inference_steps=4, guidance_scale=1.0, output_type="np").images
    against_diffusers = mean_abs_diff(image, diffusers_image)
    print(f"FLUX.2 klein split files ({llm}): image mean abs diff {diff:.2e} against the folder's conversion, "
          f"{against_diffusers:.2e} against diffusers")
    assert diff <= 1 / 255 and against_diffusers <= 1 / 255


def test_the_base_model_is_told_by_its_name(flux2, tmp_path):
    """Without a pipeline config, klein base (50 steps, CFG 4) is told from klein by the file's name."""
    root, pipe, files, _ = flux2
    source = read_flux2(files["transformer"], files["vae"], files["llm"], llm_tokenizer=files["tokenizer"])
    folder = write_model(source, tmp_path / "base", name="flux-2-klein-base-4b", dtype="float32", progress=False)
    defaults = read_manifest(folder)["defaults"]
    assert (defaults["steps"], defaults["cfg_scale"]) == (50, 4.0)


def test_split_files_say_what_is_missing(flux2, tmp_path, capsys):
    root, pipe, files, _ = flux2
    assert cli(["convert", "--diffusion-model", str(files["transformer"]), str(tmp_path / "x")]) == 1
    message = capsys.readouterr().err
    assert "--vae" in message and "--llm" in message and "FLUX.2 autoencoder" in message
    assert cli(["convert", "--diffusion-model", str(files["transformer"]), "--vae", str(files["vae"]), "--clip-l",
                str(files["llm"]), str(tmp_path / "y")]) == 1
    assert "--clip-l is for" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "xy")
