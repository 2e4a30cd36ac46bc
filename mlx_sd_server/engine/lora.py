"""LoRA as low-rank side branches, put on a loaded model for one job and taken off after it.

A LoRA adapts a layer's weight by `scale * up @ down` (rank r much smaller than the layer). Rather than
change the base weights (which may be quantized, and which the next request must get back unchanged), an
adapted layer is wrapped for the job's duration: `y = base(x) + sum(scale * up(down(x)))`. The base layer
is untouched, so switching LoRAs costs no reload, quantized layers take LoRAs as plain ones do, and a job
without LoRAs runs the base layers alone (bench/lora.py measures the branch against a fused weight).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.model_io import TEXT_ENCODERS, LoadedModel


class Adapter(NamedTuple):
    """One LoRA's branch on one layer, in our layout: `down` (rank, in) for a linear layer or
    (rank, kh, kw, in) for a convolution (OHWI, as our Conv2d's weight); `up` (out, rank)."""

    down: mx.array
    up: mx.array
    scale: float  # the LoRA's own (alpha / rank) times the weight the request gives it


class LoRALayer(nn.Module):
    """A Linear, QuantizedLinear or Conv2d plus its LoRA branches. Branches run in float32."""

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
    if component in TEXT_ENCODERS:
        present = [name for name in TEXT_ENCODERS if name in model.manifest["components"]]
        return model.text_encoders[present.index(component)]
    return model.components[component]


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


# A LoRA bound to a model: per component, per layer path (ours), the branch at weight 1.
BoundLoRA = dict[str, dict[str, Adapter]]


@contextmanager
def applied(model: LoadedModel, loras: list[tuple[BoundLoRA, float]]) -> Iterator[None]:
    """Wrap the layers `loras` adapt (each at its weight) for the duration; the base layers come back after,
    also when the job fails or is cancelled."""
    branches: dict[tuple[str, str], list[Adapter]] = {}
    for bound, weight in loras:
        for component, layers in bound.items():
            for path, adapter in layers.items():
                branches.setdefault((component, path), []).append(adapter._replace(scale=adapter.scale * weight))
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for (component, path), adapters in branches.items():
            root = component_module(model, component)
            layer = get_layer(root, path)
            originals.append((root, path, layer))
            _set_layer(root, path, LoRALayer(layer, adapters))
        yield
    finally:
        for root, path, layer in reversed(originals):
            _set_layer(root, path, layer)
