"""FLUX.1 Fill (dev): mask edits by the model made for them, against diffusers' FluxFillPipeline.

A tiny random Fill pipeline (tiny_flux's dev components, its transformer 384 channels in and 64 out) is
converted and run with identical injected noise: final images within 1/255 mean absolute difference at two
sizes (one not square), at FluxFillPipeline's defaults (guidance 30, strength 1) and at strength 0.75, with a
mask that does not follow the 8-pixel latent grid (Fill reads the mask at full resolution). The inputs Fill
reads beside the latents, packed, against diffusers' prepare_mask_latents; the transformer against diffusers'
within 1e-4. Recognition: a diffusers folder and a single file (safetensors, GGUF) by the transformer's
shapes, whatever their names; `pull`'s file patterns. What a Fill model declares, and a served one over HTTP:
an edit with a mask works, one without (or a text-to-image request) is a 400 that says a mask is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import tiny_flux
import torch
from api_server import live_server, multipart, request
from bfl_layout import bfl_state, write_bfl
from gguf_layout import write_gguf
from ldm_layout import with_tokenizers
from parity import max_rel_err
from PIL import Image
from safetensors.numpy import save_file
from test_flux_convert import FLUX_DEV_REPO
from test_flux_files import TINY, clip_file_state, read_flux_files, t5_file_state, vae_file_state
from test_pipeline import ReplayNoise, diffusers_noise, mean_abs_diff, ours_image, posterior_mode, sample_image

from convert.cli import destination
from convert.model import convert_model, write_model
from convert.pull import ALLOW_PATTERNS
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.flux.fill import fill_channels, is_fill
from mlx_sd_server.engine.families.flux.single_file import flux_transformer_config
from mlx_sd_server.engine.families.flux.spec import SPEC as FLUX
from mlx_sd_server.engine.families.flux.transformer import latent_image_ids, pack_latents
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import JobError, ModelDefaults, build_job
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore

PROMPT = "a photo of a cat"
TOLERANCE = 1 / 255
FILL_MODULE = "diffusers.pipelines.flux.pipeline_flux_fill"
MASKED_IMAGE_WEIGHT = 10.0
FILL_DEFAULTS = {"steps": 50, "cfg_scale": 1.0, "sample_method": "euler", "scheduler": "discrete", "width": 1024,
                 "height": 1024, "guidance": 30.0, "strength": 1.0}  # FluxFillPipeline's


def fill_transformer():
    """tiny_flux's dev transformer with Fill's input: the latents (64), the masked image's latents (64) and the
    8x8-folded mask (256), packed: 384 channels in, 64 out."""
    from diffusers import FluxTransformer2DModel

    model = tiny_flux.randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=tiny_flux.AXES,
    ), seed=11, scale=0.2)
    with torch.no_grad():  # the tiny autoencoder's latents are small: weigh the masked image's so that they show
        model.x_embedder.weight[:, 64:128] *= MASKED_IMAGE_WEIGHT
    return model


def fill_pipeline(dst):
    """tiny_flux's dev components with Fill's transformer, as a FluxFillPipeline saved as a diffusers folder at
    `dst`; returns the pipeline."""
    from diffusers import FluxFillPipeline

    src = dst.parent / f"{dst.name}-flux"
    dev = tiny_flux.make_pipeline(src, "dev")
    parts = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    pipe = FluxFillPipeline(**{name: dev.components[name] for name in parts}, transformer=fill_transformer())
    pipe.save_pretrained(str(dst), safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):  # the tokenizer files as make_pipeline keeps them
        shutil.copytree(src / folder, dst / folder, dirs_exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    """(diffusers' FluxFillPipeline, our pipeline, our manifest, the diffusers folder), converted into a model
    whose name does not say Fill: the transformer's shapes do."""
    root = tmp_path_factory.mktemp("fill")
    pipe = fill_pipeline(root / "diffusers")
    dst = convert_model(root / "diffusers", root / "model", dtype="float32", progress=False)
    return pipe, DiffusionPipeline(load_model(dst, dtype="float32"), paste_back=False), read_manifest(dst), root


def make_job(manifest: dict, fields: dict, images: dict | None = None):
    return build_job({"prompt": PROMPT, "sample_method": "euler", **fields}, images,
                     defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest))


def t5_length(manifest: dict) -> int:
    return manifest["components"]["text_encoder_2"]["max_length"]


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, height // 8, width // 8)).astype(np.float32)


def input_image(width: int, height: int) -> Image.Image:
    return sample_image().resize((width, height), Image.Resampling.BILINEAR)


def off_grid_mask(width: int, height: int) -> Image.Image:
    """A rectangle whose edges cut through 8x8 blocks: Fill reads every pixel of the mask, not a pooled grid."""
    mask = np.zeros((height, width), np.uint8)
    mask[9 : height - 13, 5 : width - 19] = 255
    return Image.fromarray(mask)


# --- recognition and capabilities ----------------------------------------------------------------------------

def test_a_fill_folder_is_recognised_by_its_transformer(fill):
    _, _, manifest, _ = fill
    config = manifest["components"]["transformer"]["config"]
    assert manifest["name"] == "model" and (config["in_channels"], config["out_channels"]) == (384, 64)
    assert manifest["defaults"] == FILL_DEFAULTS and t5_length(manifest) == 512
    can = capabilities(manifest)
    assert (can.mask_required, can.inpainting, can.img2img, can.references, can.guidance) == (True, True, False, 0,
                                                                                              True)


def test_the_torch_engine_refuses_fill_at_load(fill):
    from mlx_sd_server.torch_engine import TorchPipeline

    *_, root = fill
    with pytest.raises(ValueError, match="does not run FLUX.1 Fill"):
        TorchPipeline.from_folder(root / "model")


def test_what_tells_fill_from_dev():
    assert is_fill({"in_channels": 384, "out_channels": 64})
    assert not is_fill({"in_channels": 64, "out_channels": None}) and not is_fill({"in_channels": 64})
    assert not is_fill({"in_channels": 64, "out_channels": 64}) and not is_fill({})


def test_a_fill_single_file_is_recognised_by_its_shapes(fill, tmp_path):
    """BFL's flux1-fill-dev.safetensors and a GGUF of it: `img_in.weight` 384 wide (any file name) is Fill."""
    pipe, _, _, root = fill
    files = {"vae": tmp_path / "ae.safetensors", "clip_l": tmp_path / "clip_l.safetensors",
             "t5xxl": tmp_path / "t5xxl.safetensors"}
    save_file(vae_file_state(pipe.vae), str(files["vae"]))
    save_file(clip_file_state(pipe.text_encoder), str(files["clip_l"]))
    save_file(t5_file_state(pipe.text_encoder_2), str(files["t5xxl"]))
    state = {k: v.detach().numpy()
             for k, v in bfl_state(pipe.transformer.state_dict(), "model.diffusion_model.").items()}
    assert state["model.diffusion_model.img_in.weight"].shape == (32, 384)
    transformers = {"safetensors": write_bfl(pipe.transformer, tmp_path / "flux1-fill-dev.safetensors"),
                    "gguf": write_gguf(state, tmp_path / "some-inpainter-Q8_0.gguf", "Q8_0")}
    args = argparse.Namespace(output=None, name=None, model_dir=str(tmp_path / "models"))
    for kind, path in transformers.items():
        dst, name = destination(args, path, None)
        source = read_flux_files(path, files["vae"], files["clip_l"], files["t5xxl"],
                                 t5_tokenizer=root / "diffusers" / "tokenizer_2", axes_dims_rope=list(tiny_flux.AXES),
                                 t5_max_distance=20, hints=TINY)
        source = with_tokenizers(source, root / "diffusers")
        manifest = read_manifest(write_model(source, dst, name=name, dtype="float32", progress=False))
        config = manifest["components"]["transformer"]["config"]
        assert (config["in_channels"], config["out_channels"]) == (384, 64), kind
        assert manifest["defaults"] == FILL_DEFAULTS and capabilities(manifest).mask_required, kind
        assert manifest["scheduler"]["use_dynamic_shifting"] and manifest["scheduler"]["shift"] == 3.0, kind


def test_real_size_fill_config_from_shapes():
    """FLUX.1-Fill-dev's transformer (meta tensors: no memory): its shapes give the released config (384 in,
    64 out), which is Fill's variant, with FluxFillPipeline's defaults."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(in_channels=384, out_channels=64, guidance_embeds=True)  # else FLUX.1's
    config = flux_transformer_config(bfl_state(model.state_dict(), "model.diffusion_model."))
    assert {key: config[key] for key in ("in_channels", "out_channels", "guidance_embeds", "num_layers")} == {
        "in_channels": 384, "out_channels": 64, "guidance_embeds": True, "num_layers": 19}
    variant = FLUX.variant_of("flux", "flow", {"transformer": config}, "anything")
    assert variant.name == "fill" and dataclasses.asdict(variant.defaults) == FILL_DEFAULTS


FILL_REPO = [  # black-forest-labs/FLUX.1-Fill-dev's files: FLUX.1-dev's, with its own single file
    name.replace("flux1-dev", "flux1-fill-dev") for name in FLUX_DEV_REPO if name != "dev_grid.jpg"
]


def test_pull_takes_the_fill_diffusers_folder_only():
    """`pull black-forest-labs/FLUX.1-Fill-dev`: the diffusers folder, not the single files beside it."""
    from huggingface_hub.utils import filter_repo_objects

    kept = set(filter_repo_objects(FILL_REPO, allow_patterns=ALLOW_PATTERNS))
    assert set(FILL_REPO) - kept == {"README.md", "LICENSE.md", "ae.safetensors", "flux1-fill-dev.safetensors"}


def test_a_fill_request_needs_an_image_and_a_mask(fill):
    _, _, manifest, _ = fill
    image = input_image(64, 64)
    for images, missing in (({}, "image"), ({"image": image}, "mask")):
        with pytest.raises(JobError) as error:
            make_job(manifest, {}, images)
        assert (error.value.param, error.value.code) == (missing, "missing_required_parameter")
        assert "only inpaints" in error.value.message and "mask" in error.value.message
    job = make_job(manifest, {}, {"image": image, "mask": off_grid_mask(64, 64)})
    assert (job.strength, job.guidance, job.steps) == (1.0, 30.0, 50)
    assert make_job(manifest, {"strength": 0.6}, {"image": image, "mask": off_grid_mask(64, 64)}).strength == 0.6


# --- numerics -------------------------------------------------------------------------------------------------

def test_fill_inputs_are_prepare_mask_latents(fill):
    """The masked image's latents and the folded mask, packed, are FluxFillPipeline's masked_image_latents."""
    pipe, _, _, _ = fill
    width, height = 80, 48
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((1, 16, height // 8, width // 8)).astype(np.float32)
    mask = np.asarray(off_grid_mask(width, height)) >= 128
    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    with torch.no_grad():  # latents given as the masked image: diffusers applies the shift and scale to them
        mask_tokens, image_tokens = pipe.prepare_mask_latents(
            torch.from_numpy(mask[None, None].astype(np.float32)), torch.from_numpy(latents / scale + shift), 1, 16,
            1, height, width, torch.float32, "cpu", None)
    expected = torch.cat((image_tokens, mask_tokens), dim=-1).numpy()
    ours = np.array(pack_latents(fill_channels(mask, mx.array(latents.transpose(0, 2, 3, 1)), 8)))
    assert ours.shape == expected.shape == (1, 3 * 5, 4 * (16 + 64))
    np.testing.assert_array_equal(ours[..., 64:], expected[..., 64:])  # the mask: exactly
    error = float(np.abs(ours - expected).max())
    print(f"Fill inputs against prepare_mask_latents: max abs err {error:.1e}")
    assert error <= 1e-5


@contextlib.contextmanager
def correctly_rounded_exp():
    """torch's float32 exp rounded correctly (computed in float64), as our sinusoids' frequencies are: torch's
    CPU exp is not (on x86 with AVX-512, 3 of the 128 frequencies are a step off), which at Fill's guidance 30,
    x 1000, moves those angles by up to 9e-4 rad: 2e-4 relative at the transformer's output."""
    exp = torch.exp

    def rounded(x, *args, **kwargs):
        if x.dtype == torch.float32 and not args and not kwargs:
            return exp(x.double()).to(x.dtype)
        return exp(x, *args, **kwargs)

    torch.exp = rounded
    try:
        yield
    finally:
        torch.exp = exp


@pytest.mark.parametrize("guidance", [(30.0, 4.0), (3.5, 4.0)])
def test_transformer_with_fill_inputs_matches_diffusers(fill, guidance):
    """384 channels in, 64 out, against diffusers within 1e-4: at guidance 30 with the reference's float32 exp
    rounded correctly (correctly_rounded_exp says why), at dev's guidance as it is."""
    pipe, ours, _, _ = fill
    rng = np.random.default_rng(7)
    tokens = rng.standard_normal((2, 20, 384)).astype(np.float32)
    tokens[..., 128:] = rng.random((2, 20, 256)) < 0.5  # the mask's channels: 0 or 1
    ids = np.array(latent_image_ids(8, 10))
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    vector = rng.standard_normal((2, 32)).astype(np.float32)
    sigma = np.array([0.9, 0.35], np.float32)

    def reference() -> torch.Tensor:
        with torch.no_grad():
            return pipe.transformer(
                hidden_states=torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(context),
                pooled_projections=torch.from_numpy(vector), timestep=torch.from_numpy(sigma),
                img_ids=torch.from_numpy(ids), txt_ids=torch.zeros(7, 3),
                guidance=torch.tensor(guidance, dtype=torch.float32), return_dict=False)[0]

    got = ours.model.components["transformer"](mx.array(tokens), mx.array(context), mx.array(vector),
                                               mx.array(sigma), mx.array(ids), mx.zeros((7, 3)), mx.array(guidance))
    assert got.shape == (2, 20, 64)
    as_is = max_rel_err(got, reference())
    with correctly_rounded_exp():
        rounded = max_rel_err(got, reference())
    print(f"Fill transformer, 384 channels in, guidance {guidance}: max rel err {as_is:.1e} "
          f"({rounded:.1e} against the reference with its exp rounded correctly)")
    assert rounded <= 1e-4 and (guidance[0] == 30.0 or as_is <= 1e-4)


@pytest.mark.parametrize("width, height, strength", [(80, 64, None), (64, 64, None), (80, 64, 0.75)])
def test_fill_matches_diffusers(fill, width, height, strength):
    """At the model's defaults (guidance 30, strength 1: from pure noise) and at strength 0.75 (the input image
    noised to where the schedule starts, as FluxFillPipeline does)."""
    pipe, ours, manifest, _ = fill
    initial = noise(width, height, seed=width + height)
    image, mask = input_image(width, height), off_grid_mask(width, height)
    with posterior_mode(FILL_MODULE), diffusers_noise([initial], FILL_MODULE):
        expected = pipe(PROMPT, image=image, mask_image=mask, height=height, width=width,
                        strength=1.0 if strength is None else strength, num_inference_steps=4, guidance_scale=30.0,
                        max_sequence_length=t5_length(manifest), output_type="np").images
    fields = {"steps": 4, "width": width, "height": height} | ({} if strength is None else {"strength": strength})
    job = make_job(manifest, fields, {"image": image, "mask": mask})
    assert job.guidance == 30.0 and job.strength == (1.0 if strength is None else strength)
    diff = mean_abs_diff(ours_image(ours, job, ReplayNoise(initial, [])), expected)
    print(f"FLUX Fill {width}x{height} strength {job.strength}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_the_mask_and_the_masked_image_change_the_image(fill):
    """Fill reads its inputs: another mask gives another image (no paste-back here), as does another image."""
    _, ours, manifest, _ = fill
    image, mask = input_image(64, 64), off_grid_mask(64, 64)

    def run(images: dict) -> np.ndarray:
        return ours_image(ours, make_job(manifest, {"steps": 2, "width": 64, "height": 64}, images),
                          ReplayNoise(noise(64, 64), []))

    base = run({"image": image, "mask": mask})
    other_mask = run({"image": image, "mask": Image.fromarray(255 - np.asarray(mask))})
    other_image = run({"image": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "mask": mask})
    assert np.abs(base - other_mask).mean() > 2 / 255 and np.abs(base - other_image).mean() > 2 / 255


# --- over HTTP ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(fill):
    _, _, _, root = fill
    convert_model(root / "diffusers", root / "models" / "flux-fill-tiny", dtype="float32", progress=False)
    registry = ModelRegistry(["flux-fill-tiny"], root / "models")
    with live_server(create_app(registry, FileStore(root / "files"), Settings())) as url:
        yield url


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def edit(url: str, **files: bytes):
    fields = {"model": "flux-fill-tiny", "prompt": "a cat", "steps": "2", "size": "64x64",
              "response_format": "b64_json"}
    body, content_type = multipart({**fields, **{name: (f"{name}.png", data) for name, data in files.items()}})
    return request(url, "POST", "/v1/images/edits", body, {"Content-Type": content_type})


def test_fill_edits_with_a_mask_over_http(server):
    reply = edit(server, image=png(input_image(64, 64)), mask=png(off_grid_mask(64, 64)))
    assert reply.status == 200, reply.body
    assert len(reply.json()["data"]) == 1
    models = request(server, "GET", "/v1/models").json()["data"]
    listed = next(m for m in models if m["id"] == "flux-fill-tiny")
    assert (listed["inpainting"], listed["img2img"], listed["references"]) == (True, False, 0)


def test_fill_without_a_mask_is_a_400_over_http(server):
    reply = edit(server, image=png(input_image(64, 64)))  # opaque: no transparency to read as a mask
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == ("mask", "missing_required_parameter") and "mask" in error["message"]
    reply = request(server, "POST", "/v1/images/generations",
                    json.dumps({"model": "flux-fill-tiny", "prompt": "a cat", "steps": 1}).encode(),
                    {"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["param"] == "image" and "only inpaints" in reply.json()["error"]["message"]
