"""LoRAs on Qwen-Image's transformer, in the layouts its users have, against diffusers' own loading.

- Which family: a Qwen-Image LoRA is Qwen-Image's, not FLUX.1's (the same attention names at the same width) or
  SD3's (whose rule takes any other diffusers transformer); attention-only LoRAs of the first 19 blocks stay
  FLUX.1's (families/qwenimage/lora.py says why).
- Reading: every layer of the tiny transformer in diffusers/PEFT names, kohya's flattened names, and the
  `diffusion_model.`/bare names of ComfyUI and the Lightning LoRAs, each as diffusers' QwenImagePipeline reads it
  (`lora_state_dict` + `load_lora_into_transformer`, PEFT's `scaling * B @ A` per layer).
"""

from __future__ import annotations

import pytest
from safetensors.numpy import load_file, save_file

import lora_files
import tiny_qwenimage
from mlx_sd_server.lora.formats import lora_family
from test_lora_formats import assert_same, deltas, peft_deltas, read_checked, write_shapes
from test_lora_new_families import VARIED, factors, peft

WIDTH = 3072  # Qwen-Image's (24 heads of 128), FLUX.1's too


def diffusers_deltas(path) -> dict:
    from diffusers import QwenImagePipeline

    model = tiny_qwenimage.transformer()
    state, metadata = QwenImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    QwenImagePipeline.load_lora_into_transformer(dict(state), transformer=model, metadata=metadata)
    return {"transformer": peft_deltas("transformer", model)}


def lightning(key: str) -> str:
    """kohya's file with diffusers' dotted names under diffusion_model., as ComfyUI and lightx2v write them."""
    stem, suffix = key.split(".", 1)
    name = stem.removeprefix("lora_unet_")
    for flat, dotted in LIGHTNING_NAMES.items():
        if name.startswith(flat):
            return f"diffusion_model.{dotted}{name[len(flat):]}.{suffix}"
    raise AssertionError(key)


LIGHTNING_NAMES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def dotted_names():
    """The tiny transformer's layers, flattened -> dotted (to rewrite kohya's names as the other layouts'),
    longest first so that `img_mlp_net_0_proj` is not taken for a shorter layer's."""
    names = [name for name, module in tiny_qwenimage.transformer().named_modules() if hasattr(module, "weight")]
    LIGHTNING_NAMES.update(sorted(((n.replace(".", "_"), n) for n in names), key=lambda item: -len(item[0])))


@pytest.mark.parametrize("fmt, alpha", [("peft", VARIED), ("kohya", 8.0), ("kohya", None)])
def test_every_layer_reads_as_written_and_as_diffusers_reads_it(tmp_path, fmt, alpha):
    path = tmp_path / "lora.safetensors"
    expected = lora_files.write_lora(path, fmt, {"transformer": tiny_qwenimage.transformer()}, alpha=alpha)
    lora = read_checked(path)
    assert lora.family == "qwenimage"
    assert len(lora.layers["transformer"]) == 34  # every Linear of two blocks and the top level
    assert_same(deltas(lora.layers), deltas(expected))
    assert_same(deltas(lora.layers), diffusers_deltas(path))


@pytest.mark.parametrize("rename", [
    lightning,  # ComfyUI's / lightx2v's: diffusion_model. + dotted names, lora_down/lora_up/alpha
    lambda key: lightning(key).removeprefix("diffusion_model."),  # bare dotted names
], ids=["diffusion_model", "bare"])
def test_comfyui_and_lightning_names_read_as_kohya_and_diffusers_do(tmp_path, rename):
    kohya = tmp_path / "kohya.safetensors"
    lora_files.write_lora(kohya, "kohya", {"transformer": tiny_qwenimage.transformer()}, alpha=VARIED)
    other = tmp_path / "other.safetensors"
    save_file({rename(key): value for key, value in load_file(str(kohya)).items()}, str(other))
    a, b = read_checked(kohya), read_checked(other)
    assert b.family == "qwenimage"
    assert_same(deltas(b.layers), deltas(a.layers))
    assert_same(deltas(b.layers), diffusers_deltas(other))


def block(i: int, layers: tuple[str, ...]) -> dict:
    return {k: v for layer in layers for k, v in peft(f"transformer_blocks.{i}.{layer}", WIDTH).items()}


ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out")
CASES = {
    "img_mlp": ({**block(0, ATTENTION), **peft("transformer_blocks.0.img_mlp.net.2", 4 * WIDTH, WIDTH)}, "qwenimage"),
    "modulation": (peft("transformer_blocks.3.txt_mod.1", WIDTH, 6 * WIDTH), "qwenimage"),
    "late block": (block(40, ATTENTION), "qwenimage"),
    "txt_in (kohya)": (factors("lora_unet_txt_in", 3584, WIDTH, names=(".lora_down.weight", ".lora_up.weight")),
                       "qwenimage"),
    "early attention": (block(2, ATTENTION), "flux"),  # FLUX.1's double block names, at its width
    "FLUX single block": ({**block(40, ATTENTION), **peft("single_transformer_blocks.0.proj_out", WIDTH)}, "flux"),
}


@pytest.mark.parametrize("case", CASES)
def test_family_of_a_lora(tmp_path, case):
    shapes, family = CASES[case]
    path = tmp_path / "lora.safetensors"
    write_shapes(path, shapes)
    assert lora_family(path) == family
