"""The diffusers/torch fallback engine on Qwen-Image, loaded from our converted tiny folder.

Against our MLX engine on the same model with identical injected noise, final images within 1/255 mean absolute
difference: txt2img without CFG, with true CFG and a negative prompt (two images) and against the empty negative
prompt (QwenImagePipeline: cfg_scale is its true_cfg_scale), img2img (QwenImageImg2ImgPipeline) and inpainting
(QwenImageInpaintPipeline). Also: the weights come back (Qwen2.5-VL with its vision tower, the transformer bit for
bit; the autoencoder's causal 3D convs as the single-frame 2D convs we keep, their other taps zero) and an edit
model is refused at load.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import test_qwenimage_pipeline as qi
from mlx_sd_server.engine.model_io import MANIFEST
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.torch_engine import TorchPipeline
from test_pipeline import sample_image
from test_qwenimage_pipeline import qwen  # noqa: F401 - a fixture
from test_torch_engine import run
from test_torch_engine_zimage_flux2 import compare

TOLERANCE = 1 / 255


@pytest.fixture(scope="module")
def engines(qwen):  # noqa: F811 - the fixture
    """(our MLX pipeline with the paste-back, the torch engine, our manifest, the diffusers reference pipeline)."""
    pipe, ours, manifest = qwen
    return DiffusionPipeline(ours.model), TorchPipeline.from_folder(ours.model.folder, device="cpu"), manifest, pipe


def test_weights_come_back(engines):
    """Qwen2.5-VL (language model and vision tower; the LM head our format drops is the tied embedding) and the
    transformer bit for bit; the autoencoder's causal 3D convs hold their last temporal tap (all a single frame
    meets) and zeros, its time_convs (never run on one frame) are left as built, all else is exact."""
    from transformers import Qwen2TokenizerFast

    _, fallback, _, pipe = engines
    for name in ("text_encoder", "transformer", "vae"):
        assert type(getattr(fallback.base, name)) is type(getattr(pipe, name)), name
    expected, got = pipe.text_encoder.state_dict(), fallback.base.text_encoder.state_dict()
    assert set(got) == set(expected) and any(k.startswith("model.visual.") for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in expected if not k.startswith("lm_head."))
    assert torch.equal(got["lm_head.weight"], got["model.language_model.embed_tokens.weight"])
    expected, got = pipe.transformer.state_dict(), fallback.base.transformer.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    expected, got = pipe.vae.state_dict(), fallback.base.vae.state_dict()
    assert set(got) == set(expected)
    causal = 0
    for key, value in expected.items():
        if ".time_conv." in key:
            continue
        if value.ndim == 5 and value.shape[2] > 1:  # (O, I, T, H, W)
            causal += 1
            assert torch.equal(got[key][:, :, -1], value[:, :, -1]) and not got[key][:, :, :-1].any(), key
        else:
            assert torch.equal(got[key], value), key
    assert causal > 0
    assert isinstance(fallback.base.tokenizer, Qwen2TokenizerFast)
    assert fallback.base.tokenizer(qi.PROMPT).input_ids == pipe.tokenizer(qi.PROMPT).input_ids


@pytest.mark.parametrize(
    "fields, n",
    [
        ({"steps": 4, "cfg_scale": 1.0}, 1),
        ({"steps": 3, "cfg_scale": 4.0, "negative_prompt": qi.NEGATIVE}, 2),
        ({"steps": 3, "cfg_scale": 3.0}, 1),  # true CFG against "", as both engines run it without a negative prompt
    ],
    ids=["no-cfg", "cfg-negative-n2", "cfg-empty-negative"],
)
def test_txt2img_agrees_with_mlx(engines, fields, n):
    ours, fallback, manifest, _ = engines
    job = qi.make_job(manifest, {**fields, "n": n})
    diff = compare(ours, fallback, job, qi.noise(n=n, seed=1))
    print(f"torch engine vs MLX, Qwen-Image txt2img {fields} n={n}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_img2img_agrees_with_mlx(engines):
    """6 steps at strength 0.6: both engines run 4 (the flow pipelines' rule), from the same noised image."""
    ours, fallback, manifest, _ = engines
    job = qi.make_job(
        manifest,
        {"steps": 6, "strength": 0.6, "cfg_scale": 1.0},
        {"image": sample_image().resize((qi.WIDTH, qi.HEIGHT))},
    )
    assert fallback.total_steps(job) == 4
    diff = compare(ours, fallback, job, qi.noise(seed=2), (qi.IMG2IMG,))
    print(f"torch engine vs MLX, Qwen-Image img2img strength 0.6: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_inpainting_agrees_with_mlx_and_keeps_the_unmasked_pixels(engines):
    """A mask off the 8-pixel grid (both engines bring it to the latents by nearest neighbour)."""
    from PIL import Image

    ours, fallback, manifest, _ = engines
    image = sample_image().resize((qi.WIDTH, qi.HEIGHT))
    edges = np.zeros((qi.HEIGHT, qi.WIDTH), np.uint8)
    edges[13:45, 5:43] = 255
    job = qi.make_job(
        manifest,
        {"steps": 4, "strength": 0.75, "cfg_scale": 3.0, "negative_prompt": qi.NEGATIVE},
        {"image": image, "mask": Image.fromarray(edges)},
    )
    diff = compare(ours, fallback, job, qi.noise(seed=3), (qi.INPAINT,))
    print(f"torch engine vs MLX, Qwen-Image inpainting strength 0.75, true CFG 3: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    _, result = run(fallback, job)
    outside = np.ones((qi.HEIGHT, qi.WIDTH), bool)
    outside[4:56, 0:52] = False  # clear of the mask and its feathered edge
    assert np.array_equal(np.asarray(result[0])[outside], np.asarray(image)[outside])


def test_an_edit_model_is_refused_at_load(engines, tmp_path):
    ours, _, manifest, _ = engines
    folder = tmp_path / "qwen-image-edit-tiny"
    shutil.copytree(ours.model.folder, folder)
    edited = {**manifest, "pipeline": {**manifest.get("pipeline", {}), "_class_name": "QwenImageEditPlusPipeline"}}
    (folder / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="does not run the Qwen-Image edit models"):
        TorchPipeline.from_folder(folder, device="cpu")
