"""SD3/SD3.5 single files (Stability's original layout, with or without the text encoders) and split text-encoder
files (clip_l, clip_g, t5xxl) -> diffusers layout.

Tiny random diffusers/transformers SD3 components are written as the files users have (the MMDiT by `sd3_layout`,
checked against diffusers' own converter; the VAE by `ldm_layout`), read back by `convert.checkpoint` as SD3's
(`engine.families.sd3.single_file`), and must give back the exact weights and the configs that define the
architecture.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils

from convert.checkpoint import LazyWeights, read_original
from convert.model import SplitFiles, convert_model, read_source, write_model
from convert.pull import allow_patterns
from convert.source import read_state_dict
from ldm_layout import with_clip_vocabulary, with_tokenizers
from mlx_sd_server.engine.families import family_of_single_file
from mlx_sd_server.engine.families.sd3.single_file import (
    SD3_SCHEDULER, map_sd3_transformer_weight, sd3_transformer_config,
)
from mlx_sd_server.engine.families.sd3.spec import SPEC as SD3
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError
from sd3_layout import sd3_state, write_sd3
from test_flux_files import (
    CLIP_ARCHITECTURE, T5_ARCHITECTURE, T5_MAX_DISTANCE, TINY, assert_config_matches, assert_same_weights,
    clip_file_state, numpy_state, t5_file_state, vae_file_state, write_tokenizer_json,
)
import tiny_sd3
import tiny_t5
from mlx_sd_server.cli import main as cli
from mlx_sd_server.engine.model_io import read_manifest
from tiny_diffusers import TEXT_DIM, text_encoder as tiny_clip

HEAD_DIM = 16  # tiny_sd3's; SD3 medium has no qk-norm to read it from, so it is said
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
READ_VARIANTS = ("sd3", "sd35-medium")  # without qk-norm; with qk-norm and MMDiT-X dual attention


def read_sd3_files(model, vae=None, clip_l=None, clip_g=None, t5xxl=None, *, t5_tokenizer=None, with_t5=True,
                   attention_head_dim=64, t5_max_distance=128, hints=None):
    """SD3's files read as SD3's, as `convert --diffusion-model FILE --clip-l FILE ...` reads them."""
    given = {option: path for option, path in (("--vae", vae), ("--clip-l", clip_l), ("--clip-g", clip_g),
                                               ("--t5xxl", t5xxl)) if path}
    hints = dataclasses.replace(hints or ArchitectureHints(), attention_head_dim=attention_head_dim,
                                t5_max_distance=t5_max_distance)
    return read_original(SD3, model, given, t5_tokenizer=t5_tokenizer, with_t5=with_t5, hints=hints)


def is_sd3_file(path) -> bool:
    """Whether the families read a file's tensor names as SD3's."""
    try:
        return family_of_single_file(read_state_dict(path)[0]) is SD3
    except (CheckpointError, OSError):
        return False


# --- tiny components ----------------------------------------------------------------------------------

def clip_g_file_state(clip_g) -> dict[str, np.ndarray]:
    """clip_g.safetensors: transformers names under `text_model.`, the projection beside them."""
    out = numpy_state(clip_g.state_dict())
    out["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def under(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny components, their reference state dicts, and the files: per variant the transformer alone (with
    the VAE: sd3.5_*.safetensors) and an all-in-one; the text encoders' own files; a T5 tokenizer."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("sd3")
    models = {**{variant: tiny_sd3.transformer(variant) for variant in tiny_sd3.VARIANTS}, "vae": tiny_sd3.vae(),
              "text_encoder": tiny_clip("sd1", seed=4),  # as clip_l.safetensors: no projection
              "text_encoder_2": tiny_clip("sdxl2", with_projection=True, seed=5),
              "text_encoder_3": tiny_t5.t5_encoder(seed=6, d_model=tiny_sd3.T5_WIDTH)}
    text_states = {"text_encoder": clip_file_state(models["text_encoder"]),
                   "text_encoder_2": clip_g_file_state(models["text_encoder_2"]),
                   "text_encoder_3": t5_file_state(models["text_encoder_3"])}
    vae = under("first_stage_model.", vae_file_state(models["vae"]))
    bundled = {**under("text_encoders.clip_l.transformer.", text_states["text_encoder"]),
               **under("text_encoders.clip_g.transformer.", text_states["text_encoder_2"]),
               **under("text_encoders.t5xxl.transformer.", text_states["text_encoder_3"])}
    files = {"tokenizer": write_tokenizer_json(folder / "t5")}
    for variant in READ_VARIANTS:
        transformer = numpy_state(sd3_state(models[variant].state_dict()))
        files[variant] = folder / f"{variant}.safetensors"
        save_file({**transformer, **vae}, str(files[variant]))
        files[f"{variant}-all-in-one"] = folder / f"{variant}_incl_clips_t5xxl.safetensors"
        save_file({**transformer, **vae, **bundled}, str(files[f"{variant}-all-in-one"]))
    for name, file in zip(TEXT_ENCODERS, ("clip_l", "clip_g", "t5xxl_fp16")):
        files[name] = folder / f"{file}.safetensors"
        save_file(text_states[name], str(files[name]))

    clip_l = {"text_model." + k.removeprefix("text_model."): v
              for k, v in numpy_state(models["text_encoder"].state_dict()).items()}
    clip_l["text_projection.weight"] = np.eye(TEXT_DIM, dtype=np.float32)  # SD3 pools CLIP-L unprojected
    references = {
        **{variant: numpy_state(models[variant].state_dict()) for variant in tiny_sd3.VARIANTS},
        "vae": numpy_state(models["vae"].state_dict()),
        "text_encoder": clip_l,
        "text_encoder_2": numpy_state(models["text_encoder_2"].state_dict()),
        "text_encoder_3": {k: v for k, v in numpy_state(models["text_encoder_3"].state_dict()).items()
                           if k != "encoder.embed_tokens.weight"},
    }
    return models, references, files


def read(files, variant="sd35-medium", split=True, **kwargs):
    """The variant's transformer file with the text encoders' own files (split), or its all-in-one."""
    kwargs = {"t5_tokenizer": files["tokenizer"], "attention_head_dim": HEAD_DIM, "t5_max_distance": T5_MAX_DISTANCE,
              "hints": TINY, **kwargs}
    if split:
        return read_sd3_files(files[variant], None, files["text_encoder"], files["text_encoder_2"],
                              files["text_encoder_3"], **kwargs)
    return read_sd3_files(files[f"{variant}-all-in-one"], **kwargs)


# --- the test writer's layout is the real one ---------------------------------------------------------

@pytest.mark.parametrize("variant", list(tiny_sd3.VARIANTS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_sd3_layout_is_what_diffusers_converter_reads(sd3, variant, prefix):
    models, references, _ = sd3
    checkpoint = sd3_state(models[variant].state_dict(), prefix)
    converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert_same_weights(numpy_state(converted), references[variant])


# --- read_sd3_files gives back the models -------------------------------------------------------------

@pytest.mark.parametrize("variant", READ_VARIANTS)
@pytest.mark.parametrize("split", [True, False], ids=["split-files", "all-in-one"])
def test_read_sd3_files_gives_back_the_models(sd3, variant, split):
    models, references, files = sd3
    source = read(files, variant, split)

    assert (source.family, source.prediction_type, source.scheduler) == ("sd3", "flow", SD3_SCHEDULER)
    assert source.tokenizers == {"text_encoder": None, "text_encoder_2": None, "text_encoder_3": files["tokenizer"]}
    assert sorted(source.components) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]
    for name, reference in (("transformer", references[variant]), ("vae", references["vae"]),
                            *((name, references[name]) for name in TEXT_ENCODERS)):
        assert_same_weights(source.components[name][1], reference)

    transformer = source.components["transformer"][0]
    assert_config_matches(transformer, json.loads(models[variant].to_json_string()) | {"sample_size": 128})
    assert transformer["qk_norm"] == tiny_sd3.VARIANTS[variant]["qk_norm"]
    assert_config_matches(source.components["vae"][0], json.loads(models["vae"].to_json_string()))
    for name in ("text_encoder", "text_encoder_2"):
        config = source.components[name][0]
        assert config["architectures"] == ["CLIPTextModelWithProjection"] and config["projection_dim"] == TEXT_DIM
        assert_config_matches(config, models[name].config.to_dict(), CLIP_ARCHITECTURE)
    assert_config_matches(source.components["text_encoder_3"][0], models["text_encoder_3"].config.to_dict(),
                          T5_ARCHITECTURE)


def test_configs_build_the_models_the_weights_fit(sd3):
    """Each config makes a diffusers/transformers model that takes the weights read with it, strictly."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _, _, files = sd3
    source = read(files, split=False)
    for name, build in (("transformer", SD3Transformer2DModel.from_config), ("vae", AutoencoderKL.from_config),
                        ("text_encoder", lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))),
                        ("text_encoder_2", lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)))):
        config, weights = source.components[name]
        build(config).load_state_dict({k: torch.from_numpy(v) for k, v in weights}, strict=True)


def test_weights_are_read_lazily_and_again(sd3):
    _, references, files = sd3
    source = read(files)
    weights = source.components["transformer"][1]
    assert isinstance(weights, LazyWeights)
    assert_same_weights(weights, references["sd35-medium"])
    assert_same_weights(weights, references["sd35-medium"])  # a second pass reads the file again
    clip_l = source.components["text_encoder"][1]
    assert_same_weights(clip_l, references["text_encoder"])
    assert_same_weights(clip_l, references["text_encoder"])


def test_a_file_given_wins_over_the_bundled_one(sd3, tmp_path):
    from safetensors.numpy import save_file

    models, references, files = sd3
    other = tiny_clip("sdxl2", with_projection=True, seed=9)
    save_file(clip_g_file_state(other), str(tmp_path / "clip_g.safetensors"))
    source = read_sd3_files(files["sd3-all-in-one"], clip_g=tmp_path / "clip_g.safetensors",
                            t5_tokenizer=files["tokenizer"], attention_head_dim=HEAD_DIM, hints=TINY)
    assert_same_weights(source.components["text_encoder_2"][1], numpy_state(other.state_dict()))
    assert_same_weights(source.components["text_encoder"][1], references["text_encoder"])


def test_bf16_file_gives_float32(sd3, tmp_path):
    """The released MMDiTs are fp16 or bf16."""
    models, _, files = sd3
    vae = {k: torch.from_numpy(v) for k, v in under("first_stage_model.", vae_file_state(models["vae"])).items()}
    path = write_sd3(models["sd35-medium"], tmp_path / "sd3.5_medium_bf16.safetensors", dtype=torch.bfloat16,
                     extra=vae)
    source = read({**files, "sd35-medium": path})
    reference = {k: v.to(torch.bfloat16).float().numpy() for k, v in models["sd35-medium"].state_dict().items()}
    assert_same_weights(source.components["transformer"][1], reference)


# --- configs from shapes ------------------------------------------------------------------------------

# The released transformers' config.json (stabilityai/stable-diffusion-3-medium-diffusers, -3.5-large, -3.5-medium).
RELEASED = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
}


@pytest.mark.parametrize("release", list(RELEASED))
def test_real_size_transformer_config_from_shapes(release):
    """The released MMDiTs' shapes (meta tensors: no memory) give their config."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**RELEASED[release])  # diffusers' defaults are the rest of SD3's
    config = sd3_transformer_config(sd3_state(model.state_dict()))
    assert_config_matches(config, json.loads(model.to_json_string()))


def test_mapping_splits_fused_projections_into_views():
    hidden = 4
    qkv = np.arange(3 * hidden * hidden, dtype=np.float32).reshape(3 * hidden, hidden)
    pairs = map_sd3_transformer_weight("model.diffusion_model.joint_blocks.5.x_block.attn2.qkv.weight", qkv, hidden)
    assert [k for k, _ in pairs] == [f"transformer_blocks.5.attn2.{n}.weight" for n in ("to_q", "to_k", "to_v")]
    assert all(np.shares_memory(v, qkv) for _, v in pairs)
    assert np.array_equal(np.concatenate([v for _, v in pairs]), qkv)
    [(key, _)] = map_sd3_transformer_weight("joint_blocks.0.context_block.attn.ln_k.weight", np.ones(4), hidden)
    assert key == "transformer_blocks.0.attn.norm_added_k.weight"
    [(key, _)] = map_sd3_transformer_weight("pos_embed", np.ones((1, 4, hidden)), hidden)
    assert key == "pos_embed.pos_embed"
    for module, target in (("final_layer.adaLN_modulation.1", "norm_out.linear"),
                           ("joint_blocks.7.context_block.adaLN_modulation.1",
                            "transformer_blocks.7.norm1_context.linear")):
        [(key, value)] = map_sd3_transformer_weight(f"{module}.bias", np.arange(8.0), hidden)  # (shift, scale)
        assert key == f"{target}.bias" and value.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    [(_, value)] = map_sd3_transformer_weight("joint_blocks.0.context_block.adaLN_modulation.1.bias",
                                              np.arange(24.0), hidden)
    assert value.tolist() == list(range(24))  # a six-part modulation keeps its order
    with pytest.raises(KeyError):
        map_sd3_transformer_weight("joint_blocks.0.x_block.attn.unknown.weight", np.ones(4), hidden)


# --- which files, and missing and wrong ones ----------------------------------------------------------

def test_is_sd3_file(sd3, tmp_path):
    from bfl_layout import write_bfl
    import tiny_flux

    models, _, files = sd3
    assert is_sd3_file(files["sd3"]) and is_sd3_file(files["sd35-medium-all-in-one"])
    assert is_sd3_file(write_sd3(models["sd3"], tmp_path / "bare.safetensors", prefix=""))
    assert not is_sd3_file(files["text_encoder_2"])
    assert not is_sd3_file(write_bfl(tiny_flux.transformer(False, 1, 1), tmp_path / "flux.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert not is_sd3_file(tmp_path / "junk.safetensors") and not is_sd3_file(tmp_path / "missing.safetensors")


def test_transformer_alone_names_the_missing_files(sd3):
    _, _, files = sd3
    with pytest.raises(CheckpointError, match=r"all of SD3.*--clip-l.*clip_l\.safetensors.*--clip-g.*"
                                              r"clip_g\.safetensors.*--t5xxl.*t5xxl"):
        read_sd3_files(files["sd35-medium"], t5_tokenizer=files["tokenizer"])
    with pytest.raises(CheckpointError, match=r"also give --t5xxl") as error:
        read_sd3_files(files["sd35-medium"], None, files["text_encoder"], files["text_encoder_2"],
                       t5_tokenizer=files["tokenizer"])
    assert "--clip" not in str(error.value)
    # without T5 (convert --no-t5) none is asked for, nor its tokenizer
    source = read_sd3_files(files["sd35-medium"], None, files["text_encoder"], files["text_encoder_2"], with_t5=False)
    assert sorted(source.components) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert "text_encoder_3" not in source.tokenizers


def test_a_file_in_the_wrong_place(sd3, tmp_path):
    from safetensors.numpy import save_file

    models, _, files = sd3
    with pytest.raises(CheckpointError, match="is not the T5-XXL text encoder"):
        read_sd3_files(files["sd35-medium"], None, files["text_encoder"], files["text_encoder_2"],
                       files["text_encoder"], t5_tokenizer=files["tokenizer"])
    with pytest.raises(CheckpointError, match="is not the SD3 transformer"):
        read_sd3_files(files["text_encoder_3"], t5_tokenizer=files["tokenizer"])
    with pytest.raises(CheckpointError, match="does not exist"):
        read_sd3_files(files["sd35-medium"].with_name("nothing.safetensors"))
    # CLIP-L's file (no projection here) given as CLIP-G: SD3 needs CLIP-G's projection
    state = clip_file_state(models["text_encoder"])
    state.pop("text_projection.weight")
    save_file(state, str(tmp_path / "clip_l_no_projection.safetensors"))
    with pytest.raises(CheckpointError, match="CLIP-G text encoder has no text_projection.weight"):
        read_sd3_files(files["sd35-medium"], None, files["text_encoder"], tmp_path / "clip_l_no_projection.safetensors",
                       files["text_encoder_3"], t5_tokenizer=files["tokenizer"])


def test_unknown_transformer_keys_are_skipped_with_a_warning(sd3, tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    _, references, files = sd3
    state = load_file(str(files["sd3"]))
    state["model.diffusion_model.joint_blocks.0.extra.weight"] = np.zeros(2, np.float32)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with caplog.at_level(logging.WARNING, logger="mlx_sd_server.engine.source"):
        source = read({**files, "sd3": tmp_path / "extra.safetensors"}, "sd3")
    assert "joint_blocks.0.extra.weight" in caplog.text
    assert_same_weights(source.components["transformer"][1], references["sd3"])


# --- end to end: the files convert to the model the diffusers folder converts to, bit for bit ---------

def projected_clip_file_state(clip) -> dict[str, np.ndarray]:
    """clip_l/clip_g.safetensors as SD3 ships them: transformers names, the projection beside `text_model.`."""
    return clip_g_file_state(clip)


@pytest.fixture(scope="module", params=READ_VARIANTS)
def pipeline(request, tmp_path_factory):
    """A tiny pipeline as a diffusers folder, converted from it, and as the files users have: the MMDiT with the
    VAE, alone (with the text encoders' own files) and with the text encoders inside."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp(f"sd3-{request.param}")
    pipe = tiny_sd3.make_pipeline(root / "diffusers", request.param)
    with torch.no_grad():  # SD3 pools CLIP-L unprojected, which the files convert to: an identity projection
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(TEXT_DIM))
    pipe.text_encoder.save_pretrained(str(root / "diffusers" / "text_encoder"))
    text = {"clip_l": projected_clip_file_state(pipe.text_encoder),
            "clip_g": projected_clip_file_state(pipe.text_encoder_2), "t5xxl": t5_file_state(pipe.text_encoder_3)}
    files = {name: root / f"{name}.safetensors" for name in text}
    for name, state in text.items():
        save_file(state, str(files[name]))
    checkpoint = {**numpy_state(sd3_state(pipe.transformer.state_dict())),
                  **under("first_stage_model.", vae_file_state(pipe.vae))}
    files["model"] = root / "sd3_model.safetensors"
    save_file(checkpoint, str(files["model"]))
    files["all-in-one"] = root / "sd3_model_incl_clips_t5xxl.safetensors"
    save_file({**checkpoint, **{f"text_encoders.{name}.transformer.{k}": v for name, state in text.items()
                                for k, v in state.items()}}, str(files["all-in-one"]))
    from_folder = convert_model(root / "diffusers", root / "from-folder", dtype="float32", progress=False)
    return root, files, from_folder


def assert_same_model(ours, reference) -> None:
    """Two converted folders hold the same weights, scheduler, defaults and component architectures."""
    import mlx.core as mx

    ours_manifest, manifest = read_manifest(ours), read_manifest(reference)
    assert (ours_manifest["family"], ours_manifest["scheduler"]) == (manifest["family"], manifest["scheduler"])
    assert ours_manifest["defaults"] == manifest["defaults"]
    assert sorted(ours_manifest["components"]) == sorted(manifest["components"])
    for name, entry in manifest["components"].items():
        ours_entry = ours_manifest["components"][name]
        assert ours_entry.get("max_length") == entry.get("max_length"), name
        fields = {"transformer": TRANSFORMER_ARCHITECTURE, "text_encoder_3": T5_ARCHITECTURE}.get(name)
        if name in ("text_encoder", "text_encoder_2"):
            fields = CLIP_ARCHITECTURE[:3] + ("max_position_embeddings", "hidden_act", "projection_dim")
        if fields:
            assert_config_matches(ours_entry["config"], entry["config"], fields)
        ours_weights, weights = mx.load(str(ours / ours_entry["weights"])), mx.load(str(reference / entry["weights"]))
        assert sorted(ours_weights) == sorted(weights), name
        for key in weights:
            assert np.array_equal(np.array(ours_weights[key]), np.array(weights[key])), f"{name}: {key}"


TRANSFORMER_ARCHITECTURE = ("attention_head_dim", "caption_projection_dim", "dual_attention_layers", "in_channels",
                            "joint_attention_dim", "num_attention_heads", "num_layers", "out_channels", "patch_size",
                            "pooled_projection_dim", "pos_embed_max_size", "qk_norm")


@pytest.mark.parametrize("layout", ["split-files", "all-in-one"])
def test_files_convert_to_the_diffusers_folders_model(pipeline, layout):
    root, files, from_folder = pipeline
    text = (files["clip_l"], files["clip_g"], files["t5xxl"]) if layout == "split-files" else (None, None, None)
    source = read_sd3_files(files["model" if layout == "split-files" else "all-in-one"], None, *text,
                            t5_tokenizer=root / "diffusers" / "tokenizer_3", attention_head_dim=HEAD_DIM,
                            t5_max_distance=T5_MAX_DISTANCE, hints=TINY)
    assert_same_model(write_model(with_tokenizers(source, root / "diffusers"), root / layout, name="from-files",
                                  dtype="float32", progress=False), from_folder)


def skip_without_qk_norm(converted) -> None:
    if read_manifest(converted)["components"]["transformer"]["config"]["qk_norm"] is None:
        pytest.skip("without qk-norm the tiny heads' size is not in the files (read_source assumes 64)")


def test_the_command_line_converts_split_files(pipeline, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    root, files, from_folder = pipeline
    skip_without_qk_norm(from_folder)
    clips = {}
    for name in ("clip_l", "clip_g"):  # with CLIP's vocabulary: a converted file gets CLIP's own tokenizer
        clips[name] = tmp_path / f"{name}.safetensors"
        save_file(with_clip_vocabulary(load_file(str(files[name]))), str(clips[name]))
    split = ["--clip-l", str(clips["clip_l"]), "--clip-g", str(clips["clip_g"]), "--t5xxl", str(files["t5xxl"]),
             "--t5-tokenizer", str(root / "diffusers" / "tokenizer_3")]
    assert cli(["convert", "--diffusion-model", str(files["model"]), *split, "--dtype", "float32",
                str(tmp_path / "sd3")]) == 0
    manifest = read_manifest(tmp_path / "sd3")
    assert manifest["family"] == "sd3" and manifest["source"]["from"] == str(files["model"].resolve())
    reference = read_manifest(from_folder)["components"]
    for name, fields in (("transformer", TRANSFORMER_ARCHITECTURE),
                         ("vae", ("latent_channels", "block_out_channels", "scaling_factor", "shift_factor"))):
        assert_config_matches(manifest["components"][name]["config"], reference[name]["config"], fields)
    # Only what is missing is asked for.
    assert cli(["convert", "--diffusion-model", str(files["model"]), "--clip-l", str(files["clip_l"]),
                str(tmp_path / "x")]) == 1
    message = capsys.readouterr().err
    assert "--clip-g" in message and "--t5xxl" in message and "--clip-l" not in message
    assert not (tmp_path / "x").exists()


def test_clip_g_is_refused_for_flux(tmp_path, capsys):
    from bfl_layout import write_bfl
    import tiny_flux

    flux = write_bfl(tiny_flux.transformer(False, 1, 1), tmp_path / "flux1-schnell.safetensors")
    assert cli(["convert", "--diffusion-model", str(flux), "--clip-g", str(flux), str(tmp_path / "x")]) == 1
    assert "--clip-g is for SD3/SD3.5" in capsys.readouterr().err


def test_a_single_file_is_read_as_sd3(pipeline, monkeypatch):
    """`convert FILE` and `serve --model FILE` read an SD3 file by its keys; T5's tokenizer is downloaded."""
    import huggingface_hub

    root, files, from_folder = pipeline
    skip_without_qk_norm(from_folder)
    tokenizer = root / "diffusers" / "tokenizer_3" / "tokenizer.json"
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kwargs: str(tokenizer))
    source = read_source(files["all-in-one"])
    assert source.family == "sd3" and sorted(source.components) == ["text_encoder", "text_encoder_2",
                                                                    "text_encoder_3", "transformer", "vae"]
    split = read_source(SplitFiles(files["model"], clip_l=files["clip_l"], clip_g=files["clip_g"],
                                   t5xxl=files["t5xxl"]))
    assert split.family == "sd3" and split.tokenizers["text_encoder_3"] == tokenizer.parent
    with pytest.raises(CheckpointError, match="also give --clip-l.*--clip-g.*--t5xxl"):
        read_source(files["model"])


def test_a_gguf_checkpoint_converts_to_exactly_its_weights(pipeline, tmp_path):
    """stable-diffusion.cpp's SD3/SD3.5 GGUFs keep the original names; their Q8_0 layers stay MLX 8-bit layers
    holding the file's weights, the fused q/k/v split into whole rows included."""
    from safetensors.numpy import load_file, save_file

    from gguf_layout import dequantized, write_gguf
    from test_gguf import stored

    root, files, _ = pipeline
    path = write_gguf(load_file(str(files["model"])), tmp_path / "sd3-Q8_0.gguf", "Q8_0")
    twin = tmp_path / "twin.safetensors"
    save_file(dequantized(path), str(twin))
    assert is_sd3_file(path)

    def convert(checkpoint, name):
        source = read_sd3_files(checkpoint, None, files["clip_l"], files["clip_g"], files["t5xxl"],
                                t5_tokenizer=root / "diffusers" / "tokenizer_3", attention_head_dim=HEAD_DIM,
                                t5_max_distance=T5_MAX_DISTANCE, hints=TINY)
        return write_model(with_tokenizers(source, root / "diffusers"), tmp_path / name, name=name,
                           dtype="float32", progress=False)

    weights, layers = stored(convert(path, "gguf"), "transformer")
    expected, _ = stored(convert(twin, "twin"), "transformer")
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(weights[key], value), key
    for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        assert layers[f"transformer_blocks.0.attn.{part}"] == (8, 32)


# --- pull: the diffusers folders, not the single files beside them -------------------------------------

SD35_LARGE_REPO = [  # stabilityai/stable-diffusion-3.5-large's files (-large-turbo's are named alike)
    "README.md", "LICENSE.md", "mmdit.png", "sd3.5_large_demo.png", "SD3.5L_example_workflow.json",
    "sd3.5_large.safetensors", "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors", "text_encoder_3/config.json", "text_encoder_3/model.safetensors.index.json",
    "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
    "text_encoders/README.md", "text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors",
    "text_encoders/t5xxl_fp16.safetensors", "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json", "tokenizer_3/special_tokens_map.json",
    "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
# -3.5-medium: one transformer file, and its own single file; -3-medium-diffusers: fp16 variants beside all
# (T5's shards too, with their own index).
SD35_MEDIUM_REPO = [f.replace("large", "medium") for f in SD35_LARGE_REPO if "diffusion_pytorch_model-" not in f
                    and not f.startswith("transformer/diffusion_pytorch_model.safetensors.index")] + [
    "transformer/diffusion_pytorch_model.safetensors"]
SD3_MEDIUM_REPO = [f for f in SD35_MEDIUM_REPO if "sd3.5" not in f and not f.startswith("text_encoders/")] + [
    "sd3demo.jpg", "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
    "text_encoder_3/model.fp16-00001-of-00002.safetensors", "text_encoder_3/model.fp16-00002-of-00002.safetensors",
    "text_encoder_3/model.safetensors.index.fp16.json", "transformer/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors"]
T5_SHARDS = {"text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors"}


def kept_weights(repo: list[str], dtype: str) -> set[str]:
    from huggingface_hub.utils import filter_repo_objects

    return {f for f in filter_repo_objects(repo, allow_patterns=allow_patterns(repo, dtype))
            if f.endswith(".safetensors")}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_pull_takes_the_sd35_diffusers_folders(dtype):
    from huggingface_hub.utils import filter_repo_objects

    assert kept_weights(SD35_LARGE_REPO, dtype) == T5_SHARDS | {
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"}
    assert kept_weights(SD35_MEDIUM_REPO, dtype) == T5_SHARDS | {
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors"}
    kept = set(filter_repo_objects(SD35_LARGE_REPO, allow_patterns=allow_patterns(SD35_LARGE_REPO, dtype)))
    assert {"model_index.json", "scheduler/scheduler_config.json", "text_encoder_3/model.safetensors.index.json",
            "tokenizer_3/tokenizer.json", "tokenizer_3/spiece.model", "transformer/config.json"} <= kept
    assert not any(f.startswith("text_encoders/") or f.startswith("sd3.5") for f in kept)


def test_pull_takes_sd3_mediums_fp16_variants_for_float16():
    assert kept_weights(SD3_MEDIUM_REPO, "float16") == T5_SHARDS | {  # sharded weights keep full precision
        "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
        "transformer/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"}
    assert kept_weights(SD3_MEDIUM_REPO, "float32") == T5_SHARDS | {
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
