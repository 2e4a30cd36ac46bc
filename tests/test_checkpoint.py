"""Single-file checkpoints (LDM/SGM layout) -> diffusers layout, checked against tiny diffusers pipelines.

Each tiny pipeline is written as a single file by `ldm_layout` (checked against diffusers' own single-file
converters), read back by `convert.checkpoint`, and must give back the pipeline's exact weights and configs.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils

from convert.checkpoint import load_checkpoint, read_checkpoint
from convert.source import PickleRefusedError
from mlx_sd_server.engine.families.sd.single_file import unet_config_from_ldm
from mlx_sd_server.engine.families.sd.spec import SPEC as SD
from mlx_sd_server.engine.ldm_vae import vae_config_from_ldm
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError
from ldm_layout import checkpoint_state, unet_key, vae_key, write_checkpoint
from tiny_diffusers import make_pipeline

# The tiny models' head sizes and group counts, which shapes cannot tell (the defaults are the real models').
TINY = ArchitectureHints(unet_head_dim=16, text_head_dim=8, norm_num_groups=8)
CASES = {  # name: (family, make_pipeline options)
    "sd1": ("sd1", {}),
    "sd1-inpaint": ("sd1", {"inpaint": True}),
    "sd1-lcm": ("sd1", {"lcm": True}),
    "sd2v": ("sd2v", {}),
    "sdxl": ("sdxl", {}),
}
FAMILY = {"sd1": "sd1", "sd2v": "sd2", "sdxl": "sdxl"}
# Keys that are about the saving library or the default image size (not in a single file), not the model.
UNCOMPARED_CONFIG_KEYS = {"_diffusers_version", "transformers_version", "dtype", "sample_size"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(case) -> (pipeline, its diffusers folder, the same model as a single .safetensors file)."""
    built = {}

    def build(case: str):
        if case not in built:
            family, options = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            pipe = make_pipeline(folder / "diffusers", family, **options)
            built[case] = (pipe, folder / "diffusers", write_checkpoint(pipe, family, folder / "model.safetensors"))
        return built[case]

    return build


def transformers_names(state: dict) -> dict[str, np.ndarray]:
    """Text-encoder weights named as published diffusers folders and diffusers' converters name them: under
    `text_model.` (transformers >= 5 saves a CLIPTextModel without that prefix)."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.detach().numpy()
        for k, v in state.items()
    }


def numpy_state(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() if hasattr(v, "detach") else v for k, v in state.items()}


def assert_same_weights(ours: dict, reference: dict) -> None:
    ours, reference = numpy_state(ours), numpy_state(reference)
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].dtype == np.float32, key
        assert np.array_equal(ours[key], value), key


def assert_config_matches(ours: dict, reference: dict, uncompared: set[str] = UNCOMPARED_CONFIG_KEYS) -> None:
    ours = json.loads(json.dumps(ours))  # tuples -> lists, as in a config.json
    assert set(ours) <= set(reference)
    for key in set(reference) - uncompared:
        assert ours.get(key) == reference[key], key


def reference_components(pipe) -> dict[str, dict[str, np.ndarray]]:
    components = {"unet": numpy_state(pipe.unet.state_dict()), "vae": numpy_state(pipe.vae.state_dict()),
                  "text_encoder": transformers_names(pipe.text_encoder.state_dict())}
    if getattr(pipe, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = transformers_names(pipe.text_encoder_2.state_dict())
    return components


# --- the test writer's layout is the real one ----------------------------------------------------------

@pytest.mark.parametrize("case", ["sd1", "sd1-inpaint", "sd2v", "sdxl"])
def test_ldm_layout_is_what_diffusers_converters_read(tiny, case, monkeypatch):
    pipe, _, _ = tiny(case)
    family = CASES[case][0]
    checkpoint = {k: torch.from_numpy(v) for k, v in checkpoint_state(pipe, family).items()}
    reference = reference_components(pipe)

    assert_same_weights(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config)),
                        reference["unet"])
    assert_same_weights(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config)),
                        reference["vae"])
    if family == "sd2v":
        # diffusers lists the dropped last layer of the real 24-layer encoder; ours has 3 + 1 layers.
        dropped = [k for k in checkpoint if k.startswith("cond_stage_model.model.transformer.resblocks.3.")]
        monkeypatch.setattr(single_file_utils, "SD_2_TEXT_ENCODER_KEYS_TO_IGNORE",
                            dropped + ["cond_stage_model.model.text_projection"])
        text = single_file_utils.convert_open_clip_checkpoint(pipe.text_encoder, checkpoint)
    else:
        text = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
        text.pop("text_model.embeddings.position_ids")  # a constant buffer old checkpoints carry
    assert_same_weights(text, reference["text_encoder"])
    if family == "sdxl":
        text_2 = single_file_utils.convert_open_clip_checkpoint(
            pipe.text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model.")
        assert_same_weights(text_2, reference["text_encoder_2"])


# --- load_checkpoint gives back the pipeline -----------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_load_checkpoint_gives_back_the_diffusers_pipeline(tiny, case):
    pipe, folder, path = tiny(case)
    family, options = CASES[case]
    loaded = load_checkpoint(path, hints=TINY)

    assert loaded.family == FAMILY[family]
    assert loaded.prediction_type == ("v_prediction" if family == "sd2v" else "epsilon")
    assert loaded.inpainting == options.get("inpaint", False)
    reference = reference_components(pipe)
    assert sorted(loaded.components) == sorted(reference)
    for name, (config, state) in loaded.components.items():
        assert_same_weights(state, reference[name])
        assert_config_matches(config, json.loads((folder / name / "config.json").read_text()))


def test_real_model_hyperparameters_are_the_defaults(tiny):
    """Without hints: SD 1.x 8 heads, head size 64 elsewhere, 32 groups (fewer where a model is narrower)."""
    _, _, path = tiny("sdxl")
    unet_config = load_checkpoint(path).components["unet"][0]
    assert unet_config["attention_head_dim"] == [max(1, c // 64) for c in unet_config["block_out_channels"]]
    assert unet_config["norm_num_groups"] == 32
    assert unet_config["sample_size"] == 128
    assert load_checkpoint(path).components["vae"][0]["norm_num_groups"] == 8  # the tiny VAE is 8 channels wide
    assert load_checkpoint(tiny("sd1")[2]).components["unet"][0]["attention_head_dim"] == 8


# The released models' UNet/VAE configs (diffusers' defaults are SD 1.5's).
REAL_UNETS = {
    "sd1": {"sample_size": 64},
    "sd2": {"attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024, "use_linear_projection": True,
            "sample_size": 96},
    "sdxl": {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
             "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
}


@pytest.mark.parametrize("family", list(REAL_UNETS))
def test_real_size_configs_from_shapes(family):
    """Real SD 1.5 / 2.1 / XL shapes (meta tensors: no memory) give the released models' configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    image_size = {"sd1": 512, "sd2": 768, "sdxl": 1024}[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNETS[family])
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=image_size,
                            scaling_factor=0.13025 if family == "sdxl" else 0.18215)
    ldm_unet = {unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    ldm_vae = {vae_key(k, vae.config): v for k, v in vae.state_dict().items()}
    text_projection_dim = 1280 if family == "sdxl" else None  # OpenCLIP bigG's
    unet_config = unet_config_from_ldm(ldm_unet, family, text_projection_dim, ArchitectureHints(), image_size // 8)
    assert_config_matches(unet_config, json.loads(unet.to_json_string()), {"_diffusers_version"})
    assert_config_matches(vae_config_from_ldm(ldm_vae, SD.latent[family], image_size, ArchitectureHints()),
                          json.loads(vae.to_json_string()), {"_diffusers_version"})


def test_vae_attention_stored_as_linears(tiny, tmp_path):
    pipe, _, _ = tiny("sd1")
    path = write_checkpoint(pipe, "sd1", tmp_path / "linear.safetensors", vae_attention_as_conv=False)
    assert_same_weights(load_checkpoint(path, hints=TINY).components["vae"][1], pipe.vae.state_dict())


def test_half_precision_file_gives_float32(tiny, tmp_path):
    from safetensors.numpy import save_file

    pipe, _, _ = tiny("sd1")
    state = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in checkpoint_state(pipe, "sd1").items()}
    save_file(state, str(tmp_path / "fp16.safetensors"))
    unet = load_checkpoint(tmp_path / "fp16.safetensors", hints=TINY).components["unet"][1]
    assert_same_weights(unet, {k: v.astype(np.float16).astype(np.float32)
                               for k, v in numpy_state(pipe.unet.state_dict()).items()})


def test_read_checkpoint_is_a_source_model(tiny):
    _, _, path = tiny("sd2v")
    source = read_checkpoint(path, prediction_type="epsilon")
    assert source.family == "sd2"
    assert source.scheduler["prediction_type"] == "epsilon"
    assert source.scheduler["beta_schedule"] == "scaled_linear"
    assert dict(source.components["vae"][1]).keys() == load_checkpoint(path).components["vae"][1].keys()


# --- prediction type ------------------------------------------------------------------------------------

def test_sd2_without_a_signal_assumes_v_prediction_and_says_how_to_override(tiny, caplog):
    _, _, path = tiny("sd2v")
    with caplog.at_level(logging.WARNING, logger="mlx_sd_server.engine.families.sd.single_file"):
        assert load_checkpoint(path, hints=TINY).prediction_type == "v_prediction"
    assert "--prediction-type epsilon" in caplog.text


def test_prediction_type_from_metadata_and_override(tiny, tmp_path):
    pipe, _, _ = tiny("sd2v")
    path = write_checkpoint(pipe, "sd2v", tmp_path / "eps.safetensors",
                            metadata={"modelspec.prediction_type": "epsilon"})
    assert load_checkpoint(path, hints=TINY).prediction_type == "epsilon"
    assert load_checkpoint(path, prediction_type="v_prediction", hints=TINY).prediction_type == "v_prediction"
    with pytest.raises(CheckpointError, match="unknown prediction type"):
        load_checkpoint(path, prediction_type="x0")


def test_v_pred_marker_key(tiny, tmp_path):
    from safetensors.numpy import save_file

    pipe, _, _ = tiny("sd1")
    state = checkpoint_state(pipe, "sd1")
    save_file({**state, "v_pred": np.zeros(0, np.float32)}, str(tmp_path / "v.safetensors"))
    assert load_checkpoint(tmp_path / "v.safetensors", hints=TINY).prediction_type == "v_prediction"


# --- pickles and broken files ---------------------------------------------------------------------------

def test_pickle_is_refused_before_reading(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not even a pickle")  # refused by name: nothing is unpickled
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_checkpoint(path)


def test_pickle_allowed_reads_the_same_model(tiny, tmp_path):
    pipe, _, path = tiny("sd1")
    state = {k: torch.from_numpy(v) for k, v in checkpoint_state(pipe, "sd1").items()}
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "model.ckpt")
    from_pickle = load_checkpoint(tmp_path / "model.ckpt", allow_pickle=True, hints=TINY)
    from_safetensors = load_checkpoint(path, hints=TINY)
    for name, (config, weights) in from_safetensors.components.items():
        assert from_pickle.components[name][0] == config
        assert_same_weights(from_pickle.components[name][1], weights)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # our garbage declares protocol 4
def test_broken_pickle_gives_a_clear_error(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="cannot read .* as a torch checkpoint"):
        load_checkpoint(path, allow_pickle=True)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_gives_a_clear_error(tiny, tmp_path, damage):
    data = tiny("sd1")[2].read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x10" * 64 + data[64:], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated|not a safetensors file"):
        load_checkpoint(path)


def test_not_a_stable_diffusion_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="not a full Stable Diffusion checkpoint"):
        load_checkpoint(tmp_path / "lora.safetensors")


def test_unknown_suffix(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"ONNX")  # (not .gguf any more: GGUF files are read, tests/test_gguf.py)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(tmp_path / "model.onnx")
