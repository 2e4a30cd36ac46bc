"""LoRAs on Z-Image and FLUX.2 klein, in the layouts their users have, against diffusers.

- Which family a LoRA is, from its header: Z-Image's and FLUX.2's LoRAs are theirs (not SD3's, whose rule takes
  any other diffusers transformer, nor FLUX.1's, whose BFL block names FLUX.2 shares), at the tiny models'
  widths and the released ones'.
- Reading: diffusers/PEFT files against diffusers' own loading (`lora_state_dict` + `load_lora_into_transformer`
  into a fresh model, PEFT's `scaling * B @ A` per layer); the original layouts (Z-Image's fused qkv under
  ComfyUI's prefix, kohya's; FLUX.2's BFL names as ai-toolkit and kohya write them) against what they were
  written to mean, and against diffusers on the layers its converters read (see NOT_READ_BY_DIFFUSERS).
- Images: a LoRA in the original layout on our converted tiny model gives diffusers' image with its
  diffusers/PEFT twin loaded (`load_lora_weights` + `set_adapters` at the weight) within 1/255 mean absolute
  difference, with identical injected noise, as side branches and fused; the LoRA'd transformer's output within
  1e-4 max relative error.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import lora_files
import tiny_flux2
import tiny_zimage
from convert.model import convert_model
from mlx_sd_server.engine.adapters import applied
from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.families import capabilities
from mlx_sd_server.engine.families.spec import Capabilities
from mlx_sd_server.engine.model_io import load_model, read_manifest
from mlx_sd_server.engine.pipeline import DiffusionPipeline
from mlx_sd_server.job import ModelDefaults, build_job
from mlx_sd_server.lora.formats import LoRAFormatError, lora_family, read_lora
from mlx_sd_server.lora.library import LoRALibrary
from parity import max_rel_err
from test_lora_formats import assert_same, deltas, peft_deltas, read_checked
from test_lora_pipeline import FUSED, diffusers_loras
from test_pipeline import ReplayNoise, mean_abs_diff, ours_image

PROMPT = "a photo of a cat"
TOLERANCE = 1 / 255
VARIED = lambda component, layer: 2.0 + len(layer) % 3  # noqa: E731 (alphas of 2, 3 and 4 at rank 4)

# --- which family ------------------------------------------------------------------------------------------


def factors(stem: str, width: int, out: int, rank: int = 4, names=(".lora_A.weight", ".lora_B.weight")):
    return {stem + names[0]: (rank, width), stem + names[1]: (out, rank)}


def peft(layer: str, width: int, out: int | None = None) -> dict[str, tuple[int, ...]]:
    return factors(f"transformer.{layer}", width, out or width)


def bfl(widths: dict[str, tuple[int, int]], prefix: str = "diffusion_model.") -> dict[str, tuple[int, ...]]:
    """BFL-named layers (in, out) under `prefix`; kohya's flattened under lora_unet_ with prefix None."""
    if prefix is None:
        return {k: v for name, (i, o) in widths.items() for k, v in factors(
            "lora_unet_" + name.replace(".", "_"), i, o, names=(".lora_down.weight", ".lora_up.weight")).items()}
    return {k: v for name, (i, o) in widths.items() for k, v in factors(prefix + name, i, o).items()}


def block_widths(hidden: int, mlp: int, swiglu: bool, attention_only: bool = False) -> dict[str, tuple[int, int]]:
    """A double and a single block's linears in BFL names at these widths (FLUX.2: SwiGLU, gate and value)."""
    gated = 2 * mlp if swiglu else mlp
    layers = {"double_blocks.0.img_attn.qkv": (hidden, 3 * hidden), "double_blocks.0.img_attn.proj": (hidden, hidden),
              "double_blocks.0.txt_attn.qkv": (hidden, 3 * hidden)}
    if not attention_only:
        layers |= {"double_blocks.0.img_mlp.0": (hidden, gated), "double_blocks.0.img_mlp.2": (mlp, hidden),
                   "single_blocks.0.linear1": (hidden, 3 * hidden + gated),
                   "single_blocks.0.linear2": (hidden + mlp, hidden)}
    return layers


CASES = {
    "zimage (main layers)": peft("layers.0.attention.to_q", 3840),
    "zimage (refiners only)": {
        **peft("noise_refiner.1.feed_forward.w1", 3840),
        **peft("context_refiner.0.attention.to_k", 3840),
    },
    "zimage (ComfyUI's original names: fused qkv, out, final_layer)": {
        **factors("diffusion_model.layers.0.attention.qkv", 3840, 3 * 3840),
        **factors("diffusion_model.layers.0.attention.out", 3840, 3840),
        **factors("diffusion_model.final_layer.linear", 3840, 64),
    },
    "zimage (kohya's, either naming)": {
        **factors("lora_unet_layers_0_attention_qkv", 3840, 3 * 3840, names=(".lora_down.weight", ".lora_up.weight")),
        **factors("lora_unet_layers_1_attention_to_q", 3840, 3840, names=(".lora_down.weight", ".lora_up.weight")),
    },
    "flux2 (single blocks, klein-4B's width which is FLUX.1's)": peft(
        "single_transformer_blocks.3.attn.to_qkv_mlp_proj", 3072
    ),
    "flux2 (double-block feed-forward)": {
        **peft("transformer_blocks.0.attn.to_q", 3072),
        **peft("transformer_blocks.0.ff.linear_in", 3072),
    },
    "flux2 (klein-9B's attention alone: its width)": peft("transformer_blocks.0.attn.to_q", 4096),
    "flux2 (klein-4B in BFL names: MLPs 3x the width)": bfl(block_widths(3072, 9216, swiglu=True)),
    "flux2 (klein-4B by kohya)": bfl(block_widths(3072, 9216, swiglu=True), prefix=None),
    "flux2 (klein-9B's attention in BFL names)": bfl(block_widths(4096, 12288, swiglu=True, attention_only=True)),
    "flux2 (a stream modulation in BFL names)": bfl({"single_stream_modulation.lin": (3072, 9 * 3072)}),
    "flux (FLUX.1 in BFL names: MLPs 4x the width)": bfl(block_widths(3072, 12288, swiglu=False)),
    "flux (FLUX.1 by kohya)": bfl(block_widths(3072, 12288, swiglu=False), prefix=None),
    "flux (klein-4B's attention alone is FLUX.1's width and names: taken as FLUX.1's)": bfl(
        block_widths(3072, 9216, swiglu=True, attention_only=True)
    ),
    "flux (FLUX.1 double blocks stay FLUX.1's)": peft("transformer_blocks.0.attn.to_q", 3072),
    "sd3 (joint blocks stay SD3's)": peft("transformer_blocks.0.attn.add_q_proj", 1536),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_family_of_a_dit_lora(tmp_path, case):
    path = tmp_path / "lora.safetensors"
    save_file({key: np.zeros(shape, np.float32) for key, shape in CASES[case].items()}, str(path))
    assert lora_family(path) == case.split()[0]


def test_unknown_layers_are_named(tmp_path):
    """A key no family reads is reported, as the family that reads the most of the file sees it."""
    path = tmp_path / "lora.safetensors"
    shapes = {**factors("diffusion_model.layers.0.attention.qkv", 64, 192),
              **factors("lora_unet_layers_0_attention_nothing", 64, 64, names=(".lora_down.weight", ".lora_up.weight"))}
    save_file({key: np.zeros(shape, np.float32) for key, shape in shapes.items()}, str(path))
    with pytest.raises(LoRAFormatError, match="2 keys are not LoRA layers.*attention_nothing"):
        lora_family(path)


def test_a_fused_qkv_of_the_wrong_height_is_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.layers.0.attention.qkv.lora_A.weight": np.zeros((4, 64), np.float32),
               "diffusion_model.layers.0.attention.qkv.lora_B.weight": np.zeros((100, 4), np.float32)}, str(path))
    assert lora_family(path) == "zimage"
    with pytest.raises(ValueError, match="fused q, k, v LoRA of 100 rows, not 3 x its width 64"):
        read_lora(path)


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_loras_on_the_new_families_are_jobs(family):
    """Taken on their own family's models, refused (400, before the queue) on another's."""
    caps = Capabilities(family=family, lora=True)
    job = build_job({"prompt": "<lora:style:0.8> a cat"}, capabilities=caps, lora_family=lambda name: family)
    assert job.loras == (("style", 0.8),) and job.prompt.strip() == "a cat"
    with pytest.raises(JobError) as caught:
        build_job({"prompt": "a cat", "loras": [{"name": "style"}]}, capabilities=caps, lora_family=lambda name: "flux")
    assert caught.value.status == 400 and caught.value.code == "lora_family_mismatch"


# --- reading ---------------------------------------------------------------------------------------------

TRANSFORMERS = {"zimage": tiny_zimage.transformer, "flux2": tiny_flux2.transformer}
PIPELINES = {"zimage": "ZImagePipeline", "flux2": "Flux2KleinPipeline"}
# What diffusers 0.42's converters cannot read, so that those layers are compared with what the file was
# written to mean instead: Z-Image's original names outside the blocks (x_embedder, final_layer: dropped as
# unexpected keys) and its fused qkv with .lora_down/.lora_up under diffusion_model.; FLUX.2's BFL final
# modulation (loaded without BFL's (shift, scale) -> diffusers' (scale, shift) swap that its weight gets), and
# kohya's FLUX.2 modulations (dropped as unsupported keys).
NOT_READ_BY_DIFFUSERS = {
    "zimage_comfy": r"^(?!.*(all_x_embedder|all_final_layer|attention\.to_[qkv]$))",
    "zimage_kohya": r"^(?!all_x_embedder|all_final_layer)",
    "flux2_bfl": r"^(?!norm_out)",
    "flux2_kohya": r"^(?!norm_out|.*_modulation)",
}
FORMAT_CASES = [("zimage", "peft", VARIED), ("zimage", "zimage_comfy", VARIED), ("zimage", "zimage_kohya", 8.0),
                ("flux2", "peft", VARIED), ("flux2", "flux2_bfl", None), ("flux2", "flux2_kohya", VARIED)]


def diffusers_deltas(family: str, path) -> dict[str, dict[str, np.ndarray]]:
    import diffusers

    cls, model = getattr(diffusers, PIPELINES[family]), TRANSFORMERS[family]()
    state, metadata = cls.lora_state_dict(str(path), return_lora_metadata=True)
    cls.load_lora_into_transformer(dict(state), transformer=model, metadata=metadata)
    return {"transformer": peft_deltas("transformer", model)}


@pytest.mark.parametrize("family, fmt, alpha", FORMAT_CASES, ids=[fmt for _, fmt, _ in FORMAT_CASES])
def test_every_layer_reads_as_written_and_as_diffusers_reads_it(tmp_path, family, fmt, alpha):
    path = tmp_path / "lora.safetensors"
    expected = lora_files.write_lora(path, fmt, {"transformer": TRANSFORMERS[family]()}, alpha=alpha)
    lora = read_checked(path)
    assert lora.family == family
    assert_same(deltas(lora.layers), deltas(expected))  # every layer of the model, fused ones split
    subset = tmp_path / "subset.safetensors"  # the layers diffusers reads, written alike
    targets = NOT_READ_BY_DIFFUSERS.get(fmt)
    lora_files.write_lora(subset, fmt, {"transformer": TRANSFORMERS[family]()}, alpha=alpha, targets=targets)
    assert_same(deltas(read_checked(subset).layers), diffusers_deltas(family, subset))


@pytest.mark.parametrize("family, fmt, rename", [
    ("zimage", "peft",
     lambda key: key.replace("transformer.", "diffusion_model.", 1).replace(".weight", ".default.weight")),
    ("zimage", "zimage_comfy", lambda key: key.removeprefix("diffusion_model.")),  # bare original names
    ("flux2", "peft", lambda key: key.replace("transformer.", "diffusion_model.", 1)),  # ai-toolkit's expanded names
    ("flux2", "flux2_bfl", lambda key: key.replace("diffusion_model.", "base_model.model.", 1)),  # PEFT's prefix
])
def test_other_prefixes_read_alike(tmp_path, family, fmt, rename):
    """ai-toolkit's diffusion_model. before diffusers names, PEFT's adapter name (`lora_A.default.weight`) and
    its base_model.model. prefix, no prefix at all: the same LoRA."""
    from safetensors.numpy import load_file

    lora_files.write_lora(tmp_path / "a.safetensors", fmt, {"transformer": TRANSFORMERS[family]()}, alpha=4.0)
    save_file({rename(key): value for key, value in load_file(str(tmp_path / "a.safetensors")).items()},
              str(tmp_path / "b.safetensors"))
    a, b = read_checked(tmp_path / "a.safetensors"), read_checked(tmp_path / "b.safetensors")
    assert a.family == b.family == family
    assert_same(deltas(b.layers), deltas(a.layers))  # (alpha = rank: scale 1 without PEFT's metadata too)


# --- images ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (diffusers pipeline, our loaded model, its manifest), built once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            src = tmp_path_factory.mktemp(f"{family}-src")
            pipe = tiny_zimage.make_pipeline(src) if family == "zimage" else tiny_flux2.make_pipeline(src)
            pipe.set_progress_bar_config(disable=True)
            dst = tmp_path_factory.mktemp(f"{family}-dst") / f"{family}-turbo"  # Z-Image Turbo's defaults: no CFG
            convert_model(src, dst, dtype="float32", progress=False)
            cache[family] = (pipe, load_model(dst, dtype="float32"), read_manifest(dst))
            cache[family, "src"] = src
        return cache[family]

    get.sources = cache  # (the diffusers folders, by (family, "src"))
    return get


def image(family: str, pipe, model, manifest, library, weights: dict, budget: int = 0, reference: bool = True):
    """(diffusers' image with whatever LoRAs it has loaded (None without `reference`), ours with `weights`'
    LoRAs): Z-Image 80x64 in 4 steps without CFG, klein distilled 96x64 in its 4 steps; the same initial noise."""
    width, height = (80, 64) if family == "zimage" else (96, 64)
    shape = (1, 16, height // 8, width // 8) if family == "zimage" else (1, 128, height // 16, width // 16)
    initial = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    options = {"guidance_scale": 0.0} if family == "zimage" else {"guidance_scale": 1.0}
    expected = pipe(prompt=PROMPT, num_inference_steps=4, height=height, width=width,
                    latents=torch.from_numpy(initial), output_type="np", **options).images if reference else None
    job = build_job({"prompt": PROMPT, "steps": 4, "sample_method": "euler", "width": width, "height": height,
                     "loras": [{"name": n, "scale": w} for n, w in weights.items()]},
                    defaults=ModelDefaults(**manifest["defaults"]), capabilities=capabilities(manifest),
                    lora_family=library.family)
    pipeline = DiffusionPipeline(model, paste_back=False, loras=library.bound, lora_fuse_budget=budget)
    return expected, ours_image(pipeline, job, ReplayNoise(initial, []))


def transformer_inputs(family: str, pipe) -> tuple[np.ndarray, tuple]:
    """A batch of two: diffusers' transformer's output on it (with whatever adapters it has set), and our
    transformer's arguments for the same inputs."""
    rng = np.random.default_rng(6)
    if family == "zimage":
        latents = rng.standard_normal((2, 16, 8, 10)).astype(np.float32)
        caps = rng.standard_normal((2, 9, pipe.transformer.config.cap_feat_dim)).astype(np.float32)
        t = np.array([0.3, 0.8], np.float32)
        with torch.no_grad():
            out = pipe.transformer(list(torch.from_numpy(latents).unsqueeze(2).unbind(0)), torch.from_numpy(t),
                                   list(torch.from_numpy(caps).unbind(0)), patch_size=2, return_dict=False)[0]
        reference = torch.stack(out).squeeze(2).numpy().transpose(0, 2, 3, 1)
        return reference, (mx.array(latents.transpose(0, 2, 3, 1)), mx.array(t), mx.array(caps), [9, 9])
    from diffusers import Flux2KleinPipeline as P

    latents = torch.from_numpy(rng.standard_normal((2, 6, 128)).astype(np.float32))
    text = torch.from_numpy(rng.standard_normal((2, 5, pipe.transformer.config.joint_attention_dim)).astype(np.float32))
    img_ids = P._prepare_latent_ids(torch.zeros(1, 128, 2, 3))[0].float()
    txt_ids = P._prepare_text_ids(torch.zeros(1, 5, 8))[0].float()
    t = torch.tensor([1.0, 0.3])
    with torch.no_grad():
        reference = pipe.transformer(hidden_states=latents, encoder_hidden_states=text, timestep=t, img_ids=img_ids,
                                     txt_ids=txt_ids, guidance=None, return_dict=False)[0].numpy()
    return reference, tuple(mx.array(v.numpy()) for v in (latents, text, t, img_ids, txt_ids)) + (None,)


def transformer_output(family: str, pipe, model) -> np.ndarray:
    """Our transformer's output on transformer_inputs' batch, as the model is now."""
    return np.array(model.components["transformer"](*transformer_inputs(family, pipe)[1]), dtype=np.float32)


def transformer_error(family: str, pipe, model, library, weights: dict) -> float:
    """The LoRA'd transformer's output (diffusers' adapters already set) against ours."""
    reference, _ = transformer_inputs(family, pipe)
    with applied(model, [(library.bound(name, model), weight) for name, weight in weights.items()]):
        return max_rel_err(transformer_output(family, pipe, model), reference)


IMAGE_CASES = [("zimage", "zimage_comfy", 8.0), ("zimage", "zimage_kohya", VARIED), ("flux2", "flux2_bfl", None),
               ("flux2", "flux2_kohya", 8.0)]


@pytest.mark.parametrize("weight", [1.0, 0.6])
@pytest.mark.parametrize("family, fmt, alpha", IMAGE_CASES, ids=[fmt for _, fmt, _ in IMAGE_CASES])
def test_an_original_layout_lora_gives_diffusers_image_with_its_twin(models, tmp_path, family, fmt, alpha, weight):
    """Every linear of the transformer adapted, fused projections and the final layer included."""
    pipe, model, manifest = models(family)
    (tmp_path / "loras").mkdir()
    written = lora_files.write_lora(tmp_path / "loras" / "original.safetensors", fmt, {"transformer": pipe.transformer},
                                    alpha=alpha, seed=3)
    lora_files.write_peft_twin(tmp_path / "loras" / "twin.safetensors", written)
    library = LoRALibrary(tmp_path / "loras")
    assert library.family("original") == library.family("twin") == family
    with diffusers_loras(pipe, {"twin": library.info("twin").path}, {"twin": weight}):
        expected, ours = image(family, pipe, model, manifest, library, {"original": weight})
        _, twin = image(family, pipe, model, manifest, library, {"twin": weight}, reference=False)
        _, fused = image(family, pipe, model, manifest, library, {"original": weight}, budget=FUSED, reference=False)
        err = transformer_error(family, pipe, model, library, {"original": weight})
    base, ours_base = image(family, pipe, model, manifest, library, {})
    diff, moved = mean_abs_diff(ours, expected), float(np.abs(ours - ours_base).mean())
    twin_diff, fused_diff = float(np.abs(ours - twin).mean()), mean_abs_diff(fused, expected)
    print(f"{family} {fmt} LoRA at {weight}: image mean abs diff {diff:.2e} (fused {fused_diff:.2e}, its PEFT twin "
          f"{twin_diff:.2e}; the LoRA moves it {moved:.3f}), transformer max rel err {err:.2e}")
    assert moved > 5 * TOLERANCE  # the LoRA matters, so agreeing with diffusers says something
    assert diff <= TOLERANCE and fused_diff <= TOLERANCE and twin_diff <= TOLERANCE and err <= 1e-4
    assert mean_abs_diff(ours_base, base) <= TOLERANCE


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_two_peft_loras_one_negative_match_diffusers(models, tmp_path, family):
    pipe, model, manifest = models(family)
    (tmp_path / "loras").mkdir()
    lora_files.write_lora(tmp_path / "loras" / "a.safetensors", "peft", {"transformer": pipe.transformer}, alpha=8.0,
                          seed=4)
    lora_files.write_lora(tmp_path / "loras" / "b.safetensors", "peft", {"transformer": pipe.transformer},
                          seed=5, targets=r"attn|attention")
    library = LoRALibrary(tmp_path / "loras")
    weights = {"a": 0.8, "b": -0.5}
    with diffusers_loras(pipe, {name: library.info(name).path for name in weights}, weights):
        expected, ours = image(family, pipe, model, manifest, library, weights)
        err = transformer_error(family, pipe, model, library, weights)
    diff = mean_abs_diff(ours, expected)
    print(f"{family} two PEFT LoRAs (0.8, -0.5): image mean abs diff {diff:.2e}, transformer max rel err {err:.2e}")
    assert diff <= TOLERANCE and err <= 1e-4


def dequantized(loaded):
    """`loaded` with each of its transformer's quantized linears replaced by a float one of its dequantized weight."""
    import mlx.nn as nn

    from mlx_sd_server.engine.adapters import get_layer

    root = loaded.components["transformer"]
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.QuantizedLinear):
            weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            linear.update({"weight": weight, **({"bias": module.bias} if "bias" in module else {})})
            parent_name, _, leaf = name.rpartition(".")
            parent = get_layer(root, parent_name) if parent_name else root
            parent[int(leaf) if isinstance(parent, list) else leaf] = linear
    return loaded


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_a_lora_on_a_quantized_transformer(models, tmp_path, family):
    """8-bit linears take the LoRA as side branches (a dequantized copy would cost 4x their size): the LoRA'd
    quantized transformer gives the LoRA'd output of a float model with its dequantized weights."""
    import mlx.nn as nn

    pipe, _, _ = models(family)
    convert_model(models.sources[family, "src"], tmp_path / "q8", dtype="float32", quantize=8, progress=False)
    quantized, reference = (load_model(tmp_path / "q8", dtype="float32") for _ in range(2))
    reference = dequantized(reference)
    layers = [m for _, m in quantized.components["transformer"].named_modules() if isinstance(m, nn.QuantizedLinear)]
    (tmp_path / "loras").mkdir()
    fmt = "zimage_comfy" if family == "zimage" else "flux2_bfl"
    lora_files.write_lora(tmp_path / "loras" / "style.safetensors", fmt, {"transformer": pipe.transformer}, seed=7)
    library = LoRALibrary(tmp_path / "loras")
    outputs = []
    for loaded in (quantized, reference):
        with applied(loaded, [(library.bound("style", loaded), 1.0)]):
            outputs.append(transformer_output(family, pipe, loaded))
    err, moved = max_rel_err(*outputs), max_rel_err(transformer_output(family, pipe, quantized), outputs[1])
    print(f"{family} 8-bit ({len(layers)} quantized linears): LoRA'd output against the dequantized float model's "
          f"max rel err {err:.2e} (the LoRA moves it {moved:.2f})")
    assert layers and err <= 1e-4 and moved > 1e-2
