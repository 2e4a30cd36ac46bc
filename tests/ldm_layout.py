"""diffusers pipeline -> single-file checkpoint in the original layout (CompVis/LDM for SD 1.x/2.x, SGM for SDXL);
diffusers ControlNetModel -> single-file ControlNet in lllyasviel's layout (`control_model.*`).

The inverse of `engine.families.sd.single_file`, written independently from the layout's description so that
tests can make tiny single-file checkpoints; the tests check it against diffusers' own single-file converters.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED_NAMES = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "time_embedding.cond_proj": "time_embed.cond_proj", "add_embedding.linear_1": "label_emb.0.0",
                    "add_embedding.linear_2": "label_emb.0.2", "conv_in": "input_blocks.0.0",
                    "conv_norm_out": "out.0", "conv_out": "out.2"}


def _numpy(state_dict) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in state_dict.items()}


def _resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    return f"{RESNET_NAMES[module]}.{param}"


def unet_key(key: str, config: dict) -> str:
    """diffusers UNet2DConditionModel key -> LDM `model.diffusion_model.` key (without the prefix)."""
    stride = config["layers_per_block"] + 1
    module, _, param = key.rpartition(".")
    if module in UNET_FIXED_NAMES:
        return f"{UNET_FIXED_NAMES[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + level * stride + stride - 1}.0.op.{rest.removeprefix('conv.')}"
        block = 1 + level * stride + index
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":  # after the last resnet, and after its attention if the level has one
            part = 2 if config["up_block_types"][level].startswith("CrossAttn") else 1
            return f"output_blocks.{level * stride + stride - 1}.{part}.{rest}"
        block = level * stride + index
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    raise KeyError(f"no LDM name for UNet key {key}")


def controlnet_key(key: str, config: dict) -> str:
    """diffusers ControlNetModel key -> LDM ControlNet key (without `control_model.`).

    The hint block is one nn.Sequential alternating convs and SiLUs: conv_in at 0, the blocks at 2, 4, ...,
    conv_out after them (at 14 for the usual four embedding widths)."""
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    positions = {"conv_in": 0, "conv_out": hint_blocks + 1} | {f"blocks.{i}": i + 1 for i in range(hint_blocks)}
    module, _, param = key.rpartition(".")
    if m := re.fullmatch(r"controlnet_cond_embedding\.(.+)", module):
        return f"input_hint_block.{2 * positions[m[1]]}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m[1]}.0.{param}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    return unet_key(key, config)


def controlnet_state(controlnet, prefix: str = "control_model.") -> dict[str, np.ndarray]:
    """A diffusers ControlNetModel's weights as a single-file ControlNet state dict."""
    return {prefix + controlnet_key(k, controlnet.config): v for k, v in _numpy(controlnet.state_dict()).items()}


def write_controlnet(controlnet, path: Path, prefix: str = "control_model.") -> Path:
    from safetensors.numpy import save_file

    save_file(controlnet_state(controlnet, prefix), str(path))
    return Path(path)


def vae_key(key: str, config: dict) -> str:
    """diffusers AutoencoderKL key -> LDM `first_stage_model.` key (without the prefix)."""
    levels = len(config["block_out_channels"])
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key):
        inner = f"block.{m[3]}" if m[2] == "resnets" else "downsample"
        return f"encoder.down.{m[1]}.{inner}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key):
        inner = f"block.{m[3]}" if m[2] == "resnets" else "upsample"
        return f"decoder.up.{levels - 1 - int(m[1])}.{inner}.{m[4]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(\w+)", key):
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        return f"{m[1]}.mid.attn_1.{names[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def open_clip_state(state: dict[str, np.ndarray], extra_layer: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """transformers CLIP keys -> open_clip keys. `extra_layer`: SD 2.x checkpoints hold one more layer (and a
    projection) than diffusers' encoder, which stops at the penultimate layer; we add random ones."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    for i in range(layers):
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for new, old in names.items():
            for param in ("weight", "bias"):
                out[f"{target}{old}.{param}"] = state[f"{source}{new}.{param}"]
        for param in ("weight", "bias"):
            out[f"{target}attn.in_proj_{param}"] = np.concatenate(
                [state[f"{source}self_attn.{p}.{param}"] for p in ("q_proj", "k_proj", "v_proj")])
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.copy()
    if extra_layer:
        rng = np.random.default_rng(seed)
        for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            out[key.replace("resblocks.0.", f"resblocks.{layers}.")] = rng.standard_normal(out[key].shape, np.float32)
        hidden = out["ln_final.weight"].shape[0]
        out["text_projection"] = rng.standard_normal((hidden, hidden), np.float32)
    out["logit_scale"] = np.array(4.6052, np.float32)  # open_clip keeps it; single files carry it along
    return out


def checkpoint_state(pipe, family: str, vae_attention_as_conv: bool = True) -> dict[str, np.ndarray]:
    """A diffusers SD/SDXL pipeline's weights as one single-file state dict (family: sd1, sd2v or sdxl)."""
    unet, vae = _numpy(pipe.unet.state_dict()), _numpy(pipe.vae.state_dict())
    out = {"model.diffusion_model." + unet_key(k, pipe.unet.config): v for k, v in unet.items()}
    for key, value in vae.items():
        if vae_attention_as_conv and ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        out["first_stage_model." + vae_key(key, pipe.vae.config)] = value
    text = _numpy(pipe.text_encoder.state_dict())
    if family == "sd1":
        out.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                    for k, v in text.items()})
    elif family == "sd2v":
        out.update({"cond_stage_model.model." + k: v for k, v in open_clip_state(text, extra_layer=True).items()})
    else:
        out.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                    for k, v in text.items()})
        text_2 = open_clip_state(_numpy(pipe.text_encoder_2.state_dict()), extra_layer=False)
        out.update({"conditioner.embedders.1.model." + k: v for k, v in text_2.items()})
    # What real checkpoints also carry and converters must skip: the training schedule and an id buffer.
    out["alphas_cumprod"] = np.linspace(0.999, 0.005, 1000, dtype=np.float32)
    if family in ("sd1", "sdxl"):
        prefix = "cond_stage_model" if family == "sd1" else "conditioner.embedders.0"
        out[f"{prefix}.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def write_checkpoint(pipe, family: str, path: Path, metadata: dict[str, str] | None = None,
                     vae_attention_as_conv: bool = True) -> Path:
    from safetensors.numpy import save_file

    save_file(checkpoint_state(pipe, family, vae_attention_as_conv), str(path), metadata=metadata)
    return Path(path)


CLIP_VOCABULARY = 49408  # CLIP's own tokenizer's tokens: what a converted single file's CLIP gets


def with_clip_vocabulary(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state` with its CLIP token embeddings grown to CLIP's vocabulary (zero rows after the tiny ones), as
    real single files have them: their conversion gives them CLIP's own tokenizer."""
    def grown(value: np.ndarray) -> np.ndarray:
        return np.concatenate([value, np.zeros((CLIP_VOCABULARY - len(value), value.shape[1]), value.dtype)])

    return {k: grown(v) if k.endswith("token_embedding.weight") else v for k, v in state.items()}


def with_tokenizers(source, folder: Path):
    """A model read from single files, given the tokenizers of the diffusers folder its tiny text encoders came
    from: single files carry none, and CLIP's own has more ids than the tiny embeddings have rows."""
    source.tokenizers = {name: folder / name.replace("text_encoder", "tokenizer") for name in source.tokenizers}
    return source
