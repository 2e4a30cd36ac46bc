"""FLUX.1 Kontext (dev): instruction edits on FLUX.1 dev's networks, against diffusers' FluxKontextPipeline.

A tiny random Kontext pipeline (tiny_flux's dev components under FluxKontextPipeline) is converted and run with
identical injected noise: final images within 1/255 mean absolute difference, for an input the size of the
output, an input of another aspect ratio with an explicit output size, and true CFG. The transformer with
reference tokens (ids (1, row, col)) against diffusers' within 1e-4 max relative error. Recognition: a
diffusers folder by its pipeline class, single files (safetensors, GGUF) by their name, which `convert`
names the model after; and what a Kontext model declares it can do.
"""

from __future__ import annotations

import argparse
import shutil

import mlx.core as mx
import numpy as np
import pytest
import tiny_flux
import torch
from bfl_layout import bfl_state, write_bfl
from gguf_layout import write_gguf
from ldm_layout import with_tokenizers
from parity import max_rel_err
from PIL import Image
from safetensors.numpy import save_file
from test_flux_convert import FLUX_DEV_REPO
from test_flux_files import TINY, clip_file_state, read_flux_files, t5_file_state, vae_file_state
from test_flux_pipeline import packed
from test_pipeline import ReplayNoise, mean_abs_diff, ours_image, sample_image

from convert.cli import destination
from convert.model import convert_model, write_model
from convert.pull import ALLOW_PATTERNS
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.flux.kontext import PREFERRED_RESOLUTIONS, is_kontext, reference_ids, reference_size
from mlx_sd_server.engine.families.flux.transformer import latent_image_ids, pack_latents
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import JobError, ModelDefaults, build_job

PROMPT = "make the cat a photo"
NEGATIVE = "a dog"
TOLERANCE = 1 / 255


def kontext_pipeline(dst):
    """The tiny dev components as a FluxKontextPipeline, saved as a diffusers folder at `dst` (model_index.json
    names FluxKontextPipeline); returns the pipeline."""
    from diffusers import FluxKontextPipeline

    src = dst.parent / f"{dst.name}-flux"
    dev = tiny_flux.make_pipeline(src, "dev")
    pipe = FluxKontextPipeline(**dev.components)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):  # the tokenizer files as make_pipeline keeps them
        shutil.copytree(src / folder, dst / folder, dirs_exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """(diffusers' FluxKontextPipeline, our pipeline, our manifest), converted from the folder into a model
    whose name does not say Kontext: the pipeline class does."""
    root = tmp_path_factory.mktemp("kontext")
    pipe = kontext_pipeline(root / "diffusers")
    dst = convert_model(root / "diffusers", root / "model", dtype="float32", progress=False)
    return pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False), read_manifest(dst)


def make_job(manifest: dict, fields: dict, images: dict | None = None):
    return build_job({"prompt": PROMPT, "sample_method": "euler", **fields}, images,
                     defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))


def t5_length(manifest: dict) -> int:
    return manifest["components"]["text_encoder_2"]["max_length"]


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, height // 8, width // 8)).astype(np.float32)


def input_image(width: int, height: int, seed: int = 3) -> Image.Image:
    return sample_image(seed).resize((width, height), Image.Resampling.BILINEAR)


# --- recognition and capabilities ----------------------------------------------------------------------------

def test_a_kontext_folder_is_recognised_by_its_pipeline_class(kontext):
    _, _, manifest = kontext
    assert manifest["name"] == "model" and manifest["pipeline"] == {"_class_name": "FluxKontextPipeline"}
    assert manifest["defaults"] == {"steps": 28, "cfg_scale": 1.0, "sample_method": "euler", "scheduler": "discrete",
                                    "width": 1024, "height": 1024, "guidance": 2.5}
    can = capabilities(manifest)
    assert (can.references, can.img2img, can.inpainting, can.guidance) == (1, False, False, True)
    assert t5_length(manifest) == 512


def test_what_tells_kontext_from_dev():
    assert is_kontext({"_class_name": "FluxKontextPipeline"}, "anything")
    assert not is_kontext({"_class_name": "FluxPipeline"}, "flux.1-kontext-dev")  # the class says, not the name
    assert is_kontext({}, "flux.1-kontext-dev") and is_kontext({}, "FLUX1-Kontext-dev-Q4_K_M")
    assert not is_kontext({}, "flux1-dev")


def test_reference_size_is_the_preferred_resolution_nearest_the_aspect_ratio():
    """As FluxKontextPipeline picks it: the aspect of the sides cut to multiples of 16, the nearest of BFL's
    resolutions (ties to the narrower), whatever the input's own size."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(PREFERRED_RESOLUTIONS) == PREFERRED_KONTEXT_RESOLUTIONS
    for width, height in [(64, 64), (100, 70), (96, 64), (2000, 900), (300, 1200), (1023, 1040), (17, 31), (8, 40)]:
        w, h = (max(side // 16 * 16, 16) for side in (width, height))
        _, expected_w, expected_h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        assert reference_size(width, height, 16) == (expected_w, expected_h), (width, height)
    assert reference_size(96, 64, 16) == (1248, 832)
    assert reference_size(64, 64, 24) == (1008, 1008)  # cut to the model's multiple


def test_a_kontext_single_file_is_recognised_by_its_name(tmp_path):
    """BFL's and ComfyUI's files hold dev's tensors: `convert FILE` names the model after the file
    (flux1-kontext-dev, flux1-kontext-dev-q8_0), and the name says Kontext; a name given instead decides."""
    pipe = tiny_flux.make_pipeline(tmp_path / "diffusers", "dev")
    files = {"vae": tmp_path / "ae.safetensors", "clip_l": tmp_path / "clip_l.safetensors",
             "t5xxl": tmp_path / "t5xxl.safetensors"}
    save_file(vae_file_state(pipe.vae), str(files["vae"]))
    save_file(clip_file_state(pipe.text_encoder), str(files["clip_l"]))
    save_file(t5_file_state(pipe.text_encoder_2), str(files["t5xxl"]))
    bfl = bfl_state(pipe.transformer.state_dict(), "model.diffusion_model.")  # ComfyUI's prefix
    state = {k: v.detach().numpy() for k, v in bfl.items()}
    transformers = {"safetensors": write_bfl(pipe.transformer, tmp_path / "flux1-kontext-dev.safetensors"),
                    "gguf": write_gguf(state, tmp_path / "flux1-kontext-dev-Q8_0.gguf", "Q8_0")}
    args = argparse.Namespace(output=None, name=None, model_dir=str(tmp_path / "models"))

    def convert(path, given=None):
        dst, name = destination(args, path, given)
        source = read_flux_files(path, files["vae"], files["clip_l"], files["t5xxl"],
                                 t5_tokenizer=tmp_path / "diffusers" / "tokenizer_2",
                                 axes_dims_rope=list(tiny_flux.AXES), t5_max_distance=20, hints=TINY)
        source = with_tokenizers(source, tmp_path / "diffusers")
        return read_manifest(write_model(source, dst, name=name or dst.name, dtype="float32", progress=False))

    for kind, path in transformers.items():
        manifest = convert(path)
        assert manifest["name"] == path.stem.lower() and "pipeline" not in manifest, kind
        assert capabilities(manifest).references == 1 and manifest["defaults"]["guidance"] == 2.5, kind
    edit = convert(transformers["safetensors"], "edit")  # named otherwise: dev's networks, run as dev
    assert edit["name"] == "edit" and capabilities(edit).references == 0 and edit["defaults"]["guidance"] == 3.5
    assert capabilities(convert(transformers["safetensors"], "my-kontext")).references == 1


KONTEXT_REPO = [  # black-forest-labs/FLUX.1-Kontext-dev's files: FLUX.1-dev's, with its own single file
    name.replace("flux1-dev", "flux1-kontext-dev") for name in FLUX_DEV_REPO if name != "dev_grid.jpg"
] + ["teaser.png"]


def test_pull_takes_the_kontext_diffusers_folder_only():
    """`pull black-forest-labs/FLUX.1-Kontext-dev`: the diffusers folder (whose model_index.json says Kontext),
    not the single files beside it; its name, flux.1-kontext-dev, says Kontext too."""
    from huggingface_hub.utils import filter_repo_objects

    from convert.pull import name_for

    kept = set(filter_repo_objects(KONTEXT_REPO, allow_patterns=ALLOW_PATTERNS))
    assert set(KONTEXT_REPO) - kept == {"README.md", "LICENSE.md", "teaser.png", "ae.safetensors",
                                        "flux1-kontext-dev.safetensors"}
    assert is_kontext({}, name_for("black-forest-labs/FLUX.1-Kontext-dev"))


# --- the transformer with reference tokens --------------------------------------------------------------------

def test_transformer_with_reference_tokens_matches_diffusers(kontext):
    """The denoised tokens followed by a reference image's (another size, ids (1, row, col)), as
    FluxKontextPipeline feeds them: the whole output, reference tokens included, within 1e-4."""
    pipe, ours, _ = kontext
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((2, 8, 10, 16)).astype(np.float32)
    reference = rng.standard_normal((2, 12, 6, 16)).astype(np.float32)
    tokens = np.array(mx.concatenate([pack_latents(mx.array(latents)), pack_latents(mx.array(reference))], axis=1))
    ids = np.array(mx.concatenate([latent_image_ids(8, 10), reference_ids(12, 6)]))
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    vector = rng.standard_normal((2, 32)).astype(np.float32)
    sigma, guidance = np.array([0.9, 0.35], np.float32), np.array([2.5, 4.0], np.float32)
    with torch.no_grad():
        diffusers_ids = pipe._prepare_latent_image_ids(2, 6, 3, "cpu", torch.float32)
        diffusers_ids[..., 0] = 1
        assert np.array_equal(ids[20:], diffusers_ids.numpy())
        expected = pipe.transformer(
            hidden_states=torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(vector), timestep=torch.from_numpy(sigma),
            img_ids=torch.from_numpy(ids), txt_ids=torch.zeros(7, 3), guidance=torch.from_numpy(guidance),
            return_dict=False)[0]
    got = ours.model.components["transformer"](mx.array(tokens), mx.array(context), mx.array(vector),
                                               mx.array(sigma), mx.array(ids), mx.zeros((7, 3)), mx.array(guidance))
    error = max_rel_err(got, expected)
    print(f"Kontext transformer, 20 + 18 reference tokens: max rel err {error:.1e}")
    assert error <= 1e-4


# --- images against FluxKontextPipeline ------------------------------------------------------------------------

def expected_image(pipe, manifest, image, width, height, initial, **options) -> np.ndarray:
    """FluxKontextPipeline at exactly width x height: its `max_area` (which scales a given size to that area,
    keeping the aspect ratio) set to the size's own, so the output size is the engine's business alone."""
    return pipe(image=image, prompt=PROMPT, width=width, height=height, max_area=width * height,
                latents=packed(initial), max_sequence_length=t5_length(manifest), output_type="np", **options).images


@pytest.mark.parametrize(("source", "size"), [((80, 64), None), ((96, 64), (64, 80))],
                         ids=["size-from-the-input", "other-aspect"])
def test_edit_matches_diffusers(kontext, source, size):
    """One input image: an edit without a size (the output takes the input's size here: its aspect at the
    model's area is the endpoint's rule, and the engine is run at the size the job says), and an input of
    another aspect ratio (3:2, its reference 1248x832) for a 64x80 output."""
    pipe, ours, manifest = kontext
    image = input_image(*source)
    fields = {"steps": 3} if size is None else {"steps": 3, "width": size[0], "height": size[1]}
    job = make_job({**manifest, "defaults": {**manifest["defaults"], "width": 80, "height": 64}}, fields,
                   {"image": image})
    assert job.init_image is None and job.reference_images == (image,) and job.guidance == 2.5
    width, height = job.width, job.height
    assert (width, height) == (size or source)
    initial = noise(width, height)
    expected = expected_image(pipe, manifest, image, width, height, initial, num_inference_steps=3,
                              guidance_scale=2.5)
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Kontext edit, {source[0]}x{source[1]} input -> {width}x{height}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_true_cfg_and_several_images_match_diffusers(kontext):
    """True CFG with a negative prompt (the reference tokens in both halves) and n = 2 (each image its own
    noise, the reference shared)."""
    pipe, ours, manifest = kontext
    image = input_image(64, 96, seed=5)
    initial = np.concatenate([noise(64, 64, seed=1), noise(64, 64, seed=2)])
    expected = np.concatenate([
        expected_image(pipe, manifest, image, 64, 64, initial[i:i + 1], num_inference_steps=2,
                       guidance_scale=4.0, negative_prompt=NEGATIVE, true_cfg_scale=3.0) for i in range(2)])
    job = make_job(manifest, {"steps": 2, "width": 64, "height": 64, "n": 2, "cfg_scale": 3.0, "guidance": 4.0,
                              "negative_prompt": NEGATIVE}, {"image": image})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Kontext edit, true CFG 3 + guidance 4, n=2: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_without_an_image_kontext_generates_as_diffusers(kontext):
    """No input image: FluxKontextPipeline runs as FluxPipeline, and so does the engine."""
    pipe, ours, manifest = kontext
    initial = noise(64, 80, seed=4)
    expected = pipe(prompt=PROMPT, width=64, height=80, max_area=64 * 80, latents=packed(initial),
                    num_inference_steps=3, guidance_scale=2.5, max_sequence_length=t5_length(manifest),
                    output_type="np").images
    job = make_job(manifest, {"steps": 3, "width": 64, "height": 80})
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"Kontext without an image: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_an_edit_is_an_instruction_edit(kontext):
    """One input image, read whole: strength, a mask or a second image are refused before the queue."""
    _, _, manifest = kontext
    image = input_image(64, 64)
    for fields, images, param in [({"strength": 0.5}, {"image": image}, "strength"),
                                  ({}, {"image": image, "mask": image.convert("L")}, "mask"),
                                  ({}, {"image": [image, image]}, "image")]:
        with pytest.raises(JobError) as error:
            make_job(manifest, {"width": 64, "height": 64, **fields}, images)
        assert error.value.param == param, (fields, error.value.message)
