"""Single-file ControlNets (lllyasviel's `control_model.*` layout) -> diffusers ControlNetModel, on tiny models.

Each tiny diffusers ControlNet is written as a single file by `ldm_layout` (checked against diffusers' own
`convert_controlnet_checkpoint`), read back by `convert.checkpoint`, and must give back the exact weights and
config; converted and attached to a converted base model, its residuals must equal diffusers'.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers.loaders import single_file_utils
from safetensors.numpy import save_file

import tiny_diffusers
from convert.checkpoint import load_checkpoint, read_checkpoint
from convert.model import convert_model, write_model
from ldm_layout import checkpoint_state, controlnet_key, controlnet_state, write_controlnet
from mlx_sd_server.engine.families.sd.single_file import controlnet_config_from_ldm
from mlx_sd_server.engine.source import ArchitectureHints
from mlx_sd_server.engine.model_io import load_model, read_manifest
from parity import max_rel_err, nchw_to_nhwc
from test_checkpoint import TINY, assert_config_matches, assert_same_weights, numpy_state
from test_controlnet import control_image, run_mlx_controlnet, run_reference_controlnet
from test_unet import TOLERANCE, random_inputs

# A lone ControlNet has no text encoder: the tiny SDXL's pooled text embedding width is a hint too.
TINY_CONTROLNET = dataclasses.replace(TINY, sdxl_text_projection_dim=tiny_diffusers.TEXT_DIM)
FAMILIES = ["sd1", "sd2v", "sdxl"]
# diffusers writes these about itself; they say nothing about the model.
UNCOMPARED_CONFIG_KEYS = {"_diffusers_version", "_use_default_values"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(family) -> (pipeline, its diffusers folder, a ControlNet for it, that ControlNet as a single file)."""
    built = {}

    def build(family: str):
        if family not in built:
            folder = tmp_path_factory.mktemp(f"{family}-controlnet")
            pipe = tiny_diffusers.make_pipeline(folder / "diffusers", family)
            controlnet = tiny_diffusers.controlnet(pipe.unet)
            built[family] = (pipe, folder / "diffusers", controlnet,
                             write_controlnet(controlnet, folder / "control.safetensors"))
        return built[family]

    return build


def reference_config(controlnet) -> dict:
    return json.loads(controlnet.to_json_string())


# --- the test writer's layout is the real one ----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_layout_is_what_diffusers_converter_reads(tiny, family):
    _, _, controlnet, _ = tiny(family)
    checkpoint = {k: torch.from_numpy(v) for k, v in controlnet_state(controlnet).items()}
    converted = single_file_utils.convert_controlnet_checkpoint(checkpoint, dict(controlnet.config))
    reference = numpy_state(controlnet.state_dict())
    if family == "sdxl":  # diffusers' converter does not carry SDXL's label_emb (its text-time embedding) over
        assert {controlnet_key(k, controlnet.config) for k in reference if k.startswith("add_embedding.")} == {
            f"label_emb.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        reference = {k: v for k, v in reference.items() if not k.startswith("add_embedding.")}
    assert_same_weights(converted, reference)


# --- load_checkpoint gives back the ControlNet ---------------------------------------------------------

@pytest.mark.parametrize("family, prefix", [(f, "control_model.") for f in FAMILIES] + [("sd1", "")],
                         ids=lambda v: v or "no-prefix")
def test_load_checkpoint_gives_back_the_diffusers_controlnet(tiny, tmp_path, family, prefix):
    _, _, controlnet, _ = tiny(family)
    path = write_controlnet(controlnet, tmp_path / "control.safetensors", prefix=prefix)
    loaded = load_checkpoint(path, hints=TINY_CONTROLNET)

    assert loaded.family == "controlnet"
    assert list(loaded.components) == ["controlnet"]
    config, state = loaded.components["controlnet"]
    assert_same_weights(state, controlnet.state_dict())
    assert_config_matches(config, reference_config(controlnet), UNCOMPARED_CONFIG_KEYS)


def test_full_checkpoint_with_a_controlnet_keeps_both(tiny, tmp_path):
    """lllyasviel's original ControlNet training files hold the whole SD model next to control_model.*."""
    pipe, _, controlnet, _ = tiny("sd1")
    path = tmp_path / "control_sd15.safetensors"
    save_file({**checkpoint_state(pipe, "sd1"), **controlnet_state(controlnet)}, str(path))
    loaded = load_checkpoint(path, hints=TINY_CONTROLNET)

    assert loaded.family == "sd1"
    assert sorted(loaded.components) == ["controlnet", "text_encoder", "unet", "vae"]
    assert_same_weights(loaded.components["unet"][1], pipe.unet.state_dict())
    assert_same_weights(loaded.components["controlnet"][1], controlnet.state_dict())


# The released ControlNets' configs (diffusers' defaults are SD 1.5's, e.g. control_v11p_sd15_canny).
REAL_CONTROLNETS = {
    "sd1": {},
    "sd2": {"attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024, "use_linear_projection": True},
    "sdxl": {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
             "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
}


@pytest.mark.parametrize("family", list(REAL_CONTROLNETS))
def test_real_size_config_from_shapes(family):
    """Real SD 1.5 / 2.1 / XL ControlNet shapes (meta tensors: no memory) give the released configs."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        controlnet = ControlNetModel(**REAL_CONTROLNETS[family])
    ldm = {controlnet_key(k, controlnet.config): v for k, v in controlnet.state_dict().items()}
    assert_config_matches(controlnet_config_from_ldm(ldm, ArchitectureHints()), reference_config(controlnet),
                          UNCOMPARED_CONFIG_KEYS)


# --- converted and attached to a base model ------------------------------------------------------------

def test_convert_makes_a_controlnet_folder(tiny, tmp_path):
    """The `mlx-sd-server convert FILE DST` path (released models' hints) gives a lone controlnet component."""
    _, _, _, path = tiny("sd1")
    manifest = read_manifest(convert_model(path, tmp_path / "control", progress=False))
    assert manifest["family"] == "controlnet"
    assert list(manifest["components"]) == ["controlnet"]
    assert "defaults" not in manifest  # generation defaults belong to the base model


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_converted_controlnet_residuals_match_diffusers(tiny, tmp_path, family):
    pipe, diffusers_folder, controlnet, path = tiny(family)
    base = convert_model(diffusers_folder, tmp_path / "base", dtype="float32", progress=False)
    control = write_model(read_checkpoint(path, hints=TINY_CONTROLNET), tmp_path / "control", name="control",
                          dtype="float32", progress=False)
    model = load_model(base, dtype="float32", controlnet=control)

    inputs = random_inputs(pipe.unet)
    image = control_image(inputs)
    ref_down, ref_mid = run_reference_controlnet(controlnet, inputs, image, 0.8)
    down, mid = run_mlx_controlnet(model.controlnet, inputs, image, 0.8)
    assert len(down) == len(ref_down)
    errors = [max_rel_err(ours, nchw_to_nhwc(ref)) for ours, ref in zip(down + [mid], list(ref_down) + [ref_mid])]
    print(f"single-file controlnet {family}: max_rel_err {max(errors):.1e}")
    assert max(errors) <= TOLERANCE
