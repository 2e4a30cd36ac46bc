"""LoRA branches (engine/adapters.py): a wrapped layer equals the layer with the fused weight W + scale * up @ down,
for plain, quantized and convolutional layers; `applied` puts them on a model and always takes them off."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd_server.engine.ops.layers import Conv2d, Linear
from mlx_sd_server.engine.adapters import Adapter, AdaptedLayer as LoRALayer, applied, fused, get_layer

rng = np.random.default_rng(0)


def randn(*shape: int, scale: float = 1.0) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32) * scale)


def max_rel_err(ours: mx.array, reference: mx.array) -> float:
    return float(mx.max(mx.abs(ours - reference)) / mx.max(mx.abs(reference)))


def adapter(out_dims: int, in_shape: tuple[int, ...], rank: int = 4, scale: float = 0.7) -> Adapter:
    return Adapter(randn(rank, *in_shape, scale=0.2), randn(out_dims, rank, scale=0.2), scale)


def delta(a: Adapter) -> mx.array:
    """scale * up @ down, shaped like the layer's weight."""
    return a.scale * (a.up @ a.down.reshape(a.down.shape[0], -1)).reshape(a.up.shape[0], *a.down.shape[1:])


def test_a_linear_branch_equals_the_fused_weight():
    layer = Linear(48, 40)
    a, b = adapter(40, (48,)), adapter(40, (48,), rank=8, scale=-0.4)
    x = randn(2, 5, 48)
    fused = Linear(48, 40)
    fused.update({"weight": layer.weight + delta(a) + delta(b), "bias": layer.bias})
    assert max_rel_err(LoRALayer(layer, [a, b])(x), fused(x)) < 1e-5


def test_a_quantized_linear_takes_a_branch_on_its_dequantized_weight():
    layer = Linear(128, 64)
    quantized = layer.to_quantized(group_size=64, bits=4)
    a = adapter(64, (128,))
    x = randn(3, 7, 128)
    weight = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, 64, 4)
    reference = x @ (weight + delta(a)).T + quantized.bias
    assert max_rel_err(LoRALayer(quantized, [a])(x), reference) < 1e-5


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_a_locon_branch_on_a_conv_equals_the_fused_kernel(kernel, stride, padding):
    layer = Conv2d(6, 10, kernel, stride=stride, padding=padding)
    a = adapter(10, (kernel, kernel, 6))
    x = randn(2, 9, 11, 6)
    fused = Conv2d(6, 10, kernel, stride=stride, padding=padding)
    fused.update({"weight": layer.weight + delta(a), "bias": layer.bias})
    assert max_rel_err(LoRALayer(layer, [a])(x), fused(x)) < 1e-5


@pytest.mark.parametrize("layer, in_shape", [(Linear(48, 40), (48,)), (Conv2d(6, 40, 3, padding=1), (3, 3, 6))])
def test_a_fused_copy_equals_the_side_branch_and_leaves_the_layer_alone(layer, in_shape):
    a, b = adapter(40, in_shape), adapter(40, in_shape, rank=2, scale=-1.3)
    x = randn(2, 5, 7, in_shape[-1]) if len(in_shape) == 3 else randn(3, 48)
    weight, before = layer.weight, layer(x)
    copied = fused(layer, [a, b])
    assert type(copied) is type(layer) and copied.bias is layer.bias and layer.weight is weight
    assert max_rel_err(copied(x), LoRALayer(layer, [a, b])(x)) < 1e-5
    assert mx.array_equal(layer(x), before)


def test_half_precision_layers_keep_their_dtype():
    layer = Linear(32, 16)
    layer.set_dtype(mx.float16)
    out = LoRALayer(layer, [adapter(16, (32,))])(randn(4, 32).astype(mx.float16))
    assert out.dtype == mx.float16


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = [Linear(8, 8), Linear(8, 8)]
        self.out = Linear(8, 4)

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class Loaded:
    """What `applied` reads of a LoadedModel."""

    def __init__(self):
        self.manifest = {"components": {"unet": {}}}
        self.components = {"unet": Tiny()}
        self.text_encoders = {}


def test_applied_wraps_for_the_duration_and_restores_the_very_same_layers():
    model = Loaded()
    tiny = model.components["unet"]
    before = [tiny.blocks[0], tiny.blocks[1], tiny.out]
    x = randn(3, 8)
    base = tiny(x)
    first = {"unet": {"blocks.1": adapter(8, (8,)), "out": adapter(4, (8,))}}
    second = {"unet": {"out": adapter(4, (8,), scale=0.3)}}
    with applied(model, [(first, 0.6), (second, -1.0)]):
        assert isinstance(tiny.blocks[1], LoRALayer) and isinstance(tiny.out, LoRALayer)
        assert len(tiny.out.adapters) == 2 and tiny.out.adapters[1].scale == pytest.approx(-0.3)
        assert tiny.blocks[0] is before[0]
        assert float(mx.max(mx.abs(tiny(x) - base))) > 1e-3
    assert [tiny.blocks[0], tiny.blocks[1], tiny.out] == before
    assert mx.array_equal(tiny(x), base)


def test_applied_fuses_float_layers_within_the_budget_and_branches_the_rest():
    model = Loaded()
    model.components["unet"] = tiny = Tiny()
    tiny.blocks, tiny.out = [Linear(8, 8), Linear(8, 64)], Linear(64, 4)
    bound = {"unet": {"blocks.0": adapter(8, (8,)), "blocks.1": adapter(64, (8,)), "out": adapter(4, (64,))}}
    x = randn(3, 8)
    with applied(model, [(bound, 1.0)], fuse_budget=10**9):
        everything_fused = tiny(x)
        assert not any(isinstance(layer, LoRALayer) for layer in (*tiny.blocks, tiny.out))
    budget = tiny.blocks[0].weight.nbytes + tiny.out.weight.nbytes  # not blocks.1 as well
    with applied(model, [(bound, 1.0)], fuse_budget=budget):
        assert isinstance(tiny.blocks[1], LoRALayer) and not isinstance(tiny.out, LoRALayer)
        assert max_rel_err(tiny(x), everything_fused) < 1e-5
    with applied(model, [(bound, 1.0)]):
        assert all(isinstance(layer, LoRALayer) for layer in (*tiny.blocks, tiny.out))
        assert max_rel_err(tiny(x), everything_fused) < 1e-5


def test_quantized_layers_always_take_a_side_branch():
    model = Loaded()
    model.components["unet"] = tiny = Tiny()
    tiny.blocks, tiny.out = [Linear(8, 8), Linear(8, 64)], Linear(64, 4).to_quantized(group_size=64, bits=8)
    with applied(model, [({"unet": {"out": adapter(4, (64,))}}, 1.0)], fuse_budget=10**9):
        assert isinstance(tiny.out, LoRALayer)


def test_applied_restores_on_failure():
    model = Loaded()
    tiny = model.components["unet"]
    out = tiny.out
    with pytest.raises(RuntimeError):
        with applied(model, [({"unet": {"out": adapter(4, (8,))}}, 1.0)]):
            raise RuntimeError("cancelled")
    assert tiny.out is out and get_layer(tiny, "blocks.0") is tiny.blocks[0]
