"""A kind of network a model folder may hold: how to build it from its config and map its weights.

Kinds are declared beside their networks (text encoders in `engine/text`, the VAE in `engine/vae.py`, the
denoisers in their family's folder) and listed in the families' component tables (`families/spec.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# A weight mapper: one (key, value) in diffusers/transformers names -> ours, maybe none or several.
Mapper = Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]


@dataclass(frozen=True)
class ComponentKind:
    """One network: the diffusers/transformers classes it stands for, its config and module classes, its
    weight mapper, the tokenizer a text encoder carries, and its precision and quantization rules."""

    class_names: tuple[str, ...]  # as a config.json names them (`_class_name` or `architectures`)
    config_class: Any  # a dataclass with `from_dict`
    model_class: Callable[[Any], nn.Module]  # a module class, built from an instance of config_class
    mapper: Mapper
    tokenizer_class: Any = None  # text encoders: the tokenizer saved beside them (has `from_dir`)
    # Networks that overflow in float16 (T5) run in this dtype instead when float16 is asked for.
    instead_of_float16: mx.Dtype | None = None
    quantizable: bool = True  # its Linear layers may be quantized by `convert --quantize`
    # Parameters (names ending so) stored and run in float32 whatever the dtype: statistics that a cast would
    # round and that the computation reads in float32 (FLUX.2's latent batch norm).
    float32_parameters: tuple[str, ...] = ()

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        return self.model_class(self.config_class.from_dict(dict(config)))

    def keeps_float32(self, key: str) -> bool:
        return key.endswith(self.float32_parameters) if self.float32_parameters else False
