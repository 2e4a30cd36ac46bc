"""GGUF files (stable-diffusion.cpp's layout, each ggml type people use) as a conversion source.

Tiny random models are written as stable-diffusion.cpp writes them (`gguf_layout`, with the gguf package's
GGUFWriter and quantizers) and converted. The reference for every type is the same file dequantized by the gguf
package itself and saved as a float32 safetensors "twin": a GGUF must convert to exactly the twin's weights.
Q4_0/Q4_1/Q8_0 linear weights are stored in MLX's quantized layout instead, and MLX's dequantization of them
must be those same weights, bit for bit.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_diffusers
import tiny_flux
from bfl_layout import bfl_state
from convert.checkpoint import load_checkpoint, read_checkpoint
from convert.gguf_source import MLX_BITS, QuantizedArray
from convert.model import write_model
from convert.source import read_state_dict
from gguf_layout import TYPES, dequantized, llama_cpp_t5_name, types_in, write_gguf
from ldm_layout import checkpoint_state, with_tokenizers
from mlx_sd_server.engine import model_io
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.model_io import component_kind, load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline, drive
from mlx_sd_server.job import ModelDefaults, build_job
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError
from test_flux_files import TINY as FLUX_TINY, clip_file_state, read_flux_files, vae_file_state
from test_pipeline import mean_abs_diff

TINY = ArchitectureHints(unet_head_dim=16, text_head_dim=8, norm_num_groups=8)
# Image error of a Q8_0 file against its float32 source: mean |difference| of the 8-bit images on a 0-1 scale, tiny
# SD 1.x, 4 euler_a steps at 64x64 (pixel std 0.15). Measured 0.00043-0.00068 over seeds 42, 1-4 (F16: 0.00008,
# BF16: 0.0005-0.0007, Q5_0: 0.003-0.004, Q4_0: 0.006-0.011); the bound is 3x the largest.
Q8_0_IMAGE_ERROR = 0.002


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """sd(family, type) -> (GGUF file, its dequantized safetensors twin, the float32 source file); built once."""
    root = tmp_path_factory.mktemp("gguf")
    pipes, built = {}, {}

    def build(family: str, type_name: str = "F32"):
        if family not in pipes:
            pipe = tiny_diffusers.make_pipeline(root / family, family)
            pipes[family] = checkpoint_state(pipe, family)
            save_file(pipes[family], str(root / f"{family}.safetensors"))
        if (family, type_name) not in built:
            path = write_gguf(pipes[family], root / f"{family}-{type_name}.gguf", type_name)
            twin = root / f"{family}-{type_name}-twin.safetensors"
            save_file(dequantized(path), str(twin))
            built[family, type_name] = path, twin, root / f"{family}.safetensors"
        return built[family, type_name]

    return build


def convert(path, dst, **options):
    """Every file `sd` builds is named after the family, whose tiny pipeline folder holds its tokenizers."""
    source = with_tokenizers(read_checkpoint(path, hints=TINY), path.parent / re.match(r"[a-z0-9]+", path.name)[0])
    return write_model(source, dst, name=dst.name, dtype=options.pop("dtype", "float32"), progress=False, **options)


def stored(folder, component: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """A converted component's weights as float32 (quantized layers dequantized in float32 from their stored
    scales and biases), and its quantized layers' (bits, group size), as their arrays' shapes say."""
    entry = read_manifest(folder)["components"][component]
    saved = mx.load(str(folder / entry["weights"]))
    module = component_kind(component, entry["config"]).build(entry["config"])
    layers = {path: (s["bits"], s["group_size"]) for path, s in model_io.quantized_layers(module, saved).items()}
    weights = {}
    for key, value in saved.items():
        path = key.rpartition(".")[0]
        if key.endswith((".scales", ".biases")):
            continue
        if path in layers and key.endswith(".weight"):
            scales, biases = (saved[f"{path}.{p}"].astype(mx.float32) for p in ("scales", "biases"))
            value = mx.dequantize(value, scales, biases, layers[path][1], layers[path][0])
        weights[key] = np.array(value.astype(mx.float32))
    return weights, layers


def loaded_layers(folder, component: str) -> dict[str, tuple[int, int]]:
    """Each quantized layer of the loaded model: (bits, group size) as load_model built it."""
    module = load_model(folder, dtype="float32").components.get(component)
    return {path: (m.bits, m.group_size) for path, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)}


# --- reading --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", TYPES)
def test_reader_gives_each_tensor_in_its_torch_shape_as_gguf_dequantizes_it(sd, type_name):
    path, _, source = sd("sd1", type_name)
    state = load_file(str(source))
    raw, _ = read_state_dict(path)
    types = types_in(path)
    assert sum(t == type_name for t in types.values()) >= 5  # the file really is of that type
    assert sorted(raw) == sorted(state)
    reference = dequantized(path)
    for key, tensor in raw.items():
        assert tensor.shape == (state[key].shape or (1,)), key  # ggml's dims reversed back
        value = tensor.dequantize()
        assert value.dtype == reference[key].dtype and np.array_equal(value, reference[key]), key
        if types[key] == "F32":
            assert np.array_equal(value, state[key].astype(np.float32).reshape(tensor.shape)), key
        packed = isinstance(value, QuantizedArray) and value.packed is not None
        assert packed == (types[key] in MLX_BITS and value.ndim == 2), key


# --- converting -----------------------------------------------------------------------------------------

CONVERSIONS = ([("sd1", t) for t in TYPES] + [("sd2v", t) for t in ("Q4_0", "Q6_K")]
               + [("sdxl", t) for t in ("Q8_0", "Q4_1", "Q5_0", "Q4_K")])


@pytest.mark.parametrize("family, type_name", CONVERSIONS, ids=[f"{f}-{t}" for f, t in CONVERSIONS])
def test_gguf_converts_to_exactly_its_dequantized_weights(sd, tmp_path, family, type_name):
    path, twin, _ = sd(family, type_name)
    ours, reference = convert(path, tmp_path / "gguf"), convert(twin, tmp_path / "twin")
    manifest = read_manifest(ours)
    assert manifest["components"].keys() == read_manifest(reference)["components"].keys()
    passed_through = 0
    for component in manifest["components"]:
        weights, layers = stored(ours, component)
        expected, _ = stored(reference, component)
        assert sorted(weights) == sorted(expected), component
        for key, value in expected.items():
            assert np.array_equal(weights[key], value), f"{component}: {key}"
        # Q4_0/Q4_1/Q8_0 linear weights keep the file's quantization: its bits, groups of 32; nothing else is quantized
        assert set(layers.values()) <= ({(MLX_BITS[type_name], 32)} if type_name in MLX_BITS else set()), component
        passed_through += len(layers)
    if type_name in MLX_BITS:
        assert passed_through >= 20
        assert manifest["quantization"] == {"bits": MLX_BITS[type_name], "group_size": 32}
    else:
        assert manifest["quantization"] is None


def test_pass_through_layers_load_as_quantized_layers_that_compute_like_the_twin(sd, tmp_path):
    path, twin, _ = sd("sd1", "Q4_0")
    ours, reference = convert(path, tmp_path / "gguf"), convert(twin, tmp_path / "twin")
    layers = loaded_layers(ours, "unet")
    assert len(layers) > 50 and set(layers.values()) == {(4, 32)}
    x, t, context = mx.random.normal((1, 8, 8, 4), key=mx.random.key(0)), mx.array([500.0]), mx.random.normal(
        (1, 77, tiny_diffusers.TEXT_DIM), key=mx.random.key(1))
    a = load_model(ours, dtype="float32").unet(x, t, context)
    b = load_model(reference, dtype="float32").unet(x, t, context)
    assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(b).max())


def test_float16_conversion_keeps_the_scales_exact(sd, tmp_path):
    path, twin, _ = sd("sd1", "Q8_0")
    ours, reference = convert(path, tmp_path / "gguf", dtype="float16"), convert(twin, tmp_path / "twin")
    saved = mx.load(str(ours / "unet.safetensors"))
    assert {saved[k].dtype for k in saved if k.endswith((".scales", ".biases"))} == {mx.float16}
    weights, layers = stored(ours, "unet")
    expected, _ = stored(reference, "unet")
    for module in layers:
        assert np.array_equal(weights[f"{module}.weight"], expected[f"{module}.weight"]), module


def test_quantize_option_quantizes_the_rest_and_keeps_the_files_layers(sd, tmp_path):
    path, _, _ = sd("sd1", "Q4_1")
    from_file = loaded_layers(convert(path, tmp_path / "as-is"), "unet")
    ours = convert(path, tmp_path / "q8", quantize=8)
    assert read_manifest(ours)["quantization"] == {"bits": 8, "group_size": 64}
    layers = loaded_layers(ours, "unet")
    assert {m: layers[m] for m in from_file} == from_file and set(from_file.values()) == {(4, 32)}
    others = {layers[m] for m in layers.keys() - from_file.keys()}
    assert others == {(8, 64)}
    # e.g. time_embed, which stable-diffusion.cpp keeps float, is quantized as asked
    assert layers["time_embedding.linear_2"] == (8, 64)
    out = load_model(ours, dtype="float32").unet(mx.zeros((1, 8, 8, 4)), mx.array([500.0]),
                                                  mx.zeros((1, 77, tiny_diffusers.TEXT_DIM)))
    assert np.isfinite(np.array(out)).all()


# --- generating -----------------------------------------------------------------------------------------

def generate(folder, **fields) -> np.ndarray:
    manifest = read_manifest(folder)
    job = build_job({"prompt": "a photo of a cat", "steps": 4, "size": "64x64", **fields},
                    defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))
    images = drive(DiffusionPipeline(load_model(folder, dtype="float32")).generate(job))
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


def test_q8_0_generation_stays_within_its_quantization_error(sd, tmp_path):
    path, _, source = sd("sd1", "Q8_0")
    reference = generate(convert(source, tmp_path / "f32"))
    error = mean_abs_diff(generate(convert(path, tmp_path / "q8")), reference)
    assert 0 < error < Q8_0_IMAGE_ERROR, error


# --- FLUX -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny schnell pipeline and its split files: safetensors ae, clip_l and t5xxl, and t5xxl as a llama.cpp
    style Q8_0 GGUF; the transformer is written per test."""
    root = tmp_path_factory.mktemp("flux-gguf")
    pipe = tiny_flux.make_pipeline(root / "diffusers", "schnell")
    files = {"vae": root / "ae.safetensors", "clip_l": root / "clip_l.safetensors", "t5xxl": root / "t5xxl.safetensors"}
    save_file(vae_file_state(pipe.vae), str(files["vae"]))
    save_file(clip_file_state(pipe.text_encoder), str(files["clip_l"]))
    t5 = {k: v.detach().numpy() for k, v in pipe.text_encoder_2.state_dict().items()
          if k != "encoder.embed_tokens.weight"}  # llama.cpp's T5 files hold the embedding once
    save_file(t5, str(files["t5xxl"]))
    files["t5xxl_gguf"] = write_gguf(t5, root / "t5-v1_1-xxl-encoder-Q8_0.gguf", "Q8_0", rename=llama_cpp_t5_name)
    files["t5_names"] = list(t5)
    return root, pipe, files


def bfl_numpy(transformer, prefix: str = "") -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in bfl_state(transformer.state_dict(), prefix).items()}


def read_flux(root, files, diffusion_model, t5xxl=None):
    source = read_flux_files(diffusion_model, files["vae"], files["clip_l"], t5xxl or files["t5xxl"],
                             t5_tokenizer=root / "diffusers" / "tokenizer_2", axes_dims_rope=list(tiny_flux.AXES),
                             t5_max_distance=20, hints=FLUX_TINY)
    return with_tokenizers(source, root / "diffusers")


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
def test_flux_transformer_gguf_with_safetensors_beside_it_converts_exactly_and_runs(flux, tmp_path, type_name):
    root, pipe, files = flux
    state = bfl_numpy(pipe.transformer, "model.diffusion_model.")  # stable-diffusion.cpp's prefix
    path = write_gguf(state, tmp_path / f"flux1-schnell-{type_name}.gguf", type_name)
    twin = tmp_path / "twin.safetensors"
    save_file(dequantized(path), str(twin))
    ours = write_model(read_flux(root, files, path), tmp_path / "gguf", name="gguf", dtype="float32", progress=False)
    reference = write_model(read_flux(root, files, twin), tmp_path / "twin", name="twin", dtype="float32",
                            progress=False)
    weights, layers = stored(ours, "transformer")
    expected, _ = stored(reference, "transformer")
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(weights[key], value), key
    bits = MLX_BITS[type_name]
    # the fused projections (BFL's qkv, linear1) are split into whole rows: each part keeps the file's blocks
    for part in ("to_q", "to_k", "to_v"):
        assert layers[f"transformer_blocks.0.attn.{part}"] == (bits, 32)
        assert layers[f"single_transformer_blocks.0.attn.{part}"] == (bits, 32)
    assert layers["single_transformer_blocks.0.proj_mlp"] == (bits, 32)
    assert "x_embedder" not in layers and "proj_out" not in layers  # stable-diffusion.cpp keeps these float
    assert read_manifest(ours)["quantization"] == {"bits": bits, "group_size": 32}

    manifest = read_manifest(ours)
    job = build_job({"prompt": "a cat", "steps": 2, "size": "64x64"}, defaults=ModelDefaults(**manifest["defaults"]),
                    capabilities=capabilities(manifest))
    images = drive(DiffusionPipeline(load_model(ours, dtype="float32")).generate(job))
    assert images[0].size == (64, 64)


def test_t5xxl_gguf_in_llama_cpp_names(flux, tmp_path):
    root, pipe, files = flux
    diffusion_model = tmp_path / "flux1-schnell.safetensors"
    save_file(bfl_numpy(pipe.transformer), str(diffusion_model))
    assert any(name.startswith("enc.blk.0.attn_q") for name in types_in(files["t5xxl_gguf"]))
    twin = tmp_path / "t5-twin.safetensors"
    values = dequantized(files["t5xxl_gguf"])
    save_file({name: values[llama_cpp_t5_name(name)] for name in files["t5_names"]}, str(twin))
    ours = write_model(read_flux(root, files, diffusion_model, files["t5xxl_gguf"]), tmp_path / "gguf", name="g",
                       dtype="float32", progress=False)
    reference = write_model(read_flux(root, files, diffusion_model, twin), tmp_path / "twin", name="t",
                            dtype="float32", progress=False)
    weights, layers = stored(ours, "text_encoder_2")
    expected, _ = stored(reference, "text_encoder_2")
    assert sorted(weights) == sorted(expected) and layers and set(layers.values()) == {(8, 32)}
    for key, value in expected.items():
        assert np.array_equal(weights[key], value), key


# --- broken files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header only"])
def test_corrupt_gguf_gives_a_clear_error(sd, tmp_path, damage):
    data = sd("sd1", "Q8_0")[0].read_bytes()
    path = tmp_path / "model.gguf"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x10" * 64 + data[64:], "empty": b"",
                      "header only": data[:100]}[damage])
    with pytest.raises(CheckpointError, match="cannot read .* as a GGUF file"):
        load_checkpoint(path, hints=TINY)


def test_unsupported_ggml_type_is_named(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(tmp_path / "iq.gguf"), "stable-diffusion")
    writer.add_tensor("model.diffusion_model.x.weight", np.zeros((4, 66), np.uint8), raw_shape=(4, 66),
                      raw_dtype=GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        load_checkpoint(tmp_path / "iq.gguf")
