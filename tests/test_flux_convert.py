"""FLUX conversion end to end: split files convert to the same weights as the diffusers folder, bit for bit;
quantized FLUX models load and run; the command line takes split files; `pull` downloads only what it keeps."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

import tiny_flux
from bfl_layout import write_bfl
from convert.model import convert_model, write_model
from convert.pull import ALLOW_PATTERNS
from ldm_layout import with_tokenizers
from mlx_sd_server.cli import main as cli
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline, drive
from mlx_sd_server.job import ModelDefaults, build_job
from test_flux_files import TINY, clip_file_state, read_flux_files, t5_file_state, vae_file_state


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """The tiny dev pipeline as a diffusers folder, as split files, and converted from the folder."""
    root = tmp_path_factory.mktemp("flux-convert")
    pipe = tiny_flux.make_pipeline(root / "diffusers", "dev")
    files = {"diffusion_model": write_bfl(pipe.transformer, root / "flux1-dev.safetensors"),
             "vae": root / "ae.safetensors", "clip_l": root / "clip_l.safetensors", "t5xxl": root / "t5xxl.safetensors"}
    save_file(vae_file_state(pipe.vae), str(files["vae"]))
    save_file(clip_file_state(pipe.text_encoder), str(files["clip_l"]))
    save_file(t5_file_state(pipe.text_encoder_2), str(files["t5xxl"]))
    from_folder = convert_model(root / "diffusers", root / "from-folder", dtype="float32", progress=False)
    return root, files, from_folder


def read_split(root, files):
    source = read_flux_files(files["diffusion_model"], files["vae"], files["clip_l"], files["t5xxl"],
                             t5_tokenizer=root / "diffusers" / "tokenizer_2", axes_dims_rope=list(tiny_flux.AXES),
                             t5_max_distance=20, hints=TINY)
    return with_tokenizers(source, root / "diffusers")


def test_split_files_convert_to_the_same_weights_as_the_diffusers_folder(dev):
    import mlx.core as mx

    root, files, from_folder = dev
    from_split = write_model(read_split(root, files), root / "from-split", name="from-split", dtype="float32",
                             progress=False)
    folder_manifest, split_manifest = read_manifest(from_folder), read_manifest(from_split)
    assert folder_manifest["scheduler"] == split_manifest["scheduler"]
    assert folder_manifest["defaults"] == split_manifest["defaults"]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours = mx.load(str(from_split / split_manifest["components"][name]["weights"]))
        reference = mx.load(str(from_folder / folder_manifest["components"][name]["weights"]))
        assert sorted(ours) == sorted(reference), name
        for key in reference:
            assert np.array_equal(np.array(ours[key]), np.array(reference[key])), f"{name}: {key}"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_flux_loads_and_runs(dev, bits):
    root, _, _ = dev
    dst = convert_model(root / "diffusers", root / f"q{bits}", dtype="float32", quantize=bits, progress=False)
    manifest = read_manifest(dst)
    assert manifest["quantization"]["bits"] == bits
    model = load_model(dst)
    transformer = model.components["transformer"]  # the layers whose input width the group size (64) divides:
    assert "scales" in transformer.transformer_blocks[0].ff.net[2] and "scales" not in transformer.proj_out
    job = build_job({"prompt": "a cat", "steps": 2, "size": "64x64"}, defaults=ModelDefaults(**manifest["defaults"]),
                    capabilities=capabilities(manifest))
    images = drive(DiffusionPipeline(model).generate(job))
    assert images[0].size == (64, 64)


def test_the_command_line_converts_split_files_and_says_what_is_missing(dev, tmp_path, capsys):
    root, files, _ = dev
    assert cli(["convert", "--diffusion-model", str(files["diffusion_model"]), str(tmp_path / "x")]) == 1
    message = capsys.readouterr().err
    assert "--vae" in message and "--clip-l" in message and "--t5xxl" in message
    assert cli(["convert", "--diffusion-model", str(files["diffusion_model"]), "a", "b"]) == 2
    # (the tiny transformer's 16-dim heads need an explicit rotary split, which only the real 128 default gives:
    # the command line reaches the reader and fails on exactly that)
    code = cli(["convert", "--diffusion-model", str(files["diffusion_model"]), "--vae", str(files["vae"]),
                "--clip-l", str(files["clip_l"]), "--t5xxl", str(files["t5xxl"]),
                "--t5-tokenizer", str(root / "diffusers" / "tokenizer_2"), str(tmp_path / "y")])
    assert code == 1 and "axes_dims_rope" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


FLUX_DEV_REPO = [  # black-forest-labs/FLUX.1-dev's files
    "README.md", "LICENSE.md", "dev_grid.jpg", "ae.safetensors", "flux1-dev.safetensors", "model_index.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_pull_downloads_the_diffusers_folder_only():
    from huggingface_hub.utils import filter_repo_objects

    kept = set(filter_repo_objects(FLUX_DEV_REPO, allow_patterns=ALLOW_PATTERNS))
    skipped = set(FLUX_DEV_REPO) - kept
    assert skipped == {"README.md", "LICENSE.md", "dev_grid.jpg", "ae.safetensors", "flux1-dev.safetensors"}
