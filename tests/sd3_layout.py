"""diffusers SD3Transformer2DModel -> Stability's original MMDiT layout (sd3_medium.safetensors, sd3.5_*.safetensors).

The inverse of `engine.families.sd3.single_file`'s mapping, written from the layout's description so that tests
can make tiny SD3 single files; the tests check it against diffusers' own converter (convert_sd3_transformer_checkpoint_to_diffusers).
Works on torch tensors, meta tensors included (real-size shapes without memory).
"""

from __future__ import annotations

from pathlib import Path

import torch

# diffusers module -> original module, outside the blocks.
TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # with its halves swapped: the original's is (shift, scale)
}
BLOCK = {  # transformer_blocks.N.* -> joint_blocks.N.*: the image stream is x_block, the text stream context_block
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # the last block's: halves swapped, as norm_out's
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
# The original's fused projections: their diffusers parts, concatenated along the output axis in this order.
FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def _swapped(value: torch.Tensor) -> torch.Tensor:
    scale, shift = value.chunk(2)
    return torch.cat([shift, scale])


def sd3_state(state: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in the original names, keys under `prefix`."""
    state = dict(state)
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    for i in range(layers):
        block, original = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for fused, parts in FUSED.items():
            for param in ("weight", "bias"):
                if f"{block}{parts[0]}.{param}" in state:
                    out[f"{original}{fused}.{param}"] = torch.cat([state.pop(f"{block}{p}.{param}") for p in parts])
        for name, original_name in BLOCK.items():
            for param in ("weight", "bias"):
                if (key := f"{block}{name}.{param}") in state:
                    value = state.pop(key)
                    last_context = name == "norm1_context.linear" and i == layers - 1
                    out[f"{original}{original_name}.{param}"] = _swapped(value) if last_context else value
    for name, original_name in TOP_LEVEL.items():
        for param in ("weight", "bias"):
            if (key := f"{name}.{param}") in state:
                value = state.pop(key)
                out[f"{original_name}.{param}"] = _swapped(value) if name == "norm_out.linear" else value
    if state:
        raise KeyError(f"no original name for {sorted(state)[:5]}")
    return {prefix + k: v for k, v in out.items()}


def write_sd3(transformer, path: Path, prefix: str = "model.diffusion_model.", dtype: torch.dtype | None = None,
              extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A diffusers SD3Transformer2DModel as an original-layout .safetensors file (in `dtype`), with `extra`
    tensors (e.g. the VAE and text encoders under their prefixes) beside it."""
    from safetensors.torch import save_file

    state = {**sd3_state(transformer.state_dict(), prefix), **(extra or {})}
    save_file({k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}, str(path))
    return Path(path)
