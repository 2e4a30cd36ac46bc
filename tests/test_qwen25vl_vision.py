"""MLX Qwen2.5-VL vision side against transformers: the image processor (Qwen2VLImageProcessorPil), the vision
tower (`model.visual`, `get_image_features`) and the 3D positions (`get_rope_index`)."""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from parity import load_torch_weights, max_rel_err
from PIL import Image
from tiny_qwen25vl import qwen25vl_model, token_id

from mlx_sd_server.engine.model_io import quantizable
from mlx_sd_server.engine.text.qwen25vl_vision import (
    Qwen2VLImageProcessorConfig,
    Qwen25VLVisionConfig,
    Qwen25VLVisionModel,
    image_token_counts,
    map_qwen25vl_vision_weight,
    preprocess,
    rope_index,
    smart_resize,
)

TOLERANCE = 1e-4
# Qwen-Image-Edit's processor/preprocessor_config.json (Qwen2.5-VL-7B-Instruct's).
RELEASED_PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": 2,
    "min_pixels": 3136,
    "patch_size": 14,
    "processor_class": "Qwen2_5_VLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "temporal_patch_size": 2,
}


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: bicubic resampling of pure noise would be a weak check of the filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def reference_processor(config: dict):
    from transformers import Qwen2VLImageProcessorPil

    keys = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "resample")
    return Qwen2VLImageProcessorPil(**{k: config[k] for k in keys if k in config})


# --- the image processor -----------------------------------------------------------------------------


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    sizes = [(97, 131), (1, 57), (27, 29), (1023, 1), (4000, 3001), (14, 2000), (513, 767), (55, 56)]
    for min_pixels, max_pixels in [(3136, 12845056), (3136, 28 * 28 * 64), (56 * 56 * 20, 28 * 28 * 1280)]:
        for h, w in sizes:
            try:
                expected = reference(h, w, 28, min_pixels, max_pixels)
            except ValueError:
                with pytest.raises(ValueError):
                    smart_resize(h, w, 28, min_pixels, max_pixels)
                continue
            assert smart_resize(h, w, 28, min_pixels, max_pixels) == expected, (h, w, min_pixels, max_pixels)


PROCESSOR_CASES: dict[str, tuple[list[tuple[int, int, str]], dict[str, Any]]] = {
    # one odd-sized image, resized up and down to multiples of 28
    "one": ([(97, 131, "RGB")], RELEASED_PREPROCESSOR),
    # two images of different odd sizes (one below min_pixels), transparency composited on white, grayscale
    "two": ([(211, 157, "RGB"), (33, 45, "RGBA")], RELEASED_PREPROCESSOR),
    "modes": ([(61, 95, "L"), (129, 71, "P"), (85, 87, "RGBA")], RELEASED_PREPROCESSOR),
    # over max_pixels: scaled down keeping the aspect ratio
    "max_pixels": ([(531, 389, "RGB"), (389, 531, "RGB")], {**RELEASED_PREPROCESSOR, "max_pixels": 28 * 28 * 40}),
    # transformers' defaults and another filter
    "defaults": ([(301, 203, "RGB")], {"resample": 2}),
}


@pytest.mark.parametrize("case", PROCESSOR_CASES)
def test_preprocess_matches_transformers(case):
    specs, config = PROCESSOR_CASES[case]
    images = [random_image(w, h, seed, mode) for seed, (w, h, mode) in enumerate(specs)]
    expected = reference_processor(config)(images=images, return_tensors="np")
    pixel_values, grid_thw = preprocess(images, Qwen2VLImageProcessorConfig.from_dict(config))
    assert pixel_values.dtype == np.float32 and grid_thw.dtype == np.int64
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert pixel_values.shape == expected["pixel_values"].shape
    error = float(np.abs(pixel_values - expected["pixel_values"]).max())
    print(f"{case}: pixel_values {pixel_values.shape}, grids {grid_thw.tolist()}, max abs err {error:.1e}")
    assert error <= 1e-6


def test_processor_config_from_dict():
    released = Qwen2VLImageProcessorConfig.from_dict(RELEASED_PREPROCESSOR)
    assert (released.min_pixels, released.max_pixels, released.factor) == (3136, 12845056, 28)
    # transformers 5's files: the bounds under `size`; explicit min/max_pixels win over it
    sized = Qwen2VLImageProcessorConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 200000}})
    assert (sized.min_pixels, sized.max_pixels) == (100, 200000)
    both = Qwen2VLImageProcessorConfig.from_dict(
        {"size": {"shortest_edge": 100, "longest_edge": 200000}, "max_pixels": 300000}
    )
    assert (both.min_pixels, both.max_pixels) == (100, 300000)


def test_preprocess_without_resize_or_conversion():
    config = Qwen2VLImageProcessorConfig(do_resize=False)
    image = random_image(84, 56, 0)
    expected = reference_processor({})(images=[image], do_resize=False, return_tensors="np")
    pixel_values, grid_thw = preprocess([image], config)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert float(np.abs(pixel_values - expected["pixel_values"]).max()) <= 1e-6
    with pytest.raises(ValueError, match="multiples of 28"):
        preprocess([random_image(85, 56, 0)], config)
    with pytest.raises(ValueError, match="do_convert_rgb"):
        preprocess([random_image(84, 56, 0, "RGBA")], Qwen2VLImageProcessorConfig(do_convert_rgb=False))
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess([random_image(2000, 3, 0)], Qwen2VLImageProcessorConfig())


# --- the vision tower --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return qwen25vl_model(seed=3)


def build_tower(reference, state_dict=None) -> Qwen25VLVisionModel:
    config = Qwen25VLVisionConfig.from_dict(reference.config.to_dict())
    model = Qwen25VLVisionModel(config)
    load_torch_weights(model, reference.state_dict() if state_dict is None else state_dict, map_qwen25vl_vision_weight)
    return model


def reference_embeddings(reference, pixel_values: np.ndarray, grid_thw: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        out = reference.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid_thw))
    return out.pooler_output


# Image sizes (width, height), resized to 140x84 (merge blocks 5x3: two windows of 4x4 blocks, padded),
# 168x224 (6x8: 2x2 windows, a padded column, an empty window row in transformers' index), 392x308 (14x11:
# 4x3 windows, ragged), 56x84 (2x3: one window).
TOWER_CASES = {"one": [(131, 97)], "two": [(157, 211), (131, 97)], "three": [(392, 308), (61, 95), (157, 211)]}


@pytest.mark.parametrize("case", TOWER_CASES)
def test_vision_tower_matches_transformers(case, reference):
    images = [random_image(w, h, seed) for seed, (w, h) in enumerate(TOWER_CASES[case])]
    pixel_values, grid_thw = preprocess(images, Qwen2VLImageProcessorConfig.from_dict(RELEASED_PREPROCESSOR))
    model = build_tower(reference)
    ours = model(mx.array(pixel_values), grid_thw)
    expected = reference_embeddings(reference, pixel_values, grid_thw)
    assert ours.shape == (sum(image_token_counts(grid_thw, 2)), 64) and ours.dtype == mx.float32
    error = max_rel_err(ours, expected)
    # and as the language model reads them: get_image_features, split per image
    with torch.no_grad():
        split = reference.model.get_image_features(
            torch.from_numpy(pixel_values), torch.from_numpy(grid_thw)
        ).pooler_output
    assert [len(s) for s in split] == image_token_counts(grid_thw, 2)
    assert max_rel_err(ours, torch.cat(split)) == error
    print(f"{case}: grids {grid_thw.tolist()}, embeddings {ours.shape}, max rel err {error:.1e}")
    assert error <= TOLERANCE


def test_vision_tower_small_windows_and_frames():
    """window_size 56 (2x2 merge blocks a window, many ragged windows) and grids of 2 frames (each frame its
    own full-attention segment), on random pixel values."""
    reference = qwen25vl_model(seed=5, vision_overrides={"window_size": 56, "fullatt_block_indexes": [2]})
    model = build_tower(reference)
    grid_thw = np.array([[1, 6, 10], [2, 4, 6], [1, 10, 4]], dtype=np.int64)
    pixel_values = np.random.default_rng(0).normal(size=(int(grid_thw.prod(-1).sum()), 1176)).astype(np.float32)
    error = max_rel_err(
        model(mx.array(pixel_values), grid_thw), reference_embeddings(reference, pixel_values, grid_thw)
    )
    print(f"window 56, frames: max rel err {error:.1e}")
    assert error <= TOLERANCE


def test_attention_stays_within_each_image(reference):
    """Each image's embeddings are the same alone as beside another."""
    model = build_tower(reference)
    config = Qwen2VLImageProcessorConfig.from_dict(RELEASED_PREPROCESSOR)
    images = [random_image(157, 211, 0), random_image(131, 97, 1)]
    together = model(*(mx.array(a) for a in preprocess(images, config)))
    alone = [model(*(mx.array(a) for a in preprocess([image], config))) for image in images]
    assert max_rel_err(together, mx.concatenate(alone)) <= 1e-6


def test_both_checkpoint_layouts_load(reference, tmp_path):
    """transformers 5's state dict (`model.visual.*`) and the released files' (`visual.*`, as save_pretrained
    writes them) give the same tower; the language model's keys are left out."""
    from safetensors.torch import load_file

    reference.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("visual.") for k in saved) and not any(k.startswith("model.visual.") for k in saved)
    from_state = build_tower(reference)
    from_file = build_tower(reference, saved)
    for (name, a), (_, b) in zip(sorted(_flat(from_state)), sorted(_flat(from_file)), strict=True):
        assert mx.array_equal(a, b).item(), name
    assert map_qwen25vl_vision_weight("model.language_model.layers.0.mlp.up_proj.weight", np.zeros(1)) == []
    assert map_qwen25vl_vision_weight("lm_head.weight", np.zeros(1)) == []
    weight = np.arange(4 * 3 * 2 * 14 * 14, dtype=np.float32).reshape(4, 3, 2, 14, 14)
    [(name, flat)] = map_qwen25vl_vision_weight("visual.patch_embed.proj.weight", weight)
    assert name == "patch_embed.proj.weight" and flat.shape == (4, 1176)
    config = json.loads((tmp_path / "config.json").read_text())
    assert Qwen25VLVisionConfig.from_dict(config) == Qwen25VLVisionConfig.from_dict(config["vision_config"])


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_released_vision_config():
    """Qwen-Image's text_encoder/config.json vision_config (transformers 4's names): the defaults."""
    released = {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    }
    assert Qwen25VLVisionConfig.from_dict({"vision_config": released}) == Qwen25VLVisionConfig()
    with pytest.raises(ValueError, match="axial"):
        Qwen25VLVisionConfig.from_dict({**released, "rope_parameters": {"rope_type": "default"}})
    with pytest.raises(ValueError, match="silu"):
        Qwen25VLVisionModel(Qwen25VLVisionConfig(hidden_act="gelu", depth=1))


def test_input_checks(reference):
    model = build_tower(reference)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(mx.zeros((15, 1176)), [[1, 3, 5]])
    with pytest.raises(ValueError, match="expected"):
        model(mx.zeros((23, 1176)), [[1, 4, 6]])


def test_quantized_tower(reference):
    """nn.quantize (as `convert --quantize` chooses: Linear layers whose input size the group size divides)."""
    model = build_tower(reference)
    pixel_values, grid_thw = preprocess([random_image(157, 211, 0)], Qwen2VLImageProcessorConfig())
    full = model(mx.array(pixel_values), grid_thw)
    nn.quantize(model, group_size=32, bits=8, class_predicate=quantizable(32))
    quantized = [path for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert "blocks.0.attn.qkv" in quantized and "merger.mlp.2" in quantized
    assert "patch_embed.proj" not in quantized  # 1176 inputs: not a multiple of 32
    error = max_rel_err(model(mx.array(pixel_values), grid_thw), full)
    print(f"8-bit: max rel err against float32 {error:.1e}")
    assert 0 < error <= 0.05


# --- 3D positions ------------------------------------------------------------------------------------


def prompt(grids: list[list[int]], text: list[int]) -> list[int]:
    """Text pieces around <|vision_start|> <|image_pad|> x n <|vision_end|>, as Qwen-Image-Edit-Plus's
    "Picture 1: ..." template places them."""
    ids = list(text[:3])
    for count in image_token_counts(grids, 2):
        ids += [token_id("<|vision_start|>"), *[token_id("<|image_pad|>")] * count, token_id("<|vision_end|>")]
        ids += text[3:5]
    return ids + text[5:]


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_matches_transformers(side, reference):
    """Two prompts, three images (two in the first), the shorter prompt padded."""
    grids = [[1, 6, 10], [1, 16, 12], [1, 22, 28]]
    text = list(range(10, 20))
    rows = [prompt(grids[:2], text), prompt(grids[2:], text[:7])]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, span], mask[i, span] = row, 1
    assert not mask.all()
    image_token = reference.config.image_token_id
    with torch.no_grad():
        expected, _ = reference.model.get_rope_index(
            torch.from_numpy(ids),
            mm_token_type_ids=torch.from_numpy((ids == image_token).astype(np.int32)),
            image_grid_thw=torch.tensor(grids),
            attention_mask=torch.from_numpy(mask),
        )
    config = Qwen25VLVisionConfig.from_dict(reference.config.to_dict())
    ours = rope_index(ids, np.array(grids), mask, config, image_token_id=image_token)
    assert ours.shape == (3, *ids.shape)
    np.testing.assert_array_equal(np.array(ours), expected.numpy())
    # without a mask: every token counts
    with torch.no_grad():
        unmasked, _ = reference.model.get_rope_index(
            torch.from_numpy(ids[:1]),
            mm_token_type_ids=torch.from_numpy((ids[:1] == image_token).astype(np.int32)),
            image_grid_thw=torch.tensor(grids[:2]),
        )
    np.testing.assert_array_equal(np.array(rope_index(ids[:1], grids[:2], None, config, image_token)), unmasked.numpy())


def test_rope_index_refuses_mismatched_images(reference):
    config = Qwen25VLVisionConfig.from_dict(reference.config.to_dict())
    image = token_id("<|image_pad|>")
    ids = np.array([[1, 2, *[image] * 15, 3]])
    with pytest.raises(ValueError, match="15 tokens"):
        rope_index(ids, [[1, 6, 12]], None, config, image)
    with pytest.raises(ValueError, match="more image runs"):
        rope_index(ids, np.zeros((0, 3), np.int64), None, config, image)
    with pytest.raises(ValueError, match="more images"):
        rope_index(ids, [[1, 6, 10], [1, 2, 2]], None, config, image)


@pytest.mark.realsize
def test_vision_tower_real_widths():
    """Qwen2.5-VL-7B's tower widths (16 heads of 80, MLP 3420, merger 5120 -> 3584), two blocks (one windowed, one
    full) instead of 32: what only shows at the released sizes (the 80-wide heads' 20 + 20 rotary frequencies).
    Run with `-m realsize`."""
    from tiny_qwen3 import randomize
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    vision = dict(
        depth=2,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[1],
        hidden_act="silu",
    )
    text = dict(
        hidden_size=3584,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=32,
        bos_token_id=None,
        eos_token_id=None,
    )
    reference = randomize(Qwen2_5_VLModel(Qwen2_5_VLConfig(vision_config=vision, text_config=text)), 0, scale=0.02)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
                param.add_(1.0)
    model = Qwen25VLVisionModel(Qwen25VLVisionConfig.from_dict(reference.config.to_dict()))
    state = {f"model.{k}": v for k, v in reference.state_dict().items() if k.startswith("visual.")}
    load_torch_weights(model, state, map_qwen25vl_vision_weight)
    images = [random_image(451, 337, 0), random_image(203, 301, 1)]
    pixel_values, grid_thw = preprocess(images, Qwen2VLImageProcessorConfig.from_dict(RELEASED_PREPROCESSOR))
    with torch.no_grad():
        expected = reference.visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid_thw)).pooler_output
    error = max_rel_err(model(mx.array(pixel_values), grid_thw), expected)
    print(f"real widths: grids {grid_thw.tolist()}, max rel err {error:.1e}")
    assert error <= TOLERANCE
