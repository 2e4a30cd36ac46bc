"""Model families: one folder each (its networks, weight mappers, LoRA rules and `SPEC`), listed once here.

`FAMILIES` is the one list detection iterates: the specific families first, since a ComfyUI file of a DiT
family shares SD's `model.diffusion_model.` prefix. Adding a family is a folder and a line here
(docs/architecture.md). Nothing outside the families branches on a family's name; everything asks its spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mlx_sd_server.engine.components import ComponentKind
from mlx_sd_server.engine.families.flux.spec import SPEC as FLUX
from mlx_sd_server.engine.families.flux2.spec import SPEC as FLUX2
from mlx_sd_server.engine.families.qwenimage.spec import SPEC as QWENIMAGE
from mlx_sd_server.engine.families.sd.spec import SPEC as SD
from mlx_sd_server.engine.families.sd3.spec import SPEC as SD3
from mlx_sd_server.engine.families.spec import Capabilities, FamilySpec
from mlx_sd_server.engine.families.zimage.spec import SPEC as ZIMAGE

# FLUX.2's files have FLUX.1's double_blocks too, Qwen-Image's LoRAs FLUX.1's attention names; SD3's LoRA rule
# takes any diffusers transformer left.
FAMILIES: tuple[FamilySpec, ...] = (QWENIMAGE, FLUX2, FLUX, ZIMAGE, SD3, SD)


class UnknownFamilyError(ValueError):
    """A manifest or file names no family this version serves."""


def spec_for(family: str) -> FamilySpec:
    """The spec serving a manifest's `family` (sd1, sdxl, flux, ...)."""
    for spec in FAMILIES:
        if family in spec.manifest_names:
            return spec
    raise UnknownFamilyError(f"unsupported model family {family!r}")


def capabilities(manifest: Mapping[str, Any], has_controlnet: bool = False) -> Capabilities:
    return spec_for(manifest["family"]).capabilities(manifest, has_controlnet)


def family_of_denoiser(class_name: str | None) -> FamilySpec | None:
    """The family whose diffusers denoiser class this is."""
    return next((spec for spec in FAMILIES if class_name in spec.detect.diffusers_classes), None)


def family_of_single_file(names: Iterable[str]) -> FamilySpec | None:
    """The family whose original-layout denoiser a single file's tensor names show, first match in FAMILIES."""
    names = list(names)
    return next((spec for spec in FAMILIES if spec.detect.single_file(names)), None)


def component_kinds() -> dict[str, ComponentKind]:
    """Every network any family has, by the class names configs give them."""
    return {name: kind for spec in FAMILIES for kind in spec.kinds() for name in kind.class_names}
