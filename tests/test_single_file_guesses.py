"""What a single file cannot tell (heads, group norms, FLUX's rotary split, T5's reach): `convert` takes it as
options, one per ArchitectureHints field; what is not given is guessed, logged and recorded in the manifest."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import tiny_diffusers
import tiny_flux
from bfl_layout import write_bfl
from convert.checkpoint import logged_guesses
from convert.cli import given_hints
from ldm_layout import checkpoint_state, with_clip_vocabulary
from mlx_sd_server.cli import build_parser, main as cli
from mlx_sd_server.engine.families.flux.single_file import read_transformer as read_flux_transformer
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.source import ArchitectureHints, Guess, OriginalModel, hint_option
from mlx_sd_server.engine.text.single_file import read_clip
from parity import max_rel_err
from test_flux_files import clip_file_state, t5_file_state, vae_file_state

TOLERANCE = 1e-4
TINY_UNET = ["--norm-num-groups", "8", "--sd1-unet-heads", "8"]  # the tiny SD 1.x UNet's and VAE's


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny SD 1.x pipeline (its CLIP: 4 heads of 8, 32 wide) as a single file whose CLIP has CLIP's own
    vocabulary, as real ones do."""
    root = tmp_path_factory.mktemp("sd1-guesses")
    pipe = tiny_diffusers.make_pipeline(root / "diffusers", "sd1")
    path = root / "narrow.safetensors"
    save_file(with_clip_vocabulary(checkpoint_state(pipe, "sd1")), str(path))
    return pipe, path


def text_encoder_error(pipe, dst) -> float:
    """How far the converted CLIP's last hidden state is from the reference's, on ids of the tiny vocabulary."""
    ids = np.random.default_rng(0).integers(0, tiny_diffusers.tokenizer_vocab_size() - 2, (2, 77))
    with torch.no_grad():
        expected = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state
    (ours,) = load_model(dst, dtype="float32").text_encoders.values()
    return max_rel_err(ours(mx.array(ids)).last_hidden_state, expected)


def test_a_narrow_clip_converts_from_the_command_line_with_its_head_size(sd1, tmp_path, caplog):
    pipe, path = sd1
    caplog.set_level(logging.INFO)
    dst = tmp_path / "given"
    assert cli(["convert", str(path), str(dst), "--dtype", "float32", "--text-head-dim", "8", *TINY_UNET]) == 0
    manifest = read_manifest(dst)
    assert "guessed" not in manifest
    assert manifest["components"]["text_encoder"]["config"]["num_attention_heads"] == 4
    assert not [r for r in caplog.records if r.getMessage().startswith("guessed")]
    assert text_encoder_error(pipe, dst) < TOLERANCE


def test_without_the_option_the_guess_is_a_warning_and_in_the_manifest(sd1, tmp_path, caplog):
    pipe, path = sd1
    caplog.set_level(logging.INFO)
    dst = tmp_path / "guessed"
    assert cli(["convert", str(path), str(dst), "--dtype", "float32", "--norm-num-groups", "8"]) == 0
    # 32 wide / the released 64-dim heads: one head; the UNet's 8 heads are SD 1.x's, but at a narrow width
    assert read_manifest(dst)["guessed"] == {"text_encoder.num_attention_heads": 1, "unet.attention_head_dim": 8}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("num_attention_heads = 1 for text_encoder" in m and "--text-head-dim" in m for m in warnings)
    assert any("attention_head_dim = 8 for unet" in m and "--sd1-unet-heads" in m for m in warnings)
    assert text_encoder_error(pipe, dst) > TOLERANCE  # the guess is wrong here: the option is what fixes it


def shapes(**tensors: tuple[int, ...]) -> dict[str, SimpleNamespace]:
    """Tensors as readers see them until they are converted: only their shapes."""
    return {name.replace("__", "."): SimpleNamespace(shape=shape) for name, shape in tensors.items()}


def clip_shapes(width: int) -> dict[str, SimpleNamespace]:
    return {
        "text_model." + name: value
        for name, value in shapes(
            embeddings__token_embedding__weight=(49408, width),
            embeddings__position_embedding__weight=(77, width),
            encoder__layers__0__mlp__fc1__weight=(4 * width, width),
        ).items()
    }


def test_a_guess_is_a_warning_only_where_the_widths_are_not_released_ones(caplog):
    """Taken from a hint not given: a guess; at CLIP-L's width near-certain (info), at 32 wide a warning."""
    caplog.set_level(logging.INFO)
    released, narrow = (read_clip(clip_shapes(width), "text_model.", ArchitectureHints()) for width in (768, 32))
    assert released.guessed == (Guess("num_attention_heads", 12, "text_head_dim", True),)
    assert narrow.guessed == (Guess("num_attention_heads", 1, "text_head_dim", False),)
    assert read_clip(clip_shapes(32), "text_model.", ArchitectureHints(text_head_dim=8)).guessed == ()

    for component, level in ((released, logging.INFO), (narrow, logging.WARNING)):
        caplog.clear()
        model = OriginalModel("sd1", "epsilon", {}, {"text_encoder": component})
        assert logged_guesses(model) == {"text_encoder.num_attention_heads": component.config["num_attention_heads"]}
        (record,) = caplog.records
        assert record.levelno == level and "--text-head-dim" in record.getMessage()


def test_flux_s_rotary_split_is_a_guess_only_where_not_given():
    state = shapes(
        img_in__weight=(3072, 64),
        double_blocks__0__img_attn__norm__query_norm__scale=(128,),
        double_blocks__0__img_attn__qkv__weight=(9216, 3072),
        single_blocks__0__linear1__weight=(21504, 3072),
        final_layer__linear__weight=(64, 3072),
        txt_in__weight=(3072, 4096),
        vector_in__in_layer__weight=(3072, 768),
    )
    guessed = read_flux_transformer(state, "", ArchitectureHints()).guessed
    assert guessed == (Guess("axes_dims_rope", [16, 56, 56], "axes_dims_rope", True),)
    assert read_flux_transformer(state, "", ArchitectureHints(axes_dims_rope=(32, 48, 48))).guessed == ()


def test_every_hint_is_a_convert_option():
    given = {
        hint.name: (4, 6, 6) if hint.name == "axes_dims_rope" else index + 1
        for index, hint in enumerate(dataclasses.fields(ArchitectureHints))
    }
    argv = ["convert", "x.safetensors"]
    for name, value in given.items():
        argv += [hint_option(name), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    assert given_hints(build_parser().parse_args(argv)) == ArchitectureHints(**given)
    assert given_hints(build_parser().parse_args(["convert", "x.safetensors"])) == ArchitectureHints()
    for bad in (["--text-head-dim", "0"], ["--axes-dims-rope", "4,x,6"], ["--norm-num-groups", "-8"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["convert", "x.safetensors", *bad])


def test_flux_split_files_take_the_rotary_split_from_the_command_line(tmp_path, caplog, capsys):
    pipe = tiny_flux.make_pipeline(tmp_path / "diffusers", "dev")
    files = {"--diffusion-model": write_bfl(pipe.transformer, tmp_path / "flux1-dev.safetensors"),
             "--vae": tmp_path / "ae.safetensors", "--clip-l": tmp_path / "clip_l.safetensors",
             "--t5xxl": tmp_path / "t5xxl.safetensors"}
    save_file(vae_file_state(pipe.vae), str(files["--vae"]))
    save_file(with_clip_vocabulary(clip_file_state(pipe.text_encoder)), str(files["--clip-l"]))
    save_file(t5_file_state(pipe.text_encoder_2), str(files["--t5xxl"]))
    argv = ["convert", *(str(part) for item in files.items() for part in item), "--t5-tokenizer",
            str(tmp_path / "diffusers" / "tokenizer_2"), "--dtype", "float32", "--text-head-dim", "8",
            "--norm-num-groups", "8"]

    caplog.set_level(logging.INFO)
    assert cli([*argv, "--axes-dims-rope", "4,6,6", str(tmp_path / "given")]) == 0
    manifest = read_manifest(tmp_path / "given")
    assert manifest["components"]["transformer"]["config"]["axes_dims_rope"] == list(tiny_flux.AXES) == [4, 6, 6]
    # T5's reach was not given: the released 128, a warning at the tiny T5's 8 buckets (it has 20)
    assert manifest["guessed"] == {"text_encoder_2.relative_attention_max_distance": 128}
    assert any(r.levelno == logging.WARNING and "--t5-max-distance" in r.getMessage() for r in caplog.records)

    assert cli([*argv, "--axes-dims-rope", "4,6,6", "--t5-max-distance", "20", str(tmp_path / "all")]) == 0
    manifest = read_manifest(tmp_path / "all")
    assert "guessed" not in manifest
    assert manifest["components"]["text_encoder_2"]["config"]["relative_attention_max_distance"] == 20
    assert cli([*argv, "--t5-max-distance", "20", str(tmp_path / "none")]) == 1  # 16-dim heads: FLUX.1's won't do
    assert "--axes-dims-rope" in capsys.readouterr().err
