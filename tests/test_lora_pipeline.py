"""LoRAs end to end against diffusers' `load_lora_weights` + `set_adapters`, on tiny random models.

Each LoRA file (tests/lora_files.py: random factors in one of the formats people have) is read by the server's
LoRA folder, bound to our converted model and put on it as side branches for a job; diffusers loads the same
file with PEFT. With identical injected noise the images must agree within 1/255 mean absolute difference,
and the LoRA'd denoiser's output within 1e-4 max relative error. Then: switching LoRAs between requests leaks
nothing and loads the base model once.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np
import pytest
import torch

import lora_files
import tiny_diffusers
import tiny_flux
import tiny_sd3
from convert.model import convert_model
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.flux.transformer import latent_image_ids
from mlx_sd_server.engine.adapters import applied
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import ModelDefaults, build_job
from mlx_sd_server.lora.library import LoRALibrary
from mlx_sd_server.registry import ModelRegistry
from parity import max_rel_err
from test_flux_pipeline import packed
from test_pipeline import ReplayNoise, make_noise, mean_abs_diff, ours_image, use_scheduler

SIZE = 64
PROMPT = "a photo of a cat"
NEGATIVE = "dog"
TOLERANCE = 1 / 255
# diffusers' limits (tests/lora_files.py): its LDM-name converter misplaces upsamplers after resnets (and reads LDM
# names for SDXL only); its kohya FLUX converter splits single blocks at FLUX.1's widths and drops the layers
# outside the blocks. Our reader is checked on all of those against what the files mean (test_lora_formats.py).
NO_UPSAMPLERS = r"^(?!.*upsamplers)"
DOUBLE_BLOCKS_AND_CLIP = r"^(transformer_blocks|text_model)[.]"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (diffusers pipeline, our loaded model, its manifest), built once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            src = tmp_path_factory.mktemp(f"{family}-src")
            if family == "flux":
                pipe = tiny_flux.make_pipeline(src, "dev")
            elif family == "sd3":
                pipe = tiny_sd3.make_pipeline(src, "sd35-large")
            else:
                pipe = tiny_diffusers.make_pipeline(src, family)
            pipe.set_progress_bar_config(disable=True)
            dst = tmp_path_factory.mktemp(f"{family}-dst") / "model"
            convert_model(src, dst, dtype="float32", progress=False)
            cache[family] = (pipe, load_model(dst, dtype="float32"), read_manifest(dst))
        return cache[family]

    return get


def components(pipe) -> dict:
    return {name: getattr(pipe, name) for name in ("unet", "transformer", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None and name != "text_encoder_2" or
            name == "text_encoder_2" and type(getattr(pipe, name, None)).__name__.startswith("CLIP")}


@contextlib.contextmanager
def diffusers_loras(pipe, files: dict, weights: dict):
    """The pipeline with LoRA files loaded (adapter name = LoRA name) at their weights; unloaded after."""
    for name, path in files.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    try:
        yield
    finally:
        pipe.unload_lora_weights()


def write(tmp_path, name: str, fmt: str, pipe, seed: int, targets: str | None = None, alpha=None,
          text_encoders: bool = True):
    modules = components(pipe) if text_encoders else {k: v for k, v in components(pipe).items() if "text" not in k}
    path = tmp_path / "loras" / f"{name}.safetensors"
    path.parent.mkdir(exist_ok=True)
    lora_files.write_lora(path, fmt, modules, rank=4, alpha=alpha, seed=seed, targets=targets)
    return path


FUSED = 2**40  # a fuse budget every layer fits (engine/adapters.py); 0: side branches only


def sd_image(pipe, model, manifest, library, weights: dict, sample_method: str = "euler",
             budget: int = 0) -> tuple[float, np.ndarray]:
    module = use_scheduler(pipe, sample_method)
    initial, steps = make_noise()
    from test_pipeline import diffusers_noise

    with diffusers_noise(steps, module):
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0, height=SIZE,
                        width=SIZE, latents=torch.from_numpy(initial), output_type="np").images
    job = build_job({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 6, "cfg_scale": 5.0,
                     "sample_method": sample_method, "size": f"{SIZE}x{SIZE}",
                     "loras": [{"name": n, "scale": w} for n, w in weights.items()]},
                    capabilities=capabilities(manifest), lora_family=library.family)
    ours = ours_image(DiffusionPipeline(model, paste_back=False, loras=library.bound, lora_fuse_budget=budget), job,
                      ReplayNoise(initial, steps))
    return mean_abs_diff(ours, expected), ours


def unet_error(pipe, model, library, weights: dict) -> float:
    """The LoRA'd UNet's output (diffusers' adapters already set) against ours, one call."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    t = np.array([500.0, 120.0], np.float32)
    extra, ours_extra = {}, {}
    if pipe.unet.config.addition_embed_type == "text_time":
        pooled = rng.standard_normal((2, pipe.text_encoder_2.config.projection_dim)).astype(np.float32)
        time_ids = np.array([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, np.float32)
        extra = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}}
        ours_extra = {"text_embeds": mx.array(pooled), "time_ids": mx.array(time_ids)}
    with torch.no_grad():
        reference = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context), **extra).sample.numpy()
    bound = [(library.bound(name, model), weight) for name, weight in weights.items()]
    with applied(model, bound):
        ours = model.unet(mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(context), **ours_extra)
    return max_rel_err(np.array(ours).transpose(0, 3, 1, 2), reference)


@pytest.mark.parametrize("family, fmt, targets", [
    ("sd1", "kohya", None),  # LoCon convolutions and the text encoder too
    ("sd1", "peft", None),
    ("sd2v", "kohya", None),  # v-prediction, linear proj_in
    ("sdxl", "kohya_ldm", NO_UPSAMPLERS),  # both text encoders (lora_te1_, lora_te2_)
    ("sdxl", "peft", None),
])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_sd_loras_match_diffusers(models, tmp_path, family, fmt, targets, weight):
    pipe, model, manifest = models(family)
    write(tmp_path, "style", fmt, pipe, seed=1, targets=targets, alpha=8.0 if fmt != "peft" else None)
    library = LoRALibrary(tmp_path / "loras")
    assert library.family("style") == manifest["family"]
    with diffusers_loras(pipe, {"style": library.info("style").path}, {"style": weight}):
        diff, ours = sd_image(pipe, model, manifest, library, {"style": weight})
        fused_diff, _ = sd_image(pipe, model, manifest, library, {"style": weight}, budget=FUSED)
        err = unet_error(pipe, model, library, {"style": weight})
    base_diff, base = sd_image(pipe, model, manifest, library, {})
    moved = float(np.abs(ours - base).mean())
    print(f"{family} {fmt} LoRA at {weight}: image mean abs diff {diff:.2e} (fused {fused_diff:.2e}; the LoRA moves "
          f"it {moved:.3f}), UNet max rel err {err:.2e}")
    assert moved > TOLERANCE  # the LoRA matters, so agreeing with diffusers says something
    assert diff <= TOLERANCE and fused_diff <= TOLERANCE and err <= 1e-4 and base_diff <= TOLERANCE


def test_two_loras_one_negative_match_diffusers(models, tmp_path):
    pipe, model, manifest = models("sd1")
    write(tmp_path, "detail", "kohya", pipe, seed=2, alpha=4.0)
    write(tmp_path, "ink", "peft", pipe, seed=3, targets=r"attn|proj_|ff\.")
    library = LoRALibrary(tmp_path / "loras")
    files = {name: library.info(name).path for name in ("detail", "ink")}
    weights = {"detail": 1.0, "ink": -0.6}
    with diffusers_loras(pipe, files, weights):
        diff, _ = sd_image(pipe, model, manifest, library, weights, sample_method="euler_a")
        err = unet_error(pipe, model, library, weights)
    print(f"sd1 two LoRAs (1.0, -0.6): image mean abs diff {diff:.2e}, UNet max rel err {err:.2e}")
    assert diff <= TOLERANCE and err <= 1e-4


def flux_image(pipe, model, manifest, library, weights: dict, budget: int = 0) -> tuple[float, np.ndarray]:
    height, width = 64, 80
    initial = np.random.default_rng(0).standard_normal((1, 16, height // 8, width // 8)).astype(np.float32)
    expected = pipe(PROMPT, num_inference_steps=3, height=height, width=width, latents=packed(initial),
                    guidance_scale=3.5, max_sequence_length=manifest["components"]["text_encoder_2"]["max_length"],
                    output_type="np").images
    job = build_job({"prompt": PROMPT, "steps": 3, "sample_method": "euler", "width": width, "height": height,
                     "loras": [{"name": n, "scale": w} for n, w in weights.items()]},
                    defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest),
                    lora_family=library.family)
    ours = ours_image(DiffusionPipeline(model, paste_back=False, loras=library.bound, lora_fuse_budget=budget), job,
                      ReplayNoise(initial, []))
    return mean_abs_diff(ours, expected), ours


def transformer_error(pipe, model, library, weights: dict) -> float:
    rng = np.random.default_rng(6)
    h, w = 6, 4
    inputs = {"hidden_states": rng.standard_normal((2, h * w // 4, 64)), "encoder_hidden_states":
              rng.standard_normal((2, 5, 32)), "pooled_projections": rng.standard_normal((2, 32)),
              "timestep": np.array([1.0, 0.3]), "img_ids": np.array(latent_image_ids(h, w)),
              "txt_ids": np.zeros((5, 3)), "guidance": np.array([3.5, 2.0])}
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    with torch.no_grad():
        reference = pipe.transformer(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0].numpy()
    bound = [(library.bound(name, model), weight) for name, weight in weights.items()]
    with applied(model, bound):
        ours = model.components["transformer"](*(mx.array(inputs[k]) for k in (
            "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
            "guidance")))
    return max_rel_err(np.array(ours), reference)


@pytest.mark.parametrize("fmt, targets", [
    ("peft", None),  # transformer and CLIP-L
    ("flux_kohya", DOUBLE_BLOCKS_AND_CLIP),
    ("flux_comfy", DOUBLE_BLOCKS_AND_CLIP),  # the reference's example: an XLabs LoRA converted by ComfyUI
    ("flux_xlabs", None),
])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_flux_loras_match_diffusers(models, tmp_path, fmt, targets, weight):
    pipe, model, manifest = models("flux")
    write(tmp_path, "realism", fmt, pipe, seed=4, targets=targets, alpha=None if fmt in ("peft", "flux_xlabs") else 8.0)
    library = LoRALibrary(tmp_path / "loras")
    assert library.family("realism") == "flux"
    with diffusers_loras(pipe, {"realism": library.info("realism").path}, {"realism": weight}):
        diff, ours = flux_image(pipe, model, manifest, library, {"realism": weight})
        fused_diff, _ = flux_image(pipe, model, manifest, library, {"realism": weight}, budget=FUSED)
        err = transformer_error(pipe, model, library, {"realism": weight})
    _, base = flux_image(pipe, model, manifest, library, {})
    moved = float(np.abs(ours - base).mean())
    print(f"flux {fmt} LoRA at {weight}: image mean abs diff {diff:.2e} (fused {fused_diff:.2e}; the LoRA moves "
          f"it {moved:.3f}), transformer max rel err {err:.2e}")
    assert moved > TOLERANCE
    assert diff <= TOLERANCE and fused_diff <= TOLERANCE and err <= 1e-4


def test_two_flux_loras_one_negative_match_diffusers(models, tmp_path):
    pipe, model, manifest = models("flux")
    write(tmp_path, "realism", "flux_comfy", pipe, seed=10, targets=DOUBLE_BLOCKS_AND_CLIP, alpha=8.0)
    write(tmp_path, "style", "peft", pipe, seed=11)
    library = LoRALibrary(tmp_path / "loras")
    weights = {"realism": 0.8, "style": -0.5}
    with diffusers_loras(pipe, {name: library.info(name).path for name in weights}, weights):
        diff, _ = flux_image(pipe, model, manifest, library, weights)
        err = transformer_error(pipe, model, library, weights)
    print(f"flux two LoRAs (0.8, -0.5): image mean abs diff {diff:.2e}, transformer max rel err {err:.2e}")
    assert diff <= TOLERANCE and err <= 1e-4


@pytest.mark.parametrize("weight", [1.0, -0.6])
def test_sd3_lora_matches_diffusers(models, tmp_path, weight):
    """A diffusers/PEFT LoRA on the MMDiT and both CLIPs, against StableDiffusion3Pipeline with it loaded."""
    pipe, model, manifest = models("sd3")
    write(tmp_path, "sd3-style", "peft", pipe, seed=9)
    library = LoRALibrary(tmp_path / "loras")
    assert library.family("sd3-style") == "sd3"
    initial = np.random.default_rng(0).standard_normal((1, 16, SIZE // 8, SIZE // 8)).astype(np.float32)
    job = build_job({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3, "cfg_scale": 4.0,
                     "sample_method": "euler", "size": f"{SIZE}x{SIZE}", "loras": [{"name": "sd3-style", "scale": weight}]},
                    defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest),
                    lora_family=library.family)
    ours = ours_image(DiffusionPipeline(model, paste_back=False, loras=library.bound), job, ReplayNoise(initial, []))
    with diffusers_loras(pipe, {"sd3-style": library.info("sd3-style").path}, {"sd3-style": weight}):
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, num_inference_steps=3, height=SIZE,
                        width=SIZE, latents=torch.from_numpy(initial), output_type="np").images
    base = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, num_inference_steps=3, height=SIZE, width=SIZE,
                latents=torch.from_numpy(initial), output_type="np").images
    diff, moved = mean_abs_diff(ours, expected), mean_abs_diff(ours, base)
    print(f"sd3.5-large peft LoRA at {weight}: image mean abs diff {diff:.2e} (the LoRA moves it {moved:.3f})")
    assert moved > TOLERANCE and diff <= TOLERANCE


def write_t5_lora(path, t5: torch.nn.Module, fmt: str, seed: int) -> dict[str, np.ndarray]:
    """A random LoRA of a T5 encoder's linears in `fmt` (diffusers reads none of these: its FLUX and SD3 loaders
    drop T5 layers); returns each layer's delta (alpha = 2 * rank: scale 2)."""
    from safetensors.numpy import save_file

    rng, rank = np.random.default_rng(seed), 4
    tensors, deltas = {}, {}
    prefix, down_name, up_name = {"kohya": ("lora_te3_", ".lora_down.weight", ".lora_up.weight"),
                                  "comfy": ("text_encoders.t5xxl.transformer.", ".lora_down.weight", ".lora_up.weight"),
                                  "peft_sd3": ("text_encoder_3.", ".lora_A.weight", ".lora_B.weight")}[fmt]
    for name, module in t5.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder.block."):
            down = (rng.standard_normal((rank, module.in_features)) / module.in_features**0.5).astype(np.float32)
            up = (rng.standard_normal((module.out_features, rank)) * 0.1).astype(np.float32)
            stem = prefix + (name.replace(".", "_") if fmt == "kohya" else name)
            tensors[stem + down_name], tensors[stem + up_name] = down, up
            if fmt != "peft_sd3":
                tensors[stem + ".alpha"] = np.array(2.0 * rank, np.float32)
            deltas[name] = (2.0 if fmt != "peft_sd3" else 1.0) * up @ down
    save_file(tensors, str(path))
    return deltas


@pytest.mark.parametrize("family, fmt", [("flux", "kohya"), ("flux", "comfy"), ("sd3", "peft_sd3")])
def test_t5_loras_apply_as_their_deltas(models, tmp_path, family, fmt):
    """FLUX's T5 LoRA layers (sd-scripts' lora_te3_, ComfyUI's t5xxl) and SD3's (text_encoder_3): T5's states
    with the LoRA at 0.7 equal transformers' T5 with W + 0.7 * delta (diffusers cannot load these)."""
    import copy

    pipe, model, _ = models(family)
    t5 = pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2
    (tmp_path / "loras").mkdir()
    deltas = write_t5_lora(tmp_path / "loras" / "t5.safetensors", t5, fmt, seed=12)
    library = LoRALibrary(tmp_path / "loras")
    assert library.family("t5") == family
    reference = copy.deepcopy(t5)
    with torch.no_grad():
        for name, delta in deltas.items():
            reference.get_submodule(name).weight += 0.7 * torch.from_numpy(delta)
        ids = torch.tensor([[3, 17, 5, 42, 9, 1, 0, 0]])
        expected = reference(ids).last_hidden_state.numpy()
        base = t5(ids).last_hidden_state.numpy()
    t5_name = list(model.text_encoders)[-1]  # FLUX's text_encoder_2, SD3's text_encoder_3
    ours_t5 = model.text_encoders[t5_name]
    with applied(model, [(library.bound("t5", model), 0.7)]):
        ours = np.array(model.text_encoders[t5_name](mx.array(ids.numpy())))
    assert model.text_encoders[t5_name] is ours_t5
    err, moved = max_rel_err(ours, expected), max_rel_err(base, expected)
    print(f"{family} T5 LoRA ({fmt}) at 0.7: T5 states max rel err {err:.2e} (the LoRA moves them {moved:.2f})")
    assert err <= 1e-4 and moved > 1e-2


@pytest.mark.parametrize("budget", [0, FUSED])  # side branches, fused copies
def test_switching_loras_leaks_nothing_and_loads_the_model_once(models, tmp_path, monkeypatch, budget):
    pipe, model, manifest = models("sd1")
    write(tmp_path, "a", "kohya", pipe, seed=7, alpha=2.0)
    write(tmp_path, "b", "peft", pipe, seed=8)
    registry = ModelRegistry([str(model.folder)], tmp_path / "models", lora_dir=tmp_path / "loras",
                             lora_fuse_budget=budget, low_memory=False)
    loads = []
    load = registry._load
    monkeypatch.setattr(registry, "_load", lambda info: loads.append(info.name) or load(info))
    info = registry.info()

    def run(pipeline, loras: list[dict]) -> np.ndarray:
        job = build_job({"prompt": PROMPT, "steps": 3, "sample_method": "euler", "size": f"{SIZE}x{SIZE}",
                         "loras": loras}, capabilities=info.capabilities, lora_family=registry.loras.family)
        initial, steps = make_noise()
        return ours_image(pipeline, job, ReplayNoise(initial, steps))

    def fresh(loras: list[dict]) -> np.ndarray:  # a new model and LoRA folder, the server's way of applying LoRAs
        return run(DiffusionPipeline(load_model(model.folder, dtype="float32"), loras=LoRALibrary(tmp_path / "loras").bound,
                                     lora_fuse_budget=registry.pipeline().lora_fuse_budget), loras)

    requests = [[{"name": "a", "scale": 0.8}], [], [{"name": "b", "scale": 1.0}], [],
                [{"name": "a", "scale": 0.8}, {"name": "b", "scale": -0.5}]]
    served = [run(registry.pipeline(), loras) for loras in requests]
    assert loads == [info.name]  # the base model, once
    for loras, image in zip(requests, served):
        assert np.array_equal(image, fresh(loras)), loras
    assert not np.array_equal(served[0], served[1]) and np.array_equal(served[1], served[3])
