"""The diffusers/torch fallback engine on Z-Image and FLUX.2 klein, loaded from our converted tiny folders.

Against our MLX engine on the same model with identical injected noise, final images within 1/255 mean absolute
difference: Z-Image's txt2img (Turbo's no-CFG default, CFG with a negative prompt and two images, the karras
schedule, lcm), img2img and inpainting (ZImage*Pipeline: their guidance_scale is cfg_scale - 1); klein's
txt2img (distilled, base with CFG and a negative prompt, lcm), instruction edits with two reference images
(Flux2KleinPipeline's `image`) and inpainting with and without an `image_reference`
(Flux2KleinInpaintPipeline). Also: the weights come back bit for bit (Qwen3 as the manifest names it, the
FLUX.2 autoencoder's batch-norm statistics), the registry and HTTP serve both, and what the torch engine cannot
do is a 400 before a step runs (klein's inpainting with two reference images, its img2img, strength 0, samplers
diffusers lacks) or a refusal at load (a quantized conversion).
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import test_flux2_pipeline as kl
import test_zimage_pipeline as zi
from api_server import live_server, request
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.engine.families.spec import Capabilities
from mlx_sd_server.engine.model_io import MANIFEST
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import JobError
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore
from mlx_sd_server.torch_engine import TorchPipeline
from test_api_edits_multi import post_parts
from test_flux2_pipeline import klein  # noqa: F401 - a fixture
from test_flux2_references import INPAINT_MODULE, TWO, ellipse_mask, picture
from test_pipeline import (
    ReplayNoise, diffusers_noise, mean_abs_diff, ours_image, posterior_mode, sample_image, sample_mask,
)
from test_torch_engine import run
from test_zimage_pipeline import zimage  # noqa: F401 - a fixture

FLOW_SCHEDULER = "diffusers.schedulers.scheduling_flow_match_euler_discrete"
TOLERANCE = 1 / 255


@pytest.fixture(scope="module")
def zimage_engines(zimage):  # noqa: F811 - the fixture
    """(our MLX pipeline, the torch engine, our manifest, the diffusers reference pipeline) of a tiny Z-Image."""
    pipe, ours, manifest, folder = zimage
    return ours, TorchPipeline.from_folder(folder, device="cpu"), manifest, pipe


@pytest.fixture(scope="module")
def klein_engines(klein):  # noqa: F811 - the fixture
    """"distilled" | "base" -> (our MLX pipeline, the torch engine, our manifest, the diffusers reference)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            pipe, ours, manifest = klein(variant)
            cache[variant] = (ours, TorchPipeline.from_folder(ours.model.folder, device="cpu"), manifest, pipe)
        return cache[variant]

    return get


def compare(ours, fallback, job, initial: np.ndarray, modules: tuple[str, ...] = (), steps: list | None = None,
            diffusers_steps: list | None = None) -> float:
    """Mean abs difference of the two engines' images for one job, from the same noise: `initial` the starting
    latents (drawn inside diffusers' `modules` for an edit, which encode images to their posterior mean, as we
    do), `steps` lcm's step noise (as diffusers' scheduler draws it: `diffusers_steps`)."""
    assert fallback.total_steps(job) == ours.total_steps(job)
    expected = ours_image(ours, job, ReplayNoise(initial, steps or []))
    with posterior_mode(*modules), diffusers_noise([initial], *modules), \
            diffusers_noise(diffusers_steps or [], FLOW_SCHEDULER):
        got = ours_image(fallback, job, ReplayNoise(initial, []))
    return mean_abs_diff(got, expected)


def pasting(ours) -> DiffusionPipeline:
    """The fixtures' MLX pipelines leave the paste-back out; inpainting on both engines pastes the unmasked pixels."""
    return DiffusionPipeline(ours.model)


def tokens(latents: np.ndarray) -> np.ndarray:
    """klein's NCHW latents as the tokens its scheduler draws step noise for: (B, h * w, 128), row-major."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(0, 2, 1).copy()


# --- the models, as diffusers has them -------------------------------------------------------------------------


def test_weights_come_back_exactly(zimage_engines, klein_engines):
    """Each module the class the manifest names (Z-Image's Qwen3Model, klein's Qwen3ForCausalLM, its LM head the
    tied embedding) and equal to the reference pipeline's, bit for bit: the FLUX.2 autoencoder's batch-norm
    statistics included. The tokenizers are Qwen2TokenizerFast, as the pipelines load them, with the chat
    template."""
    from transformers import Qwen2TokenizerFast

    for _, fallback, _, pipe in (zimage_engines, klein_engines("distilled")):
        for name in ("text_encoder", "transformer", "vae"):
            expected, got = getattr(pipe, name), getattr(fallback.base, name)
            assert type(got) is type(expected), name
            expected, got = expected.state_dict(), got.state_dict()
            assert set(got) == set(expected), name
            assert all(torch.equal(got[k], expected[k]) for k in expected), name
        assert isinstance(fallback.base.tokenizer, Qwen2TokenizerFast)
        text = [{"role": "user", "content": zi.PROMPT}]
        assert (fallback.base.tokenizer.apply_chat_template(text, tokenize=False)
                == pipe.tokenizer.apply_chat_template(text, tokenize=False))
    klein_text = klein_engines("distilled")[1].base.text_encoder
    assert type(klein_text).__name__ == "Qwen3ForCausalLM"
    assert klein_text.lm_head.weight is klein_text.model.embed_tokens.weight
    assert torch.equal(klein_text.state_dict()["lm_head.weight"], klein_text.state_dict()["model.embed_tokens.weight"])
    bn = klein_engines("distilled")[1].base.vae.bn
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))  # the tiny model's, not the default


# --- Z-Image ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, n", [
    ({"steps": 4}, 1),  # the Turbo default: cfg_scale 1, no CFG (guidance_scale 0)
    ({"steps": 3, "cfg_scale": 4.0, "negative_prompt": zi.NEGATIVE}, 2),  # guidance_scale 3
    ({"steps": 3, "cfg_scale": 3.0}, 1),  # CFG against the empty negative prompt
    ({"steps": 3, "scheduler": "karras"}, 1),
], ids=["turbo", "cfg-negative-n2", "cfg-empty-negative", "karras"])
def test_zimage_txt2img_agrees_with_mlx(zimage_engines, fields, n):
    ours, fallback, manifest, _ = zimage_engines
    job = zi.make_job(manifest, {**fields, "n": n})
    diff = compare(ours, fallback, job, zi.noise(n=n, seed=1))
    print(f"torch engine vs MLX, Z-Image txt2img {fields} n={n}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_zimage_lcm_agrees_with_mlx(zimage_engines):
    """lcm: FlowMatchEulerDiscreteScheduler's stochastic sampling with the same step noise (diffusers draws it
    once more after the last step)."""
    ours, fallback, manifest, _ = zimage_engines
    steps = [zi.noise(seed=10 + i) for i in range(3)]
    job = zi.make_job(manifest, {"steps": 3, "sample_method": "lcm"})
    diff = compare(ours, fallback, job, zi.noise(seed=3), steps=steps, diffusers_steps=steps + steps[:1])
    print(f"torch engine vs MLX, Z-Image lcm: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_zimage_img2img_agrees_with_mlx(zimage_engines):
    """6 steps at strength 0.6: both engines run 4 (the flow pipelines' rule), from the same noised image."""
    ours, fallback, manifest, _ = zimage_engines
    job = zi.make_job(manifest, {"steps": 6, "strength": 0.6}, {"image": sample_image().resize((zi.WIDTH, zi.HEIGHT))})
    assert fallback.total_steps(job) == 4
    diff = compare(ours, fallback, job, zi.noise(seed=4), (zi.IMG2IMG,))
    print(f"torch engine vs MLX, Z-Image img2img strength 0.6: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_zimage_inpainting_agrees_with_mlx_and_keeps_the_unmasked_pixels(zimage_engines):
    """The mask aligned to the 8-pixel latent grid, where diffusers' nearest downsampling and our max-pool agree."""
    ours, fallback, manifest, _ = zimage_engines
    image, mask = picture(zi.WIDTH, zi.HEIGHT, seed=5), sample_mask().crop((0, 0, zi.WIDTH, zi.HEIGHT))
    job = zi.make_job(manifest, {"steps": 4, "strength": 0.75, "cfg_scale": 3.0, "negative_prompt": zi.NEGATIVE},
                      {"image": image, "mask": mask})
    diff = compare(pasting(ours), fallback, job, zi.noise(seed=6), (zi.INPAINT,))
    print(f"torch engine vs MLX, Z-Image inpainting strength 0.75, cfg_scale 3: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    _, result = run(fallback, job)
    outside = np.ones((zi.HEIGHT, zi.WIDTH), bool)
    outside[4:60, 0:52] = False  # clear of the mask (16:48, 8:40) and its feathered edge
    assert np.array_equal(np.asarray(result[0])[outside], np.asarray(image)[outside])


# --- FLUX.2 klein ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, fields", [
    ("distilled", {}),  # the manifest's 4 steps, no CFG
    ("distilled", {"cfg_scale": 4.0, "negative_prompt": "a dog"}),  # ignored by a distilled model, on both
    ("base", {"steps": 5}),  # CFG 4 against ""
    ("base", {"steps": 5, "cfg_scale": 3.0, "negative_prompt": "a dog"}),  # klein's negative_prompt_embeds
], ids=["distilled", "distilled-cfg-ignored", "base-cfg", "base-cfg-negative"])
def test_klein_txt2img_agrees_with_mlx(klein_engines, variant, fields):
    ours, fallback, manifest, _ = klein_engines(variant)
    assert fallback.settings == {"is_distilled": variant == "distilled"}
    job = kl.make_job(manifest, {"width": kl.WIDTH, "height": kl.HEIGHT, **fields})
    diff = compare(ours, fallback, job, kl.noise(kl.WIDTH, kl.HEIGHT, seed=1))
    print(f"torch engine vs MLX, FLUX.2 klein {variant} txt2img {fields}: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_klein_negative_prompt_reaches_the_base_model(klein_engines):
    """Flux2KleinPipeline has no negative_prompt: the engine hands it the negative's embeddings, which matter."""
    _, fallback, manifest, _ = klein_engines("base")
    initial = kl.noise(kl.WIDTH, kl.HEIGHT, seed=2)
    plain, negative = (ours_image(fallback, kl.make_job(manifest, {"width": kl.WIDTH, "height": kl.HEIGHT,
                                                                   "steps": 3, **f}), ReplayNoise(initial, []))
                       for f in ({}, {"negative_prompt": "a dog"}))
    assert mean_abs_diff(plain, negative) > 4 * TOLERANCE


def test_klein_lcm_agrees_with_mlx(klein_engines):
    ours, fallback, manifest, _ = klein_engines("distilled")
    steps = [kl.noise(kl.WIDTH, kl.HEIGHT, seed=20 + i) for i in range(3)]
    job = kl.make_job(manifest, {"width": kl.WIDTH, "height": kl.HEIGHT, "steps": 3, "sample_method": "lcm"})
    diff = compare(ours, fallback, job, kl.noise(kl.WIDTH, kl.HEIGHT, seed=3), steps=steps,
                   diffusers_steps=[tokens(s) for s in steps + steps[:1]])
    print(f"torch engine vs MLX, FLUX.2 klein lcm: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_lcm_step_noise_follows_the_seeds(klein_engines):
    """diffusers' flow pipelines step without the job's generators; the engine hands them over, so lcm's
    re-noising is the seed's: the same seed gives the same image, and image i of a batch is its own seed's."""
    _, fallback, manifest, _ = klein_engines("distilled")

    def images(n: int, seed: int) -> np.ndarray:
        job = kl.make_job(manifest, {"width": kl.WIDTH, "height": kl.HEIGHT, "steps": 3, "sample_method": "lcm",
                                     "n": n, "seed": seed})
        return ours_image(fallback, job, None)

    batch = images(2, 7)
    alone = mean_abs_diff(batch[1:], images(1, 8))  # (a batch sums in another order: not bit-exact)
    print(f"torch engine lcm, image 2 of a batch against its seed alone: mean abs diff {alone:.2e}")
    assert np.array_equal(batch, images(2, 7)) and alone <= TOLERANCE < mean_abs_diff(batch[:1], batch[1:])


@pytest.mark.parametrize("variant", ["distilled", "base"])
def test_klein_instruction_edit_agrees_with_mlx(klein_engines, variant):
    """Two reference images of other sizes and aspects than the output (Flux2KleinPipeline's `image`)."""
    ours, fallback, manifest, _ = klein_engines(variant)
    references = [picture(w, h, seed=30 + i) for i, (w, h) in enumerate(TWO)]
    job = kl.make_job(manifest, {"width": kl.WIDTH, "height": kl.HEIGHT, "steps": 4}, {"image": references})
    assert job.reference_images == tuple(references)
    diff = compare(ours, fallback, job, kl.noise(kl.WIDTH, kl.HEIGHT, seed=4))
    print(f"torch engine vs MLX, FLUX.2 klein {variant}, 2 reference images: mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("with_reference", [False, True], ids=["source", "image_reference"])
def test_klein_inpainting_agrees_with_mlx(klein_engines, with_reference):
    """Flux2KleinInpaintPipeline: the source noised and blended back outside a bilinear mask, and read as the first
    reference, the request's other image (`image_reference`) after it; the unmasked pixels pasted back."""
    ours, fallback, manifest, _ = klein_engines("distilled")
    source, mask = picture(kl.WIDTH, kl.HEIGHT, seed=6), ellipse_mask(kl.WIDTH, kl.HEIGHT)
    images = [source, picture(90, 120, seed=7)] if with_reference else source
    job = kl.make_job(manifest, {"width": kl.WIDTH, "height": kl.HEIGHT, "strength": 0.75},
                      {"image": images, "mask": mask})
    assert fallback.total_steps(job) == 3
    diff = compare(pasting(ours), fallback, job, kl.noise(kl.WIDTH, kl.HEIGHT, seed=8), (INPAINT_MODULE,))
    print(f"torch engine vs MLX, FLUX.2 klein inpainting ({'with' if with_reference else 'no'} image_reference): "
          f"mean abs diff {diff:.2e}")
    assert diff <= TOLERANCE


# --- what the torch engine refuses -----------------------------------------------------------------------------


def test_what_the_pipelines_cannot_take_is_a_400_before_a_step(klein_engines, zimage_engines):
    """klein's inpainting takes one `image_reference` (a list of them is encoded as one batch its ids cannot
    place): two are refused, where the MLX engine runs them; diffusers has no klein img2img pipeline; strength 0
    leaves diffusers' flow pipelines no step."""
    ours, fallback, manifest, _ = klein_engines("distilled")
    images = [picture(kl.WIDTH, kl.HEIGHT, seed=i) for i in range(3)]
    size = {"width": kl.WIDTH, "height": kl.HEIGHT, "steps": 2}
    two_references = kl.make_job(manifest, size, {"image": images, "mask": ellipse_mask(kl.WIDTH, kl.HEIGHT)})
    assert len(two_references.reference_images) == 2 and ours.total_steps(two_references) > 0  # (MLX runs it)
    img2img = kl.make_job(manifest, {**size, "strength": 0.5}, {"image": images[0]},
                          caps=Capabilities(family="flux2"))  # (klein's capabilities refuse it earlier)
    _, zimage_fallback, zimage_manifest, _ = zimage_engines
    no_step = zi.make_job(zimage_manifest, {"steps": 4, "strength": 0.0}, {"image": sample_image()})
    for engine, job, param, says in [
        (fallback, two_references, "image", "Flux2KleinInpaintPipeline takes one reference image"),
        (fallback, img2img, "image", "diffusers has no Flux2KleinImg2ImgPipeline"),
        (zimage_fallback, no_step, "strength", "leaves no step"),
    ]:
        with pytest.raises(JobError) as error:
            engine.total_steps(job)  # (the worker counts a job's steps before running it)
        assert (error.value.param, error.value.status) == (param, 400) and says in error.value.message
        if param == "image":
            with pytest.raises(JobError):
                next(engine.generate(job))


def test_a_quantized_conversion_is_refused(zimage, tmp_path):  # noqa: F811 - the fixture
    folder = tmp_path / "z-image-q4"
    shutil.copytree(zimage[3], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "quantization": {"bits": 4, "group_size": 64}}))
    with pytest.raises(ValueError, match="quantized; the torch engine needs an unquantized conversion"):
        TorchPipeline.from_folder(folder, device="cpu")


# --- served ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_registry_serves_on_the_torch_engine(zimage_engines, klein_engines, tmp_path, family):
    """Each step in our latent layout (klein's: its tokens as 128 channels at 1/16), sigmas falling in (0, 1]."""
    ours, _, manifest, _ = zimage_engines if family == "zimage" else klein_engines("distilled")
    make_job, width, height = (zi.make_job, zi.WIDTH, zi.HEIGHT) if family == "zimage" else (kl.make_job, kl.WIDTH,
                                                                                            kl.HEIGHT)
    registry = ModelRegistry([str(ours.model.folder)], tmp_path, engine="torch")
    pipeline = registry.pipeline()
    expected_class = {"zimage": "ZImagePipeline", "klein": "Flux2KleinPipeline"}[family]
    assert isinstance(pipeline, TorchPipeline) and type(pipeline.base).__name__ == expected_class
    job = make_job(manifest, {"steps": 3, "n": 2, "width": width, "height": height})
    gen, sigmas = pipeline.generate(job), []
    try:
        while True:
            step = next(gen)
            assert step.x.shape == ours.model.vae.latent_shape(2, height, width)
            sigmas.append(step.sigma)
    except StopIteration as done:
        images = done.value
    assert len(sigmas) == pipeline.total_steps(job) == 3
    assert sigmas == sorted(sigmas, reverse=True) and 0 < sigmas[-1] < sigmas[0] <= 1
    assert [image.size for image in images] == [(width, height)] * 2


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_http_on_the_torch_engine(klein_engines, zimage_engines, tmp_path):
    """Served by diffusers: a Z-Image txt2img and a klein instruction edit answer with PNGs; klein's inpainting
    with two reference images, and a sampler diffusers lacks, are 400s naming the field (the sampler refused
    before any model is loaded)."""
    klein_folder, zimage_folder = klein_engines("distilled")[0].model.folder, zimage_engines[0].model.folder
    registry = ModelRegistry([str(klein_folder), str(zimage_folder)], tmp_path, engine="torch")
    assert registry.info(klein_folder.name).capabilities.samplers == ("euler", "lcm")
    images = [picture(kl.WIDTH, kl.HEIGHT, seed=40 + i) for i in range(3)]
    common = [("model", klein_folder.name), ("prompt", kl.PROMPT), ("size", f"{kl.WIDTH}x{kl.HEIGHT}"),
              ("steps", "2"), ("response_format", "b64_json")]
    with live_server(create_app(registry, FileStore(tmp_path / "files"), Settings())) as url:
        body = {"model": zimage_folder.name, "prompt": zi.PROMPT, "size": f"{zi.WIDTH}x{zi.HEIGHT}", "steps": 2,
                "response_format": "b64_json"}
        wrong_sampler = request(url, "POST", "/v1/images/generations",
                                json.dumps({**body, "sample_method": "heun"}).encode(),
                                {"Content-Type": "application/json"})
        assert registry.loaded() == []
        generated = request(url, "POST", "/v1/images/generations", json.dumps(body).encode(),
                            {"Content-Type": "application/json"})
        edited = post_parts(url, [*common, *(("image[]", (f"{i}.png", png(im))) for i, im in enumerate(images[:2]))])
        mask = ("mask", ("mask.png", png(ellipse_mask(kl.WIDTH, kl.HEIGHT))))
        refused = post_parts(url, [*common, *(("image[]", (f"{i}.png", png(im))) for i, im in enumerate(images)), mask])
    assert wrong_sampler.status == 400 and wrong_sampler.json()["error"]["param"] == "sample_method"
    for reply, size in ((generated, (zi.WIDTH, zi.HEIGHT)), (edited, (kl.WIDTH, kl.HEIGHT))):
        assert reply.status == 200, reply.body
        with Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"]))) as image:
            assert image.size == size
    assert refused.status == 400, refused.body
    error = refused.json()["error"]
    assert error["param"] == "image" and "one reference image" in error["message"], error
