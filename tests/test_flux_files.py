"""FLUX.1's split files (BFL transformer, LDM autoencoder, CLIP-L, T5-XXL) -> diffusers layout.

Tiny random diffusers/transformers FLUX components are written as the files users have (the transformer by
`bfl_layout`, checked against diffusers' own converter; the autoencoder by `ldm_layout`), read back by
`convert.checkpoint` as FLUX's (`engine.families.flux.single_file`), and must give back the exact weights and
the configs that define the architecture.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils
from torch.overrides import TorchFunctionMode

from bfl_layout import bfl_state, write_bfl
from convert.checkpoint import T5_TOKENIZER_FILE, T5_TOKENIZER_REPO, LazyWeights, read_original
from ldm_layout import vae_key
from mlx_sd_server.engine.families.flux.single_file import (
    DEV_SCHEDULER as FLUX_DEV_SCHEDULER, SCHNELL_SCHEDULER as FLUX_SCHNELL_SCHEDULER, flux_transformer_config,
    map_bfl_transformer_weight,
)
from mlx_sd_server.engine.families.flux.spec import SPEC as FLUX
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError
from mlx_sd_server.engine.text.single_file import t5_config
import tiny_flux
from tiny_diffusers import text_encoder as tiny_clip
from tiny_flux import AXES, randomize

TINY = ArchitectureHints(text_head_dim=8, norm_num_groups=8)  # the tiny CLIP's 4 heads of 8, the VAE's groups
T5_MAX_DISTANCE = 20  # not 128, so that the keyword is seen to reach the config
T5_ARCHITECTURE = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                   "relative_attention_max_distance", "feed_forward_proj", "dense_act_fn", "is_gated_act",
                   "layer_norm_epsilon")
CLIP_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "hidden_act", "layer_norm_eps")


def read_flux_files(diffusion_model, vae=None, clip_l=None, t5xxl=None, *, t5_tokenizer=None, axes_dims_rope=None,
                    t5_max_distance=128, hints=None):
    """FLUX.1's files read as FLUX's, as `convert --diffusion-model FILE --vae FILE ...` reads them."""
    given = {option: path for option, path in (("--vae", vae), ("--clip-l", clip_l), ("--t5xxl", t5xxl)) if path}
    hints = dataclasses.replace(hints or ArchitectureHints(), axes_dims_rope=axes_dims_rope,
                                t5_max_distance=t5_max_distance)
    return read_original(FLUX, diffusion_model, given, t5_tokenizer=t5_tokenizer, hints=hints)


# --- tiny components ----------------------------------------------------------------------------------

def tiny_transformer(guidance: bool):
    return tiny_flux.transformer(guidance, num_layers=2, num_single_layers=3)


def tiny_vae():
    return randomize(tiny_flux.vae(), seed=3)


def tiny_t5(gated: bool = True):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=T5_MAX_DISTANCE,
                      feed_forward_proj="gated-gelu" if gated else "relu")
    return randomize(T5EncoderModel(config), seed=4)


def numpy_state(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in state.items()}


def vae_file_state(vae) -> dict[str, np.ndarray]:
    """ae.safetensors' layout: LDM names, no prefix, the attention projections as 1x1 convolutions."""
    out = {}
    for key, value in numpy_state(vae.state_dict()).items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[vae_key(key, vae.config)] = value
    return out


def clip_file_state(clip) -> dict[str, np.ndarray]:
    """clip_l.safetensors: transformers names under `text_model.`, with a projection and ids FLUX does not use."""
    out = {"text_model." + k.removeprefix("text_model."): v for k, v in numpy_state(clip.state_dict()).items()}
    out["text_projection.weight"] = np.random.default_rng(5).standard_normal((32, 32), dtype=np.float32)
    out["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def t5_file_state(t5) -> dict[str, np.ndarray]:
    """t5xxl_*.safetensors: transformers names, the token embedding as `shared` and as its tied encoder copy."""
    state = numpy_state(t5.state_dict())
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"].copy())
    return state


def write_tokenizer_json(folder):
    """Any small T5-like (unigram) tokenizer.json: the reader only passes the folder on."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in ("a", "cat", "photo")]
    tokenizer = Tokenizer(models.Unigram(vocab + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"], unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny components, their reference state dicts, and their split files (dev and schnell transformers)."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("flux")
    models = {"dev": tiny_transformer(True), "schnell": tiny_transformer(False), "vae": tiny_vae(),
              "text_encoder": tiny_clip("sd1", seed=6), "text_encoder_2": tiny_t5()}
    files = {"dev": write_bfl(models["dev"], folder / "flux1-dev.safetensors"),
             "schnell": write_bfl(models["schnell"], folder / "flux1-schnell.safetensors"),
             "vae": folder / "ae.safetensors", "text_encoder": folder / "clip_l.safetensors",
             "text_encoder_2": folder / "t5xxl_fp16.safetensors", "tokenizer": write_tokenizer_json(folder / "t5")}
    save_file(vae_file_state(models["vae"]), str(files["vae"]))
    save_file(clip_file_state(models["text_encoder"]), str(files["text_encoder"]))
    save_file(t5_file_state(models["text_encoder_2"]), str(files["text_encoder_2"]))
    references = {
        "dev": numpy_state(models["dev"].state_dict()),
        "schnell": numpy_state(models["schnell"].state_dict()),
        "vae": numpy_state(models["vae"].state_dict()),
        "text_encoder": {"text_model." + k.removeprefix("text_model."): v
                         for k, v in numpy_state(models["text_encoder"].state_dict()).items()},
        "text_encoder_2": {k: v for k, v in numpy_state(models["text_encoder_2"].state_dict()).items()
                           if k != "encoder.embed_tokens.weight"},
    }
    return models, references, files


def read(files, variant="dev", **kwargs):
    kwargs = {"t5_tokenizer": files["tokenizer"], "axes_dims_rope": AXES, "t5_max_distance": T5_MAX_DISTANCE,
              "hints": TINY, **kwargs}
    return read_flux_files(files[variant], files["vae"], files["text_encoder"], files["text_encoder_2"], **kwargs)


def assert_same_weights(ours, reference: dict[str, np.ndarray]) -> None:
    ours = dict(ours)
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].dtype == np.float32, key
        assert np.array_equal(ours[key], value), key


def assert_config_matches(ours: dict, reference: dict, fields=None) -> None:
    """All of the reference's fields (or `fields`) equal, as they would be in a config.json."""
    ours, reference = json.loads(json.dumps(ours)), json.loads(json.dumps(reference))
    for key in fields or set(reference) - {"_diffusers_version", "transformers_version"}:
        assert ours.get(key) == reference[key], key


# --- the test writers' layouts are the real ones ------------------------------------------------------

class SingleBlockWidths(TorchFunctionMode):
    """diffusers' FLUX converter splits the single blocks' fused linear1 at FLUX.1's widths (3 x 3072 + 12288):
    make it split at the tiny model's (3 x hidden + 4 x hidden) instead."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = (hidden, hidden, hidden, 4 * hidden)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.split and isinstance(args[1], (tuple, list)) and tuple(args[1]) == (3072,) * 3 + (12288,):
            args = (args[0], self.sizes, *args[2:])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_layout_is_what_diffusers_converter_reads(flux, variant, prefix):
    models, references, _ = flux
    checkpoint = bfl_state(models[variant].state_dict(), prefix)
    with SingleBlockWidths(hidden=32):
        converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert_same_weights(numpy_state(converted), references[variant])


def test_vae_file_layout_is_what_diffusers_converter_reads(flux):
    models, references, files = flux
    checkpoint = {k: torch.from_numpy(v) for k, v in vae_file_state(models["vae"]).items()}
    assert "quant_conv.weight" not in checkpoint and "encoder.down.0.block.0.conv1.weight" in checkpoint
    converted = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, dict(models["vae"].config))
    assert_same_weights(numpy_state(converted), references["vae"])


# --- read_flux_files gives back the models ------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_read_flux_files_gives_back_the_models(flux, variant):
    models, references, files = flux
    source = read(files, variant)

    assert (source.family, source.prediction_type) == ("flux", "flow")
    assert source.scheduler == (FLUX_DEV_SCHEDULER if variant == "dev" else FLUX_SCHNELL_SCHEDULER)
    assert source.tokenizers == {"text_encoder": None, "text_encoder_2": files["tokenizer"]}
    assert sorted(source.components) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    for name, reference in (("transformer", references[variant]), ("vae", references["vae"]),
                            ("text_encoder", references["text_encoder"]),
                            ("text_encoder_2", references["text_encoder_2"])):
        assert_same_weights(source.components[name][1], reference)

    transformer_config = source.components["transformer"][0]
    assert transformer_config["_class_name"] == "FluxTransformer2DModel"
    assert transformer_config["guidance_embeds"] == (variant == "dev")
    assert_config_matches(transformer_config, json.loads(models[variant].to_json_string()))
    assert_config_matches(source.components["vae"][0], json.loads(models["vae"].to_json_string()))
    clip_config = source.components["text_encoder"][0]
    assert clip_config["architectures"] == ["CLIPTextModel"]
    assert_config_matches(clip_config, models["text_encoder"].config.to_dict(), CLIP_ARCHITECTURE)
    t5 = source.components["text_encoder_2"][0]
    assert t5["architectures"] == ["T5EncoderModel"]
    assert_config_matches(t5, models["text_encoder_2"].config.to_dict(), T5_ARCHITECTURE)


def test_configs_build_the_models_the_weights_fit(flux):
    """Each config makes a diffusers/transformers model that takes the weights read with it, strictly."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    _, _, files = flux
    source = read(files)
    for name, build in (("transformer", FluxTransformer2DModel.from_config),
                        ("vae", AutoencoderKL.from_config),
                        ("text_encoder_2", lambda config: T5EncoderModel(T5Config(**config)))):
        config, weights = source.components[name]
        model = build(config)
        state = {k: torch.from_numpy(v) for k, v in weights}
        if name == "text_encoder_2":
            state["encoder.embed_tokens.weight"] = state["shared.weight"]
        model.load_state_dict(state, strict=True)


def test_weights_are_read_lazily_and_again(flux):
    _, references, files = flux
    weights = read(files).components["transformer"][1]
    assert isinstance(weights, LazyWeights)
    assert_same_weights(weights, references["dev"])
    assert_same_weights(weights, references["dev"])  # a second pass reads the file again


def test_half_and_fp8_files_give_float32(flux, tmp_path):
    """The released transformer is bf16; T5-XXL often fp8 (e4m3fn), which MLX loads as raw bytes."""
    from safetensors.torch import save_file

    models, _, files = flux
    transformer = write_bfl(models["dev"], tmp_path / "flux1-dev-bf16.safetensors", dtype=torch.bfloat16)
    t5 = {k: torch.from_numpy(v).to(torch.float8_e4m3fn) for k, v in t5_file_state(models["text_encoder_2"]).items()}
    save_file(t5, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    source = read({**files, "dev": transformer, "text_encoder_2": tmp_path / "t5xxl_fp8_e4m3fn.safetensors"})

    assert_same_weights(source.components["transformer"][1],
                        {k: v.to(torch.bfloat16).float().numpy() for k, v in models["dev"].state_dict().items()})
    assert_same_weights(source.components["text_encoder_2"][1],
                        {k: v.float().numpy() for k, v in t5.items() if k != "encoder.embed_tokens.weight"})


def test_t5_file_with_only_the_encoder_embedding(flux, tmp_path):
    from safetensors.numpy import save_file

    models, references, files = flux
    state = t5_file_state(models["text_encoder_2"])
    state.pop("shared.weight")
    save_file(state, str(tmp_path / "t5.safetensors"))
    source = read({**files, "text_encoder_2": tmp_path / "t5.safetensors"})
    assert_same_weights(source.components["text_encoder_2"][1], references["text_encoder_2"])


@pytest.mark.parametrize("vae_prefix", ["vae.", "first_stage_model."])
def test_all_in_one_checkpoint(flux, tmp_path, vae_prefix):
    """ComfyUI's single-file FLUX: transformer, VAE and both text encoders under their prefixes."""
    from safetensors.numpy import save_file

    models, references, files = flux
    state = numpy_state(bfl_state(models["schnell"].state_dict(), "model.diffusion_model."))
    state.update({vae_prefix + k: v for k, v in vae_file_state(models["vae"]).items()})
    state.update({"text_encoders.clip_l.transformer." + k: v
                  for k, v in clip_file_state(models["text_encoder"]).items()})
    state.update({"text_encoders.t5xxl.transformer." + k: v
                  for k, v in t5_file_state(models["text_encoder_2"]).items()})
    save_file(state, str(tmp_path / "flux1-schnell-all-in-one.safetensors"))

    source = read_flux_files(tmp_path / "flux1-schnell-all-in-one.safetensors", t5_tokenizer=files["tokenizer"],
                             axes_dims_rope=AXES, t5_max_distance=T5_MAX_DISTANCE, hints=TINY)
    split = read(files, "schnell")
    assert source.scheduler == FLUX_SCHNELL_SCHEDULER
    for name, (config, weights) in source.components.items():
        assert config == split.components[name][0], name
        assert_same_weights(weights, dict(split.components[name][1]))
    # A file given separately wins over the bundle's.
    assert_same_weights(read_flux_files(tmp_path / "flux1-schnell-all-in-one.safetensors", None, None,
                                        files["text_encoder_2"], t5_tokenizer=files["tokenizer"], axes_dims_rope=AXES,
                                        hints=TINY).components["text_encoder_2"][1], references["text_encoder_2"])


# --- configs from shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [True, False])
def test_real_size_transformer_config_from_shapes(guidance):
    """FLUX.1 dev/schnell's shapes (meta tensors: no memory) give the released config, rotary split included."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=guidance)  # diffusers' defaults are FLUX.1's
    config = flux_transformer_config(bfl_state(model.state_dict(), "model.diffusion_model."))
    assert_config_matches(config, json.loads(model.to_json_string()))
    assert config["axes_dims_rope"] == [16, 56, 56] and config["out_channels"] is None


@pytest.mark.parametrize("gated", [True, False])
def test_real_size_t5_config_from_shapes(gated):
    """T5-XXL v1.1 (FLUX's, gated GELU) and a v1.0-style ReLU encoder."""
    from transformers import T5Config, T5EncoderModel

    reference = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         feed_forward_proj="gated-gelu" if gated else "relu")
    with torch.device("meta"):
        state = T5EncoderModel(reference).state_dict()
    assert_config_matches(t5_config(state), reference.to_dict(), T5_ARCHITECTURE)


def test_other_head_sizes_need_the_rotary_split(flux):
    models, _, files = flux
    state = bfl_state(models["dev"].state_dict())
    with pytest.raises(CheckpointError, match="16-dim attention heads.*axes_dims_rope"):
        flux_transformer_config(state)
    with pytest.raises(CheckpointError, match="summing to the head size, 16"):
        flux_transformer_config(state, axes_dims_rope=[4, 4, 4])
    with pytest.raises(CheckpointError, match="axes_dims_rope"):
        read(files, axes_dims_rope=None)


def test_mapping_splits_fused_projections_into_views():
    hidden = 4
    linear1 = np.arange(7 * hidden * hidden, dtype=np.float32).reshape(7 * hidden, hidden)
    pairs = map_bfl_transformer_weight("model.diffusion_model.single_blocks.5.linear1.weight", linear1, hidden)
    assert [k for k, _ in pairs] == [f"single_transformer_blocks.5.{n}.weight"
                                     for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert [v.shape[0] for _, v in pairs] == [4, 4, 4, 16]
    assert all(np.shares_memory(v, linear1) for _, v in pairs)
    assert np.array_equal(np.concatenate([v for _, v in pairs]), linear1)
    [(key, value)] = map_bfl_transformer_weight("double_blocks.0.txt_attn.norm.key_norm.scale", np.ones(4), hidden)
    assert key == "transformer_blocks.0.attn.norm_added_k.weight"
    [(key, value)] = map_bfl_transformer_weight("final_layer.adaLN_modulation.1.bias", np.arange(4.0), hidden)
    assert key == "norm_out.linear.bias" and value.tolist() == [2.0, 3.0, 0.0, 1.0]  # (shift, scale) -> (scale, shift)
    with pytest.raises(KeyError):
        map_bfl_transformer_weight("double_blocks.0.img_attn.unknown.weight", np.ones(4), hidden)


# --- missing and wrong files --------------------------------------------------------------------------

def test_transformer_alone_names_the_missing_files(flux):
    _, _, files = flux
    with pytest.raises(CheckpointError, match=r"ae\.safetensors.*clip_l\.safetensors.*t5xxl"):
        read_flux_files(files["dev"], t5_tokenizer=files["tokenizer"], axes_dims_rope=AXES)


def test_a_file_in_the_wrong_place(flux):
    _, _, files = flux
    with pytest.raises(CheckpointError, match="is not the T5-XXL text encoder"):
        read({**files, "text_encoder_2": files["text_encoder"]})
    with pytest.raises(CheckpointError, match="does not exist"):
        read({**files, "vae": files["vae"].with_name("nothing.safetensors")})


def test_unknown_transformer_keys_are_skipped_with_a_warning(flux, tmp_path, caplog):
    from safetensors.numpy import save_file

    models, references, files = flux
    state = numpy_state(bfl_state(models["dev"].state_dict()))
    save_file({**state, "double_blocks.0.extra.weight": np.zeros(2, np.float32)}, str(tmp_path / "t.safetensors"))
    with caplog.at_level(logging.WARNING, logger="mlx_sd_server.engine.source"):
        source = read({**files, "dev": tmp_path / "t.safetensors"})
    assert "double_blocks.0.extra.weight" in caplog.text
    assert_same_weights(source.components["transformer"][1], references["dev"])


# --- the T5 tokenizer ---------------------------------------------------------------------------------

def test_t5_tokenizer_as_a_file(flux, tmp_path):
    _, _, files = flux
    named = tmp_path / "t5-tokenizer.json"
    named.write_bytes((files["tokenizer"] / "tokenizer.json").read_bytes())
    for given in (files["tokenizer"] / "tokenizer.json", named):
        folder = read(files, t5_tokenizer=given).tokenizers["text_encoder_2"]
        assert (folder / "tokenizer.json").read_bytes() == named.read_bytes()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        read(files, t5_tokenizer=tmp_path)


def test_t5_tokenizer_downloaded_from_schnell(flux, tmp_path, monkeypatch):
    import huggingface_hub

    _, _, files = flux
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(write_tokenizer_json(tmp_path / "cache" / "tokenizer_2") / "tokenizer.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert read(files, t5_tokenizer=None).tokenizers["text_encoder_2"] == tmp_path / "cache" / "tokenizer_2"
    assert calls == [(T5_TOKENIZER_REPO, T5_TOKENIZER_FILE)]


def test_t5_tokenizer_missing_offline_says_to_pass_it(flux, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _, _, files = flux
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="T5 text encoder needs its tokenizer.*--t5-tokenizer"):
        read(files, t5_tokenizer=None)
