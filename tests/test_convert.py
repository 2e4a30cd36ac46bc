"""Diffusers folder -> converted MLX folder -> loaded modules equal the diffusers reference."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny_diffusers
from convert.checkpoint import read_checkpoint
from convert.model import convert_model, write_model
from ldm_layout import CLIP_VOCABULARY, checkpoint_state, with_clip_vocabulary, with_tokenizers, write_checkpoint
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.source import ArchitectureHints, CheckpointError
from parity import max_rel_err, nchw_to_nhwc

TOLERANCE = 1e-4


# Head counts and group-norm sizes cannot be read off tensor shapes; the tiny models' differ from the
# released models' (which are the defaults), so single-file conversion of tiny models is told them.
TINY_HINTS = ArchitectureHints(unet_head_dim=16, text_head_dim=8, norm_num_groups=8)


@pytest.fixture(scope="module", params=[(f, s) for f in tiny_diffusers.FAMILIES for s in ("folder", "single-file")],
                ids=lambda p: "-".join(p))
def converted(request, tmp_path_factory):
    family, source = request.param
    src = tmp_path_factory.mktemp(f"{family}-diffusers")
    pipe = tiny_diffusers.make_pipeline(src, family)
    dst = tmp_path_factory.mktemp(f"{family}-mlx") / "model"
    if source == "folder":
        convert_model(src, dst, dtype="float32", progress=False)
    else:
        checkpoint = write_checkpoint(pipe, family, src / "model.safetensors")
        write_model(with_tokenizers(read_checkpoint(checkpoint, hints=TINY_HINTS), src), dst, name="model",
                    dtype="float32", progress=False)
    return family, pipe, dst


def test_manifest_describes_the_model(converted):
    family, _, dst = converted
    manifest = read_manifest(dst)
    assert manifest["family"] == {"sd2v": "sd2"}.get(family, family)
    assert manifest["prediction_type"] == ("v_prediction" if family == "sd2v" else "epsilon")
    assert manifest["scheduler"]["beta_schedule"] == "scaled_linear"
    expected = {"text_encoder", "unet", "vae"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert set(manifest["components"]) == expected
    assert (dst / "tokenizer" / "vocab.json").exists()
    assert not list(dst.parent.glob(".*partial*")), "conversion left a temporary folder behind"


def test_components_match_reference(converted):
    family, pipe, dst = converted
    model = load_model(dst, dtype="float32")
    rng = np.random.default_rng(0)

    # text encoders: same ids through both
    ids = pipe.tokenizer(["a photo of a cat", "dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for ours, ref in zip(model.text_encoders.values(), torch_encoders):
        with torch.no_grad():
            expected = ref(ids, output_hidden_states=True)
        got = ours(mx.array(ids.numpy()))
        assert max_rel_err(got.last_hidden_state, expected.last_hidden_state) < TOLERANCE
        assert max_rel_err(got.hidden_states[-2], expected.hidden_states[-2]) < TOLERANCE

    # unet
    cfg = pipe.unet.config
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    t = np.array([999.0, 321.5], dtype=np.float32)
    kwargs, torch_kwargs = {}, {}
    if family == "sdxl":
        embeds = rng.standard_normal((2, tiny_diffusers.TEXT_DIM)).astype(np.float32)
        time_ids = np.array([[64, 64, 0, 0, 64, 64]] * 2, dtype=np.float32)
        kwargs = dict(text_embeds=mx.array(embeds), time_ids=mx.array(time_ids))
        torch_kwargs = dict(added_cond_kwargs={"text_embeds": torch.from_numpy(embeds), "time_ids": torch.from_numpy(time_ids)})
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context), **torch_kwargs).sample
    got = model.unet(mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(context), **kwargs)
    assert max_rel_err(got, nchw_to_nhwc(expected)) < TOLERANCE

    # vae decode and encode
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = pipe.vae.decode(torch.from_numpy(z)).sample
    assert max_rel_err(model.vae.decode(mx.array(z.transpose(0, 2, 3, 1))), nchw_to_nhwc(expected)) < TOLERANCE
    image = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = pipe.vae.encode(torch.from_numpy(image)).latent_dist.mean
    mean, _ = model.vae.encode(mx.array(image.transpose(0, 2, 3, 1)))
    assert max_rel_err(mean, nchw_to_nhwc(expected)) < TOLERANCE


def test_float16_and_quantized_conversions_load(tmp_path):
    src = tmp_path / "src"
    tiny_diffusers.make_pipeline(src, "sd1")
    for options in ({"dtype": "float16"}, {"dtype": "bfloat16"}, {"dtype": "float16", "quantize": 8}):
        dst = tmp_path / "_".join(map(str, options.values()))
        convert_model(src, dst, progress=False, **options)
        manifest = json.loads((dst / "model.json").read_text())
        assert manifest["dtype"] == options["dtype"]
        assert (manifest["quantization"] or {}).get("bits") == options.get("quantize")
        model = load_model(dst, dtype="float32")
        out = model.unet(mx.zeros((1, 8, 8, 4)), mx.array([500.0]), mx.zeros((1, 77, tiny_diffusers.TEXT_DIM)))
        assert np.isfinite(np.array(out)).all()


def test_refuses_pickle_and_existing_output(tmp_path):
    src = tmp_path / "src"
    tiny_diffusers.make_pipeline(src, "sd1")
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save({"x": torch.zeros(1)}, src / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match="pickle"):
        convert_model(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        convert_model(src, tmp_path / "busy", progress=False)


def test_a_text_embedding_shorter_than_the_tokenizers_vocabulary_is_refused(tmp_path):
    """A single file carries no tokenizer, so its CLIP gets CLIP's own (49,408 tokens). A CLIP whose embedding
    has fewer rows (here the tiny pipeline's) would be read past its end at run time: conversion refuses it,
    naming both sizes, and leaves nothing behind."""
    from safetensors.numpy import save_file

    pipe = tiny_diffusers.make_pipeline(tmp_path / "src", "sd1")
    checkpoint = write_checkpoint(pipe, "sd1", tmp_path / "short-vocabulary.safetensors")
    rows = tiny_diffusers.tokenizer_vocab_size()
    with pytest.raises(CheckpointError, match=rf"text_encoder: its token embedding has {rows} rows, but its "
                                              r"tokenizer has 49408 tokens"):
        convert_model(checkpoint, tmp_path / "models" / "short", progress=False)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    full = tmp_path / "full-vocabulary.safetensors"  # the same model with CLIP's rows converts
    save_file(with_clip_vocabulary(checkpoint_state(pipe, "sd1")), str(full))
    manifest = read_manifest(convert_model(full, tmp_path / "models" / "full", progress=False))
    assert manifest["components"]["text_encoder"]["config"]["vocab_size"] == CLIP_VOCABULARY


def test_turbo_and_lcm_models_get_their_own_defaults():
    from convert.model import model_defaults
    from mlx_sd_server.engine.source import SourceModel

    def source(family="sd1", prediction="epsilon", **unet):
        return SourceModel(family, prediction, {}, {"unet": (unet, ())})

    assert model_defaults(source(), "sd15") == {"steps": 20, "cfg_scale": 7.0, "sample_method": "euler_a",
                                                "scheduler": "discrete", "width": 512, "height": 512}
    turbo = model_defaults(source("sdxl"), "sdxl-turbo")
    assert (turbo["steps"], turbo["cfg_scale"], turbo["scheduler"], turbo["width"]) == (1, 1.0, "trailing", 512)
    lcm = model_defaults(source(time_cond_proj_dim=256), "lcm-dreamshaper-v7")
    assert (lcm["steps"], lcm["sample_method"], lcm["scheduler"]) == (4, "lcm", "lcm")
    assert model_defaults(source("sd2", "v_prediction"), "sd21")["width"] == 768
    assert model_defaults(source("sdxl"), "sdxl-base")["width"] == 1024
