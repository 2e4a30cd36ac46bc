"""FLUX.2's files as their users have them, written from tiny diffusers models.

- the transformer in Black Forest Labs' layout (`flux-2-klein-4b.safetensors`, bare or under ComfyUI's
  `model.diffusion_model.`): FLUX.1's block names (fused q/k/v, RMSNorm `.scale`s, the final modulation as
  (shift, scale)) and FLUX.2's shared modulations; the single blocks' fused projection is diffusers' own.
- the autoencoder as BFL's `flux2-vae.safetensors` holds it: the LDM layout (ldm_layout's names), the
  attention projections as 1x1 convolutions, the quant convs inside the encoder and decoder, and the batch
  norm's statistics and step counter under `bn.`.
Written here as the inverse of diffusers' conversion, independently of the reader (the transformer's checked
against diffusers' own converter by the tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ldm_layout import vae_key

COMFYUI_PREFIX = "model.diffusion_model."

# diffusers module -> BFL module, outside the blocks
TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # with its halves swapped: BFL's is (shift, scale)
}
DOUBLE = {  # transformer_blocks.N.* -> double_blocks.N.*
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {  # single_transformer_blocks.N.* -> single_blocks.N.*
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
VAE_NESTED = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}


def bfl_transformer_state(transformer, prefix: str = "") -> dict[str, np.ndarray]:
    """A diffusers Flux2Transformer2DModel's weights in BFL's names (RMSNorm weights are `scale`), under `prefix`."""
    state = numpy_state(transformer)
    out = {}
    for i in range(transformer.config.num_layers):
        block = f"transformer_blocks.{i}."
        for bfl, parts in DOUBLE_FUSED.items():
            out[f"double_blocks.{i}.{bfl}.weight"] = np.concatenate([state.pop(f"{block}{p}.weight") for p in parts])
        for diffusers, bfl in DOUBLE.items():
            out[f"double_blocks.{i}.{bfl}.{'scale' if 'norm' in bfl else 'weight'}"] = state.pop(
                f"{block}{diffusers}.weight")
    for i in range(transformer.config.num_single_layers):
        for diffusers, bfl in SINGLE.items():
            out[f"single_blocks.{i}.{bfl}.{'scale' if 'norm' in bfl else 'weight'}"] = state.pop(
                f"single_transformer_blocks.{i}.{diffusers}.weight")
    for diffusers, bfl in TOP_LEVEL.items():
        if (key := f"{diffusers}.weight") in state:
            value = state.pop(key)
            if diffusers == "norm_out.linear":
                scale, shift = np.split(value, 2)
                value = np.concatenate([shift, scale])
            out[f"{bfl}.weight"] = value
    if state:
        raise KeyError(f"no BFL name for {sorted(state)[:5]}")
    return {prefix + key: value for key, value in out.items()}


def write_bfl_transformer(transformer, path: Path, prefix: str = "") -> Path:
    from safetensors.numpy import save_file

    save_file(bfl_transformer_state(transformer, prefix), str(path))
    return Path(path)


def bfl_vae_name(key: str, config: dict) -> str:
    """A diffusers AutoencoderKLFlux2 key -> BFL's AutoEncoder's."""
    name = vae_key(key, config)
    for top, nested in VAE_NESTED.items():
        if name.startswith(top):
            return nested + name[len(top):]
    return name


def bfl_vae_state(vae, prefix: str = "") -> dict[str, np.ndarray]:
    """A diffusers AutoencoderKLFlux2's weights as flux2-vae.safetensors holds them (BFL's AutoEncoder's
    state dict: `bn.num_batches_tracked` an int64 counter), under `prefix`."""
    out = {}
    for key, tensor in vae.state_dict().items():
        value = tensor.detach().numpy().copy() if key == "bn.num_batches_tracked" else tensor.detach().float().numpy()
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + bfl_vae_name(key, dict(vae.config))] = value
    return out
