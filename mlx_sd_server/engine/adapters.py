"""Low-rank adapters (LoRAs) put on a loaded model for one job and taken off after it, the base model never
changed. What the adapters are read from (LoRA files, the LoRA folder) is `mlx_sd_server.lora`'s business: the
pipeline gets them, bound to the model's layers, through its `loras` callable.

An adapter changes a layer's weight by `scale * up @ down` (rank r much smaller than the layer). For the
job's duration each adapted layer is replaced, and the original layer object is put back after (also when the
job fails or is cancelled), so switching LoRAs costs no reload and the next request gets the base model exactly:

- side branch (`AdaptedLayer`, the default): `y = base(x) + sum(scale * up(down(x)))`. No copy of any weight,
  and quantized layers (whose dequantized copy would be 4-8 times their size) take it as plain ones do.
- fused: a copy of the layer whose weight is W + sum(scale * up @ down), for float layers while their
  weights fit `fuse_budget` bytes (`serve --lora-fuse-gb`). The copies cost the adapted weights' memory for
  the job and the fusing time at every switch; a step then runs exactly the base model's work.

bench/lora.py measures both against no LoRA. SD 1.5 on this CPU (rank 16/32 on all 192 attention layers):
neither changes a step's time beyond the run-to-run noise (~10%), fusing costs ~0.4 s per switch and 1 GB;
hence side branches by default. A job without LoRAs runs the base layers alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.model_io import LoadedModel


class Adapter(NamedTuple):
    """One LoRA's branch on one layer, in our layout: `down` (rank, in) for a linear layer or
    (rank, kh, kw, in) for a convolution (OHWI, as our Conv2d's weight); `up` (out, rank)."""

    down: mx.array
    up: mx.array
    scale: float  # the LoRA's own (alpha / rank) times the weight the request gives it


class AdaptedLayer(nn.Module):
    """A Linear, QuantizedLinear or Conv2d plus its low-rank branches. Branches run in float32."""

    def __init__(self, base: nn.Module, adapters: list[Adapter]):
        super().__init__()
        self.base = base
        # Outside the module's parameter tree: the branches are not the model's weights.
        object.__setattr__(self, "adapters", adapters)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x).astype(mx.float32)
        x32 = x.astype(mx.float32)
        for down, up, scale in self.adapters:
            if down.ndim == 4:  # a LoCon convolution: a down conv of the base's kernel, a 1x1 up
                h = mx.conv2d(x32, down, stride=self.base.stride, padding=self.base.padding)
            else:
                h = x32 @ down.T
            y = y + (scale * h) @ up.T
        return y.astype(x.dtype)


def component_module(model: LoadedModel, component: str) -> nn.Module:
    """A loaded model's component by its manifest name, text encoders included."""
    return model.text_encoders[component] if component in model.text_encoders else model.components[component]


def get_layer(root: nn.Module, path: str) -> nn.Module:
    node = root
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set_layer(root: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_layer(root, parent_path) if parent_path else root
    if isinstance(parent, list):
        parent[int(name)] = layer
    else:
        parent[name] = layer


# One LoRA bound to a model: per component, per layer path (ours), its branch at weight 1.
Adapters = dict[str, dict[str, Adapter]]


def fused(layer: nn.Module, adapters: list[Adapter]) -> nn.Module:
    """A copy of a Linear or Conv2d (OHWI) with the adapters' deltas added into its weight, in float32."""
    weight = layer.weight.astype(mx.float32)
    for down, up, scale in adapters:
        weight = weight + (scale * (up @ down.reshape(down.shape[0], -1))).reshape(weight.shape)
    copied = copy.copy(layer)  # shares every other parameter; the original keeps its own weight
    copied.weight = weight.astype(layer.weight.dtype)
    mx.eval(copied.weight)
    return copied


@contextmanager
def applied(model: LoadedModel, loras: list[tuple[Adapters, float]], fuse_budget: int = 0) -> Iterator[None]:
    """Put `loras` (each at its weight) on the model for the duration: float layers fused while their weights
    fit in `fuse_budget` bytes, the rest as side branches. The original layers come back after."""
    adapted: dict[tuple[str, str], list[Adapter]] = {}
    for bound, weight in loras:
        for component, layers in bound.items():
            for path, adapter in layers.items():
                adapted.setdefault((component, path), []).append(adapter._replace(scale=adapter.scale * weight))
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for (component, path), adapters in adapted.items():
            root = component_module(model, component)
            layer = get_layer(root, path)
            originals.append((root, path, layer))
            if not isinstance(layer, nn.QuantizedLinear) and layer.weight.nbytes <= fuse_budget:
                fuse_budget -= layer.weight.nbytes
                _set_layer(root, path, fused(layer, adapters))
            else:
                _set_layer(root, path, AdaptedLayer(layer, adapters))
        yield
    finally:
        for root, path, layer in reversed(originals):
            _set_layer(root, path, layer)
