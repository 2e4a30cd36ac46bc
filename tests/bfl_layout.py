"""diffusers FluxTransformer2DModel -> Black Forest Labs' original FLUX transformer layout (flux1-*.safetensors).

The inverse of `engine.families.flux.single_file`'s mapping, written from the layout's description so that tests
can make tiny BFL files; the tests check it against diffusers' own converter (convert_flux_transformer_checkpoint_to_diffusers).
Works on torch tensors, meta tensors included (real-size shapes without memory).
"""

from __future__ import annotations

from pathlib import Path

import torch

# diffusers module -> BFL module, outside the blocks.
TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # with its halves swapped: BFL's is (shift, scale)
}
DOUBLE = {  # transformer_blocks.N.* -> double_blocks.N.*
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
SINGLE = {  # single_transformer_blocks.N.* -> single_blocks.N.*
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
# BFL's fused projections: their diffusers parts, concatenated along the output axis in this order.
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
BLOCKS = (("transformer_blocks", "double_blocks", DOUBLE, DOUBLE_FUSED),
          ("single_transformer_blocks", "single_blocks", SINGLE, SINGLE_FUSED))


def bfl_state(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in BFL names (RMSNorm weights are `scale`), keys under `prefix`."""
    state = dict(state)
    out = {}
    for block, bfl_block, names, fused in BLOCKS:
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith(block + ".")})
        for i in indices:
            for bfl, parts in fused.items():
                for param in ("weight", "bias"):
                    out[f"{bfl_block}.{i}.{bfl}.{param}"] = torch.cat(
                        [state.pop(f"{block}.{i}.{part}.{param}") for part in parts])
            for diffusers, bfl in names.items():
                for param in ("weight", "bias"):
                    if (key := f"{block}.{i}.{diffusers}.{param}") in state:
                        bfl_param = "scale" if bfl.endswith("_norm") else param
                        out[f"{bfl_block}.{i}.{bfl}.{bfl_param}"] = state.pop(key)
    for diffusers, bfl in TOP_LEVEL.items():
        for param in ("weight", "bias"):
            if (key := f"{diffusers}.{param}") in state:
                value = state.pop(key)
                if diffusers == "norm_out.linear":
                    scale, shift = value.chunk(2)
                    value = torch.cat([shift, scale])
                out[f"{bfl}.{param}"] = value
    if state:
        raise KeyError(f"no BFL name for {sorted(state)[:5]}")
    return {prefix + k: v for k, v in out.items()}


def write_bfl(transformer, path: Path, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    """A diffusers FluxTransformer2DModel as a BFL-layout .safetensors file (in `dtype`, e.g. torch.bfloat16)."""
    from safetensors.torch import save_file

    state = bfl_state(transformer.state_dict(), prefix)
    save_file({k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}, str(path))
    return Path(path)
