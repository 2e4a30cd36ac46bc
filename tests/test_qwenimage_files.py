"""Qwen-Image's split files (ComfyUI's transformer, bf16/fp8 or a city96 GGUF; qwen_image_vae.safetensors in Wan's
layout; Qwen2.5-VL as ComfyUI's qwen_2.5_vl_7b*.safetensors, scaled fp8, or a llama.cpp GGUF) -> diffusers layout,
against the tiny diffusers pipeline they were written from.

The files are written here as the inverse of the readers' maps, independently of them (the autoencoder's layout
checked against diffusers' own convert_wan_vae_to_diffusers). Read back (`qwenimage.single_file`), they give exactly
the pipeline's weights (fp8 and GGUF files: exactly their dequantized tensors) and configs that build its modules.
The tiny Qwen2.5-VL has Qwen2.5-VL's head sizes (128 in the language model, 80 in the vision tower), its rotary
sections and its full-attention rule (every 8th vision block), which its weights do not say.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_qwen25vl
import tiny_qwenimage
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf_layout import dequantized, encode, write_gguf
from safetensors.numpy import save_file

from convert.checkpoint import read_original
from mlx_sd_server.cli import main as cli
from mlx_sd_server.engine.families.qwenimage import single_file
from mlx_sd_server.engine.families.qwenimage.spec import SPEC as QWENIMAGE
from mlx_sd_server.engine.families.qwenimage.transformer import QwenImageTransformerConfig
from mlx_sd_server.engine.families.spec import OriginalLayout
from mlx_sd_server.engine.model_io import read_manifest
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError
from mlx_sd_server.engine.text.qwen25vl import Qwen25VLEncoderConfig

AXES = (8, 12, 12)  # the tiny transformer's rotary split of its 32-dim heads
TINY = ArchitectureHints(axes_dims_rope=AXES)
COMFYUI_PREFIX = "model.diffusion_model."
TEXT = dict(
    hidden_size=256,
    intermediate_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
)
VISION = dict(
    hidden_size=160, num_heads=2, depth=8, fullatt_block_indexes=[7], intermediate_size=64, out_hidden_size=256
)


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}


# --- the files, written from diffusers' and transformers' modules -----------------------------------------

WAN_PARTS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
WAN_TOP = {
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
    "encoder.conv_in": "encoder.conv1",
    "decoder.conv_in": "decoder.conv1",
    "encoder.norm_out": "encoder.head.0",
    "encoder.conv_out": "encoder.head.2",
    "decoder.norm_out": "decoder.head.0",
    "decoder.conv_out": "decoder.head.2",
}


def wan_vae_name(key: str, num_res_blocks: int) -> str:
    """A diffusers AutoencoderKLQwenImage key -> Wan 2.1's original one."""
    module, _, param = key.rpartition(".")
    if module in WAN_TOP:
        return f"{WAN_TOP[module]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", module):
        return f"{m[1]}.middle.{2 * int(m[2])}.{WAN_PARTS[m[3]]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
        return f"{m[1]}.middle.1.{m[2]}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", module):
        return f"encoder.downsamples.{m[1]}.{WAN_PARTS.get(m[2], m[2])}.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}.{WAN_PARTS[m[3]]}.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", module):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{m[2]}.{param}"
    raise KeyError(key)


def wan_vae_state(vae) -> dict[str, np.ndarray]:
    return {wan_vae_name(k, vae.config.num_res_blocks): v for k, v in numpy_state(vae).items()}


def comfyui_llm_state(model) -> dict[str, np.ndarray]:
    """A transformers 5 Qwen2_5_VLForConditionalGeneration in the older names ComfyUI's file keeps."""
    state = {}
    for key, value in numpy_state(model).items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        state[key] = value
    return state


LLAMA_CPP = {
    "model.embed_tokens.": "token_embd.",
    "model.norm.": "output_norm.",
    "lm_head.": "output.",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_name(key: str) -> str:
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(\w+)", key):
        return f"blk.{m[1]}.{LLAMA_CPP[m[2]]}.{m[3]}"
    for old, new in LLAMA_CPP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


def write_llama_cpp_qwen25vl(model, path: Path, type_name: str) -> Path:
    """The language model as llama.cpp's convert_hf_to_gguf.py writes Qwen2.5-VL (architecture qwen2vl; the
    vision tower goes to a separate mmproj file), quantized to `type_name`."""
    config = model.config.text_config
    writer = GGUFWriter(str(path), "qwen2vl")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_sections([16, 24, 24, 0])
    rng = np.random.default_rng(0)
    for key, value in comfyui_llm_state(model).items():
        if key.startswith("visual."):
            continue
        data, written = encode(key, value, type_name, rng)
        if data.dtype == np.uint8:
            writer.add_tensor(llama_cpp_name(key), data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType[written])
        else:
            writer.add_tensor(llama_cpp_name(key), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_scaled_fp8(state: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """`state` as ComfyUI's scaled fp8 files hold it (every 2-D weight as e4m3 of weight / scale, its scalar
    `scale_weight` and a `scale_input` beside it, an empty `scaled_fp8` marker); returns the values they give."""
    from safetensors.torch import save_file as save_torch

    out, given = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in state.items():
        tensor = torch.from_numpy(value)
        if key.endswith(".weight") and value.ndim == 2 and "embed" not in key:
            scale = tensor.abs().max() / 448
            fp8 = (tensor / scale).to(torch.float8_e4m3fn)
            out[key], out[key[:-6] + "scale_weight"] = fp8, scale.reshape(())
            out[key[:-6] + "scale_input"] = torch.ones(())
            given[key] = (fp8.float() * scale).numpy()
        else:
            out[key], given[key] = tensor.to(torch.bfloat16), tensor.to(torch.bfloat16).float().numpy()
    save_torch(out, str(path))
    return given


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(the diffusers folder, its pipeline, the files written from it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2TokenizerFast

    root = tmp_path_factory.mktemp("qwenimage")
    tokenizer = tiny_qwen25vl.write_qwen25vl_tokenizer(root / "tok")
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**tiny_qwenimage.SCHEDULER),
        vae=tiny_qwenimage.vae(),
        text_encoder=tiny_qwen25vl.qwen25vl_model(seed=4, text_overrides=TEXT, vision_overrides=VISION),
        tokenizer=Qwen2TokenizerFast.from_pretrained(str(tokenizer)),
        transformer=tiny_qwenimage.transformer(seed=5, joint_attention_dim=TEXT["hidden_size"]),
    )
    folder = root / "Qwen-Image"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "tokenizer" / "tokenizer.json").write_bytes((tokenizer / "tokenizer.json").read_bytes())
    files = {"tokenizer": tokenizer, "dir": root}
    transformer = numpy_state(pipe.transformer)
    save_file({COMFYUI_PREFIX + k: v for k, v in transformer.items()}, str(root / "qwen_image_bf16.safetensors"))
    files["transformer"] = root / "qwen_image_bf16.safetensors"
    save_file(wan_vae_state(pipe.vae), str(root / "qwen_image_vae.safetensors"))
    files["vae"] = root / "qwen_image_vae.safetensors"
    save_file(comfyui_llm_state(pipe.text_encoder), str(root / "qwen_2.5_vl_7b.safetensors"))
    files["llm"] = root / "qwen_2.5_vl_7b.safetensors"
    return folder, pipe, files


def read_qwen(diffusion_model, vae, llm, hints=TINY, tokenizer=None):
    return read_original(QWENIMAGE, diffusion_model, {"--vae": vae, "--llm": llm}, llm_tokenizer=tokenizer, hints=hints)


def assert_same(weights, expected: dict[str, np.ndarray], what: str) -> None:
    weights = dict(weights)
    assert sorted(weights) == sorted(expected), what
    for key, value in expected.items():
        assert weights[key].shape == value.shape and np.array_equal(weights[key], value), f"{what}: {key}"


# --- the tests --------------------------------------------------------------------------------------------


def test_wan_layout_writer_is_what_diffusers_converts(qwen):
    """The test's Wan-layout autoencoder is what diffusers' convert_wan_vae_to_diffusers reads back."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    _, pipe, _ = qwen
    converted = convert_wan_vae_to_diffusers(wan_vae_state(pipe.vae))
    assert_same(converted, numpy_state(pipe.vae), "diffusers' conversion")


def test_split_files_read_to_the_pipeline_s_weights_and_configs(qwen):
    """ComfyUI's files: every tensor as the pipeline's (the text encoder in a Qwen2_5_VLForConditionalGeneration
    checkpoint's older names, its LM head left out); configs that build the same modules."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    _, pipe, files = qwen
    source = read_qwen(files["transformer"], files["vae"], files["llm"], tokenizer=files["tokenizer"])
    assert source.family == "qwenimage" and source.prediction_type == "flow"
    assert {k: source.scheduler[k] for k in tiny_qwenimage.SCHEDULER} == tiny_qwenimage.SCHEDULER
    (t_config, t_weights), (v_config, v_weights), (l_config, l_weights) = (
        source.components[n] for n in ("transformer", "vae", "text_encoder")
    )
    assert_same(t_weights, numpy_state(pipe.transformer), "transformer")
    assert_same(v_weights, numpy_state(pipe.vae), "vae")
    expected_llm = {k: v for k, v in comfyui_llm_state(pipe.text_encoder).items() if k != "lm_head.weight"}
    assert_same(l_weights, expected_llm, "text_encoder")
    ours = {k: v for k, v in t_config.items() if not k.startswith("_")}
    assert QwenImageTransformerConfig.from_dict(ours) == QwenImageTransformerConfig.from_dict(
        dict(pipe.transformer.config)
    )
    assert QwenImageTransformer2DModel(**ours).state_dict().keys() == pipe.transformer.state_dict().keys()
    vae_config = {k: v for k, v in v_config.items() if not k.startswith("_")}
    assert {
        k: list(v) if isinstance(v, tuple) else v for k, v in dict(pipe.vae.config).items() if k in vae_config
    } == vae_config
    assert AutoencoderKLQwenImage(**vae_config).state_dict().keys() == pipe.vae.state_dict().keys()
    reference = pipe.text_encoder.config.to_dict()
    ours_llm, theirs = Qwen25VLEncoderConfig.from_dict(l_config), Qwen25VLEncoderConfig.from_dict(reference)
    assert ours_llm.vision == theirs.vision
    token_ids = ("image_token_id", "vision_start_token_id", "vision_end_token_id")  # the released tokenizer's
    assert dataclasses.replace(ours_llm.text, **{k: getattr(theirs.text, k) for k in token_ids}) == theirs.text
    assert source.tokenizers["text_encoder"] == files["tokenizer"]


def test_edit_2511_flag_and_refused_transformers(qwen, tmp_path):
    """ComfyUI's `__index_timestep_zero__` is Edit-2511's zero_cond_t (not a weight); Qwen-Image-Layered and
    Qwen-Image 2.1 are refused by name."""
    _, pipe, files = qwen
    state = {COMFYUI_PREFIX + k: v for k, v in numpy_state(pipe.transformer).items()}
    save_file(
        state | {COMFYUI_PREFIX + "__index_timestep_zero__": np.zeros(0, np.float32)},
        str(tmp_path / "qwen_image_edit_2511_bf16.safetensors"),
    )
    source = read_qwen(
        tmp_path / "qwen_image_edit_2511_bf16.safetensors", files["vae"], files["llm"], tokenizer=files["tokenizer"]
    )
    config, weights = source.components["transformer"]
    assert config["zero_cond_t"] is True
    assert_same(weights, numpy_state(pipe.transformer), "transformer")
    for extra, message in (
        ("time_text_embed.addition_t_embedding.weight", "Layered"),
        ("transformer_blocks.0.img_mlp.gate_up.weight", "2.1"),
    ):
        save_file(state | {COMFYUI_PREFIX + extra: np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            read_qwen(tmp_path / "other.safetensors", files["vae"], files["llm"], tokenizer=files["tokenizer"])


def test_released_rotary_split_is_a_guess_only_for_128_dim_heads(qwen):
    _, _, files = qwen
    with pytest.raises(CheckpointError, match="32-dim attention heads.*--axes-dims-rope"):
        read_qwen(
            files["transformer"], files["vae"], files["llm"], hints=ArchitectureHints(), tokenizer=files["tokenizer"]
        )


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "BF16"])
def test_gguf_transformer_reads_to_exactly_its_dequantized_tensors(qwen, tmp_path, type_name):
    """city96's GGUF files keep the ComfyUI file's names (no prefix)."""
    _, pipe, files = qwen
    path = write_gguf(numpy_state(pipe.transformer), tmp_path / f"qwen-image-{type_name}.gguf", type_name)
    source = read_qwen(path, files["vae"], files["llm"], tokenizer=files["tokenizer"])
    config, weights = source.components["transformer"]
    assert_same(weights, dequantized(path), "transformer")
    assert (
        config
        == read_qwen(files["transformer"], files["vae"], files["llm"], tokenizer=files["tokenizer"]).components[
            "transformer"
        ][0]
    )


def test_scaled_fp8_text_encoder_reads_scaled(qwen, tmp_path):
    """qwen_2.5_vl_7b_fp8_scaled.safetensors: each fp8 weight times its scale_weight; scales and marker dropped."""
    _, pipe, files = qwen
    given = write_scaled_fp8(comfyui_llm_state(pipe.text_encoder), tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    source = read_qwen(
        files["transformer"],
        files["vae"],
        tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors",
        tokenizer=files["tokenizer"],
    )
    config, weights = source.components["text_encoder"]
    assert_same(weights, {k: v for k, v in given.items() if k != "lm_head.weight"}, "text_encoder")
    assert "vision_config" in config


def test_llama_cpp_gguf_text_encoder_reads_to_exactly_its_dequantized_tensors(qwen, tmp_path):
    """llama.cpp's Qwen2.5-VL GGUF (qwen2vl): renamed, its hyperparameters from the metadata; no vision tower."""
    _, pipe, files = qwen
    path = write_llama_cpp_qwen25vl(pipe.text_encoder, tmp_path / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf", "Q8_0")
    source = read_qwen(files["transformer"], files["vae"], path, tokenizer=files["tokenizer"])
    config, weights = source.components["text_encoder"]
    inverse = {llama_cpp_name(k): k for k in comfyui_llm_state(pipe.text_encoder) if not k.startswith("visual.")}
    expected = {inverse[k]: v for k, v in dequantized(path).items() if k != "output.weight"}
    assert_same(weights, expected, "text_encoder")
    ours = Qwen25VLEncoderConfig.from_dict(config)
    theirs = Qwen25VLEncoderConfig.from_dict(pipe.text_encoder.config.to_dict())
    assert ours.vision is None
    shared = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "mrope_section",
        "vocab_size",
    )
    assert {f: getattr(ours.text, f) for f in shared} == {f: getattr(theirs.text, f) for f in shared}


def test_split_file_convert_gives_the_folder_s_weights(qwen, tmp_path):
    """`convert --diffusion-model --vae --llm --llm-tokenizer`: the same weights and scheduler as the diffusers
    folder's conversion."""
    folder, _, files = qwen
    assert cli(["convert", str(folder), "--dtype", "float32", "--model-dir", str(tmp_path / "f")]) == 0
    assert (
        cli(
            [
                "convert",
                "--diffusion-model",
                str(files["transformer"]),
                "--vae",
                str(files["vae"]),
                "--llm",
                str(files["llm"]),
                "--llm-tokenizer",
                str(files["tokenizer"]),
                "--dtype",
                "float32",
                "--axes-dims-rope",
                ",".join(map(str, AXES)),
                "--model-dir",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    split, reference = tmp_path / "s" / "qwen_image_bf16", tmp_path / "f" / folder.name.lower()
    ours, theirs = read_manifest(split), read_manifest(reference)
    assert ours["family"] == "qwenimage" and ours["scheduler"] == theirs["scheduler"]
    for name in ("transformer", "vae", "text_encoder"):
        weights = mx.load(str(split / ours["components"][name]["weights"]))
        expected = mx.load(str(reference / theirs["components"][name]["weights"]))
        assert sorted(weights) == sorted(expected), name
        for key in expected:
            assert np.array_equal(np.array(weights[key]), np.array(expected[key])), f"{name}: {key}"
