"""mlx_sd_server.lora.formats: LoRA files in every common format read into diffusers layer names, checked against diffusers.

The reference is diffusers' own loading: a random LoRA (tests/lora_files.py) for a tiny model is loaded with
`<Pipeline>.lora_state_dict` + `load_lora_into_*` into fresh torch modules, and every PEFT layer's
`scaling * B @ A` must equal our `scale * up @ down` (products, since a format may fold the scale into either
factor). Where diffusers cannot read a layout (see lora_files' docstring), the deltas the file was written to
mean are the reference, and formats that name the same layers are checked against each other.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file, save_file as save_torch

import tiny_diffusers
import tiny_flux
from mlx_sd_server.lora.formats import LoRAFile, LoRAFormatError, LoRALayer, lora_family, read_lora
from lora_files import TEXT_ENCODERS, write_lora

VARIED = lambda component, layer: 2.0 + len(layer) % 3  # noqa: E731 (alphas of 2, 3 and 4 at rank 4)
BLOCKS_ONLY = r"^transformer_blocks\."  # diffusers drops kohya FLUX's layers outside the blocks
FAMILIES = {"sd1": "sd1", "sd2v": "sd2", "sdxl": "sdxl"}


def sd_models(family: str, text_encoders: bool = True) -> dict[str, torch.nn.Module]:
    models = {"unet": tiny_diffusers.unet(family)}
    if text_encoders:
        models["text_encoder"] = tiny_diffusers.text_encoder("sd2" if family == "sd2v" else "sd1", seed=1)
    if text_encoders and family == "sdxl":
        models["text_encoder_2"] = tiny_diffusers.text_encoder("sdxl2", with_projection=True, seed=2)
    return models


def flux_models(variant: str = "dev", text_encoder: bool = True) -> dict[str, torch.nn.Module]:
    models = {"transformer": tiny_flux.transformer(**tiny_flux.VARIANTS[variant])}
    if text_encoder:
        models["text_encoder"] = tiny_diffusers.text_encoder("sd1", seed=4)
    return models


def deltas(layers: dict[str, dict[str, LoRALayer]]) -> dict[str, dict[str, np.ndarray]]:
    """scale * up @ down per layer, in the layer's weight shape."""
    def delta(layer: LoRALayer) -> np.ndarray:
        rank = layer.down.shape[0]
        product = layer.up.reshape(-1, rank) @ layer.down.reshape(rank, -1)
        return (layer.scale * product).reshape(layer.up.shape[0], *layer.down.shape[1:])

    return {component: {name: delta(layer) for name, layer in by_name.items()} for component, by_name in layers.items()}


def peft_deltas(component: str, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """`scaling * B @ A` of every PEFT LoRA layer diffusers put in `model` (text encoders' layers named as in
    transformers' checkpoints, with `text_model.`)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            (adapter,) = module.lora_A.keys()
            a = module.lora_A[adapter].weight.detach().numpy()
            b = module.lora_B[adapter].weight.detach().numpy()
            rank = a.shape[0]
            delta = float(module.scaling[adapter]) * (b.reshape(-1, rank) @ a.reshape(rank, -1))
            if component in TEXT_ENCODERS:
                name = "text_model." + name.removeprefix("text_model.")
            found[name] = delta.reshape(module.get_base_layer().weight.shape)
    return found


def diffusers_deltas(pipeline: str, path, models: dict[str, torch.nn.Module]) -> dict[str, dict[str, np.ndarray]]:
    """The LoRA at `path` as diffusers' `pipeline` class loads it into `models` (fresh torch modules)."""
    import diffusers

    cls = getattr(diffusers, pipeline)
    alphas = None
    if pipeline == "FluxPipeline":
        state, alphas, metadata = cls.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    elif pipeline == "StableDiffusion3Pipeline":
        state, metadata = cls.lora_state_dict(str(path), return_lora_metadata=True)
    else:
        extra = {"unet_config": models["unet"].config} if pipeline == "StableDiffusionXLPipeline" else {}
        state, alphas, metadata = cls.lora_state_dict(str(path), return_lora_metadata=True, **extra)
    with_alphas = {} if pipeline == "StableDiffusion3Pipeline" else {"network_alphas": alphas}
    for component, model in models.items():
        if component == "unet":
            cls.load_lora_into_unet(dict(state), unet=model, metadata=metadata, **with_alphas)
        elif component == "transformer":
            cls.load_lora_into_transformer(dict(state), transformer=model, metadata=metadata, **with_alphas)
        else:
            cls.load_lora_into_text_encoder(dict(state), text_encoder=model, prefix=component, metadata=metadata,
                                            **with_alphas)
    return {component: peft_deltas(component, model) for component, model in models.items()}


def assert_same(ours: dict[str, dict[str, np.ndarray]], reference: dict[str, dict[str, np.ndarray]]) -> None:
    reference = {component: layers for component, layers in reference.items() if layers}
    assert sorted(ours) == sorted(reference)
    for component, layers in reference.items():
        assert sorted(ours[component]) == sorted(layers), component
        for name, delta in layers.items():
            np.testing.assert_allclose(ours[component][name], delta, rtol=1e-5, atol=1e-7, err_msg=name)


def read_checked(path) -> LoRAFile:
    lora = read_lora(path)
    assert lora_family(path) == lora.family  # the header alone tells the same
    for layers in lora.layers.values():
        for layer in layers.values():
            assert layer.down.dtype == layer.up.dtype == np.float32
    return lora


# --- against diffusers ------------------------------------------------------------------------------------

# kohya files with one alpha for all layers: diffusers applies per-layer kohya alphas to the wrong attention
# layers (its alpha names miss the attention processors' `to_q_lora`), so varied ones are checked below.
SD_CASES = [("sd1", "peft", VARIED), ("sd1", "peft_old", None), ("sd1", "kohya", 8.0), ("sd2v", "kohya", 2.0),
            ("sdxl", "kohya_ldm", 8.0), ("sdxl", "peft", VARIED)]


@pytest.mark.parametrize("family, fmt, alpha", SD_CASES, ids=[f"{f}-{fmt}" for f, fmt, _ in SD_CASES])
def test_sd_lora_matches_diffusers(tmp_path, family, fmt, alpha):
    path = tmp_path / "lora.safetensors"
    expected = write_lora(path, fmt, sd_models(family), alpha=alpha)
    lora = read_checked(path)
    assert lora.family == FAMILIES[family]
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    assert_same(deltas(lora.layers), diffusers_deltas(pipeline, path, sd_models(family)))
    assert_same(deltas(lora.layers), deltas(expected))
    conv = lora.layers["unet"]["down_blocks.0.resnets.0.conv1"]  # a LoCon layer: a 3x3 down, a 1x1 up
    assert conv.down.shape[2:] == (3, 3) and conv.up.shape[2:] == (1, 1)


FLUX_CASES = [("peft", VARIED, None), ("peft_old", None, None), ("flux_xlabs", None, None),
              ("flux_kohya", 8.0, BLOCKS_ONLY), ("flux_comfy", 2.0, BLOCKS_ONLY)]


@pytest.mark.parametrize("fmt, alpha, targets", FLUX_CASES, ids=[c[0] for c in FLUX_CASES])
def test_flux_lora_matches_diffusers(tmp_path, fmt, alpha, targets):
    """Tiny FLUX: diffusers' kohya converter assumes FLUX.1's width in single blocks (checked at full width
    below) and drops the layers outside the blocks, so those formats are checked on the double blocks here."""
    path = tmp_path / "lora.safetensors"
    if targets is not None:
        targets = f"{targets}|^text_model"
    expected = write_lora(path, fmt, flux_models(), alpha=alpha, targets=targets)
    lora = read_checked(path)
    assert lora.family == "flux"
    assert_same(deltas(lora.layers), diffusers_deltas("FluxPipeline", path, flux_models()))
    assert_same(deltas(lora.layers), deltas(expected))


def test_flux_kohya_at_full_width_matches_diffusers(tmp_path):
    """FLUX.1's widths (a meta-device model: no memory), where diffusers splits single blocks' linear1 too.
    The products would be large: they are compared on a few probe vectors."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1)
    path = tmp_path / "lora.safetensors"
    write_lora(path, "flux_kohya", {"transformer": transformer}, alpha=8.0, targets=r"_blocks\.")
    lora = read_checked(path)
    assert lora.family == "flux"
    state = FluxPipeline.lora_state_dict(str(path))  # PEFT names, the alphas folded into the factors
    downs = {key.removeprefix("transformer.").removesuffix(".lora_A.weight"): value.numpy()
             for key, value in state.items() if key.endswith(".lora_A.weight")}
    layers = lora.layers["transformer"]
    assert sorted(layers) == sorted(downs)
    rng = np.random.default_rng(0)
    for name, layer in layers.items():
        x = rng.normal(size=(layer.down.shape[1], 3)).astype(np.float32)
        up = state[f"transformer.{name}.lora_B.weight"].numpy()
        np.testing.assert_allclose(layer.scale * layer.up @ (layer.down @ x), up @ (downs[name] @ x), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    assert layers["single_transformer_blocks.0.proj_mlp"].up.shape == (4 * 3072, 4)


@pytest.mark.parametrize("variant", ["alpha keys", "rsLoRA"])
def test_peft_alpha_sources_match_diffusers(tmp_path, variant):
    """PEFT files with `.alpha` keys beside the factors (FLUX LoRAs on the hub have them), and PEFT's rank-
    stabilised scale alpha / sqrt(r) from diffusers' metadata. The transformer alone, its alphas set by the
    layer's last name: diffusers matches alpha keys by suffix (`proj_out`'s would apply to every block's
    proj_out too), and misses text encoders' alpha keys with transformers 5 (no `text_model.` level)."""
    write_lora(tmp_path / "a.safetensors", "peft", flux_models(text_encoder=False), alpha=VARIED)
    tensors = load_file(str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), "np") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    if variant == "alpha keys":
        stems = [key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")]
        tensors |= {f"{stem}.alpha": torch.tensor(1.0 + len(stem.rpartition(".")[2])) for stem in stems}
        metadata = None
    else:
        metadata = {"lora_adapter_metadata": json.dumps(config | {"transformer.use_rslora": True})}
    save_torch(tensors, str(tmp_path / "b.safetensors"), metadata=metadata)
    lora = read_checked(tmp_path / "b.safetensors")
    reference = diffusers_deltas("FluxPipeline", tmp_path / "b.safetensors", flux_models(text_encoder=False))
    assert_same(deltas(lora.layers), reference)


def test_sd3_peft_lora_matches_diffusers(tmp_path):
    from diffusers import SD3Transformer2DModel

    def sd3():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                     pooled_projection_dim=64, out_channels=4)

    path = tmp_path / "lora.safetensors"
    write_lora(path, "peft", {"transformer": sd3()}, alpha=VARIED)
    lora = read_checked(path)
    assert lora.family == "sd3"
    assert_same(deltas(lora.layers), diffusers_deltas("StableDiffusion3Pipeline", path, {"transformer": sd3()}))


# --- what the files mean, where diffusers cannot tell ------------------------------------------------------

MEANING_CASES = [("sd1", "kohya", VARIED), ("sd1", "kohya_ldm", VARIED), ("sd2v", "peft_old", None),
                 ("sdxl", "kohya_ldm", VARIED), ("sdxl", "kohya", 4.0), ("flux-dev", "flux_kohya", VARIED),
                 ("flux-dev", "flux_comfy", VARIED), ("flux-dev", "flux_bfl", VARIED),
                 ("flux-schnell", "flux_kohya", 1.0)]


@pytest.mark.parametrize("family, fmt, alpha", MEANING_CASES, ids=[f"{f}-{fmt}" for f, fmt, _ in MEANING_CASES])
def test_every_layer_reads_as_written(tmp_path, family, fmt, alpha):
    """Every layer of the tiny models, per-layer alphas: SD 1.x's LDM names (diffusers maps them for SDXL
    only), FLUX's layers outside the blocks and its final shift/scale swap, single blocks' linear1 split."""
    models = flux_models(family.removeprefix("flux-")) if family.startswith("flux-") else sd_models(family)
    path = tmp_path / "lora.safetensors"
    expected = write_lora(path, fmt, models, alpha=alpha)
    lora = read_checked(path)
    assert lora.family == FAMILIES.get(family, "flux")
    assert_same(deltas(lora.layers), deltas(expected))


def test_ldm_and_diffusers_names_read_alike(tmp_path):
    """kohya's LDM names (SDXL's, and some SD 1.x files) give the layers its diffusers names give."""
    models = sd_models("sd1")
    write_lora(tmp_path / "a.safetensors", "kohya", models, alpha=VARIED)
    write_lora(tmp_path / "b.safetensors", "kohya_ldm", models, alpha=VARIED)
    a, b = read_lora(tmp_path / "a.safetensors"), read_lora(tmp_path / "b.safetensors")
    assert a.layers.keys() == b.layers.keys()
    for component, layers in a.layers.items():
        assert layers.keys() == b.layers[component].keys()
        for name, layer in layers.items():
            other = b.layers[component][name]
            assert layer.scale == other.scale
            np.testing.assert_array_equal(layer.down, other.down)
            np.testing.assert_array_equal(layer.up, other.up)


def renamed(path, out, rename) -> None:
    tensors = load_file(str(path))
    save_torch({rename(key): value for key, value in tensors.items()}, str(out))


@pytest.mark.parametrize("prefix", ["transformer.", "model.diffusion_model.", ""])
def test_bfl_layout_under_any_prefix(tmp_path, prefix):
    expected = write_lora(tmp_path / "a.safetensors", "flux_bfl", flux_models(text_encoder=False), alpha=VARIED)
    renamed(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
            lambda key: prefix + key.removeprefix("diffusion_model."))
    assert_same(deltas(read_checked(tmp_path / "b.safetensors").layers), deltas(expected))


def test_old_diffusers_names(tmp_path):
    """diffusers' first format (attention processors, no component prefix) and text encoders saved from
    transformers 5 (no `text_model.`) name the layers the PEFT format does."""
    models = sd_models("sd1")
    expected = write_lora(tmp_path / "a.safetensors", "peft", models, targets=r"attn\d\.|self_attn")

    def old(key: str) -> str:
        key = key.removeprefix("unet.").replace("text_encoder.text_model.", "text_encoder.")
        for proj, target in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
            for factor, old_factor in (("lora_A", "down"), ("lora_B", "up")):
                key = key.replace(f".{target}.{factor}", f".processor.to_{proj}_lora.{old_factor}")
        return key

    renamed(tmp_path / "a.safetensors", tmp_path / "b.safetensors", old)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight" in \
        load_file(str(tmp_path / "b.safetensors"))
    assert_same(deltas(read_checked(tmp_path / "b.safetensors").layers), deltas(expected))


def test_half_precision_factors_read_as_float32(tmp_path):
    write_lora(tmp_path / "a.safetensors", "kohya", sd_models("sd1", text_encoders=False), alpha=8.0)
    tensors = {key: value.to(torch.bfloat16) for key, value in load_file(str(tmp_path / "a.safetensors")).items()}
    save_torch(tensors, str(tmp_path / "b.safetensors"))
    layer = read_checked(tmp_path / "b.safetensors").layers["unet"]["mid_block.attentions.0.proj_in"]
    key = "lora_unet_mid_block_attentions_0_proj_in"
    np.testing.assert_array_equal(layer.down, tensors[f"{key}.lora_down.weight"].float().numpy())
    assert layer.scale == 2.0


# --- family, from the header ------------------------------------------------------------------------------

def write_shapes(path, shapes: dict[str, tuple[int, ...]]) -> None:
    save_file({key: np.zeros(shape, np.float32) for key, shape in shapes.items()}, str(path))


def kohya(name: str, down_in: int, out: int = 8, rank: int = 4) -> dict[str, tuple[int, ...]]:
    return {f"{name}.lora_down.weight": (rank, down_in), f"{name}.lora_up.weight": (out, rank)}


FAMILY_CASES = {
    "sd1": kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768),
    "sd2": kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 1024),
    "sdxl": kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048),
    "sd2 (text encoder only, OpenCLIP-H)": kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024),
    "sd1 (text encoder only, CLIP-L)": kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768),
    "sdxl (second text encoder)": kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1", 1280),
    "flux (double blocks in diffusers names)": {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4)},
    "sd3 (joint blocks)": {
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (4, 1536),
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": (1536, 4)},
    "flux (XLabs)": {"double_blocks.0.processor.proj_lora2.down.weight": (4, 64),
                     "double_blocks.0.processor.proj_lora2.up.weight": (64, 4)},
}


@pytest.mark.parametrize("case", FAMILY_CASES, ids=list(FAMILY_CASES))
def test_family_from_widths(tmp_path, case):
    write_shapes(tmp_path / "lora.safetensors", FAMILY_CASES[case])
    assert lora_family(tmp_path / "lora.safetensors") == case.split()[0]
    assert read_lora(tmp_path / "lora.safetensors").family == case.split()[0]


# --- what is refused --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, kind", [("loha", "LoHa"), ("lokr", "LoKr"), ("dora", "DoRA")])
def test_other_adapters_refused_by_name(tmp_path, fmt, kind):
    path = tmp_path / "adapter.safetensors"
    write_lora(path, fmt, sd_models("sd1", text_encoders=False))
    for read in (read_lora, lora_family):
        with pytest.raises(LoRAFormatError, match=f"{path}.*{kind}.*not supported"):
            read(path)


BAD_FILES = {
    "a checkpoint": ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "is not a LoRA"),
    "empty": ({}, "is not a LoRA.*empty"),
    "full-weight differences": ({"lora_unet_conv_in.diff": (8, 4, 3, 3)}, "full-weight difference"),
    "kohya SD3": (kohya("lora_unet_joint_blocks_0_x_block_attn_qkv", 64, 192), "kohya SD3"),
    "an unknown layer": (kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q", 32)
                         | kohya("lora_unet_conv_in", 4), "2 keys are not LoRA layers.*attn3"),
    "an up without a down": ({"unet.conv_in.lora_B.weight": (8, 4)}, "not LoRA layers"),
    "factors that do not fit": ({"unet.conv_in.lora_A.weight": (4, 4), "unet.conv_in.lora_B.weight": (8, 2)},
                                "are not LoRA factors"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_files_refused(tmp_path, case):
    shapes, message = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    write_shapes(path, shapes)
    for read in (read_lora, lora_family):
        with pytest.raises(LoRAFormatError, match=message):
            read(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_refused_unread(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(b"not even a pickle")
    for read in (read_lora, lora_family):
        with pytest.raises(LoRAFormatError, match="pickle"):
            read(path)


def test_truncated_and_foreign_files_refused(tmp_path):
    write_lora(tmp_path / "a.safetensors", "kohya", sd_models("sd1", text_encoders=False))
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoRAFormatError, match="truncated"):
        lora_family(tmp_path / "b.safetensors")
    (tmp_path / "c.gguf").write_bytes(data)
    with pytest.raises(LoRAFormatError, match=".safetensors"):
        read_lora(tmp_path / "c.gguf")
