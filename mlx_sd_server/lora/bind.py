"""A LoRA read from its file (diffusers layer names) bound to a loaded model: its factors in our layers' names
and layouts, checked to fit, ready for the pipeline to put on (engine/adapters.py)."""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn

from mlx_sd_server.engine.adapters import Adapter, Adapters, component_module, get_layer
from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.model_io import TEXT_ENCODERS, LoadedModel, component_kind
from mlx_sd_server.lora.formats import LoRAFile

log = logging.getLogger(__name__)


def bind(lora: LoRAFile, model: LoadedModel, name: str) -> Adapters:
    """A LoRA in diffusers layout as branches on our layers. Each factor goes through its component's weight
    mapper, as a weight of that layer would: a conv's `down` is a kernel (to OHWI), SD1's 1x1-conv proj_in
    a matrix, CLIP's container prefixes go. Every layer must exist and fit, or the LoRA is refused."""
    model_name = model.manifest.get("name", model.folder.name)
    bound: Adapters = {}
    for component, layers in lora.layers.items():
        entry = model.manifest["components"].get(component)
        if entry is None and component in TEXT_ENCODERS:  # an SD3 model converted without T5: nothing to adapt
            log.info(
                "LoRA %s: %s has no %s, so that part of the LoRA has nothing to adapt", name, model_name, component
            )
            continue
        if entry is None:
            raise JobError(
                f"LoRA {name!r} adapts a {component}, which {model_name} does not have", "loras", "lora_mismatch"
            )
        mapper = component_kind(component, entry["config"]).mapper
        root = component_module(model, component)
        bound[component] = {}
        for path, layer in layers.items():
            ((key, down),) = mapper(f"{path}.weight", layer.down)
            ((_, up),) = mapper(f"{path}.weight", layer.up)
            ours = key.removesuffix(".weight")
            adapter = Adapter(mx.array(down), mx.array(up.reshape(up.shape[0], -1)), layer.scale)
            _check_fits(adapter, root, ours, f"LoRA {name!r} does not fit {model_name}: {component}.{path}")
            bound[component][ours] = adapter
    return bound


def _check_fits(adapter: Adapter, root: nn.Module, path: str, what: str) -> None:
    try:
        layer = get_layer(root, path)
    except (KeyError, IndexError, ValueError, AttributeError):
        raise JobError(f"{what}: the model has no such layer", "loras", "lora_mismatch") from None
    in_shape: tuple[int, ...]
    if isinstance(layer, nn.QuantizedLinear):  # packed: its sizes are in the scales
        out_dims, in_shape = layer.scales.shape[0], (layer.scales.shape[1] * layer.group_size,)
    elif isinstance(layer, nn.Linear):
        out_dims, in_shape = layer.weight.shape[0], (layer.weight.shape[1],)
    elif isinstance(layer, nn.Conv2d):  # OHWI: the down conv has the base's kernel size
        out_dims, in_shape = layer.weight.shape[0], tuple(layer.weight.shape[1:])
    else:
        raise JobError(f"{what}: a {type(layer).__name__} takes no LoRA", "loras", "lora_mismatch")
    if tuple(adapter.down.shape[1:]) != in_shape or tuple(adapter.up.shape) != (out_dims, adapter.down.shape[0]):
        raise JobError(
            f"{what}: factors {tuple(adapter.up.shape)} x {tuple(adapter.down.shape)} do not fit a layer "
            f"of {out_dims} x {in_shape}",
            "loras",
            "lora_mismatch",
        )
