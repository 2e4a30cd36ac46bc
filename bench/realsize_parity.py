"""Real-size parity: our MLX components against diffusers/transformers at SD 1.5, SD 2.1 and SDXL shapes.

The tiny parity tests cannot catch what only shows at real size (head counts, transformer depths,
projection sizes, numerics over 32 layers). This script builds each released model's components from their
published config.json (written out below: nothing is downloaded) with random weights, runs the torch
reference in float32 on fixed random inputs, moves the weights into our MLX module through the convert/
mapping functions, runs ours on the same inputs and prints one row per output:

    python bench/realsize_parity.py [--models sd15,sd21,sdxl] [--components text_encoder,text_encoder_2,unet,vae]
                                    [--unet-latent N] [--vae-latent N]

Components run one at a time and each torch tensor is freed as it is moved, so the peak is about one copy of
the largest component (SDXL's UNet: 10.3 GB in float32). Exits 1 if any max_rel_err exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

TOLERANCE = 1e-4

# --- the released models' configs ---------------------------------------------------------------------
# The config.json files of the diffusers folders (bookkeeping keys such as _diffusers_version dropped):
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0.

CLIP_VIT_L = {  # SD 1.5's text_encoder and SDXL's text_encoder: OpenAI CLIP ViT-L/14
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "vocab_size": 49408,
}
CLIP_OPENCLIP_H = {  # SD 2.1's text_encoder: OpenCLIP ViT-H/14 without its last layer (SD2 uses the penultimate)
    **CLIP_VIT_L, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
}
CLIP_OPENCLIP_BIGG = {  # SDXL's text_encoder_2: OpenCLIP ViT-bigG/14 with its text projection
    **CLIP_VIT_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
    "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}

UNET_SD15 = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
UNET_SD21 = {
    **UNET_SD15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "dual_cross_attention": False,
    "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True,
}
UNET_SDXL = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

VAE_SD15 = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_SD21 = {**VAE_SD15, "sample_size": 768}
VAE_SDXL = {**VAE_SD15, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# The tokenizers' pad tokens: OpenAI CLIP's pads with the end token, OpenCLIP's with "!" (id 0).
OPENAI_PAD, OPENCLIP_PAD = "<|endoftext|>", "!"


@dataclass(frozen=True)
class Model:
    text_encoders: dict[str, tuple[dict, str]]  # diffusers folder name -> (config, its tokenizer's pad token)
    unet: dict
    vae: dict
    unet_latent: int  # side of the UNet's test latents (the released models run at 64, 96 and 128)


MODELS = {
    "sd15": Model({"text_encoder": (CLIP_VIT_L, OPENAI_PAD)}, UNET_SD15, VAE_SD15, unet_latent=32),
    "sd21": Model({"text_encoder": (CLIP_OPENCLIP_H, OPENCLIP_PAD)}, UNET_SD21, VAE_SD21, unet_latent=32),
    "sdxl": Model(
        {"text_encoder": (CLIP_VIT_L, OPENAI_PAD), "text_encoder_2": (CLIP_OPENCLIP_BIGG, OPENCLIP_PAD)},
        UNET_SDXL, VAE_SDXL, unet_latent=64,
    ),
}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")

# A prompt that leaves padding, and one long enough to be truncated (its end token sits at position 76).
PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k",
    "an oil painting of a lighthouse on a cliff at dusk, waves crashing against the rocks below, " * 4,
]


@dataclass
class Row:
    output: str
    max_rel_err: float
    max_abs_err: float
    torch_seconds: float
    mlx_seconds: float


# --- moving weights and timing ------------------------------------------------------------------------

def move_weights(model, state_dict: dict, map_weight: Callable) -> None:
    """Load a torch state dict into an MLX model through a convert/ mapping, emptying the dict as it goes.

    The caller must hold no other reference to the torch module, so that each tensor is freed once copied
    and the two models never both exist in full.
    """
    import mlx.core as mx

    weights = []
    while state_dict:
        name, tensor = state_dict.popitem()
        weights += [(key, mx.array(value)) for key, value in map_weight(name, tensor.detach().numpy())]
        del tensor
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())


def timed(run: Callable[[], dict]) -> tuple[dict, float]:
    start = time.perf_counter()
    outputs = run()
    return outputs, time.perf_counter() - start


def compare(expected: dict, ours: dict, torch_seconds: float, mlx_seconds: float) -> list[Row]:
    """One row per output; expected is torch's (NCHW images and latents), ours MLX's (NHWC)."""
    import numpy as np

    from parity import max_rel_err, nchw_to_nhwc, to_numpy

    rows = []
    for name, reference in expected.items():
        reference = nchw_to_nhwc(reference) if reference.ndim == 4 else to_numpy(reference)
        abs_err = float(np.abs(to_numpy(ours[name]) - reference).max())
        rows.append(Row(name, max_rel_err(ours[name], reference), abs_err, torch_seconds, mlx_seconds))
    return rows


def to_mlx(tensor):
    """A torch tensor as an MLX array, images and latents NCHW -> NHWC."""
    import mlx.core as mx

    value = tensor.numpy()
    return mx.array(value.transpose(0, 2, 3, 1) if value.ndim == 4 else value)


# --- the components -----------------------------------------------------------------------------------

def check_text_encoder(config: dict, pad_token: str) -> list[Row]:
    """Two real prompts' 77 token ids: final states, the penultimate layer (SD2/XL's conditioning), and the
    pooled output (projected, for SDXL's second encoder)."""
    import mlx.core as mx
    import torch
    import transformers

    from mlx_sd_server.engine.text.mapping import map_clip_weight
    from mlx_sd_server.engine.text.clip import CLIPTextConfig, CLIPTextModel
    from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path

    tokenizer = CLIPTokenizer.from_bpe_file(default_vocab_path(), pad_token=pad_token)
    ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    with_projection = config["architectures"] == ["CLIPTextModelWithProjection"]
    pooled = "text_embeds" if with_projection else "pooler_output"

    torch.manual_seed(0)
    reference_class = getattr(transformers, config["architectures"][0])
    reference = reference_class(transformers.CLIPTextConfig.from_dict(config)).eval()
    with torch.no_grad():
        out, torch_seconds = timed(lambda: reference(torch.tensor(ids), output_hidden_states=True))
    expected = {"last_hidden_state": out.last_hidden_state, "hidden_states[-2]": out.hidden_states[-2],
                pooled: getattr(out, pooled)}
    state_dict = reference.state_dict()
    del reference, out

    model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    move_weights(model, state_dict, map_clip_weight)

    def run_ours() -> dict:
        out = model(mx.array(ids))
        ours = {"last_hidden_state": out.last_hidden_state, "hidden_states[-2]": out.hidden_states[-2],
                pooled: out.text_embeds if with_projection else out.pooled_output}
        mx.eval(ours)
        return ours

    ours, mlx_seconds = timed(run_ours)
    return compare(expected, ours, torch_seconds, mlx_seconds)


def unet_inputs(config: dict, latent_size: int) -> dict:
    """Batch 2 (a cond/uncond pair's shape) at fractional timesteps, with SDXL's added conditions."""
    import torch

    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, config["in_channels"], latent_size, latent_size, generator=g),
        "timestep": torch.tensor([961.5, 317.25]),
        "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=g),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["text_embeds"] = torch.randn(2, pooled_dim, generator=g)
        # original size, crop top-left, target size: as SDXL pipelines pass them
        inputs["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 1024]])
    return inputs


def check_unet(config: dict, latent_size: int) -> list[Row]:
    import mlx.core as mx
    import torch
    from diffusers import UNet2DConditionModel

    from mlx_sd_server.engine.families.sd.mapping import map_unet_weight
    from mlx_sd_server.engine.families.sd.unet import UNetConfig, UNetModel

    inputs = unet_inputs(config, latent_size)
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}

    torch.manual_seed(0)
    reference = UNet2DConditionModel.from_config(config).eval()
    with torch.no_grad():
        expected, torch_seconds = timed(lambda: {"noise_pred": reference(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added or None,
        ).sample})
    state_dict = reference.state_dict()
    del reference
    gc.collect()

    model = UNetModel(UNetConfig.from_dict(config))
    move_weights(model, state_dict, map_unet_weight)

    def run_ours() -> dict:
        out = model(to_mlx(inputs["sample"]), to_mlx(inputs["timestep"]), to_mlx(inputs["encoder_hidden_states"]),
                    **{k: to_mlx(v) for k, v in added.items()})
        mx.eval(out)
        return {"noise_pred": out}

    ours, mlx_seconds = timed(run_ours)
    return compare(expected, ours, torch_seconds, mlx_seconds)


def check_vae(config: dict, latent_size: int) -> list[Row]:
    """Encode an image of 8 x latent_size pixels a side (the latent distribution's mean and logvar); decode a
    latent_size x latent_size latent."""
    import mlx.core as mx
    import torch
    from diffusers import AutoencoderKL

    from mlx_sd_server.engine.vae import map_vae_weight
    from mlx_sd_server.engine.vae import Autoencoder, VAEConfig

    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 8 * latent_size, 8 * latent_size, generator=g) * 2 - 1
    latent = torch.randn(1, 4, latent_size, latent_size, generator=g)

    torch.manual_seed(0)
    reference = AutoencoderKL.from_config(config).eval()

    def run_reference() -> dict:
        posterior = reference.encode(image).latent_dist
        return {"encode.mean": posterior.mean, "encode.logvar": posterior.logvar,
                "decode": reference.decode(latent).sample}

    with torch.no_grad():
        expected, torch_seconds = timed(run_reference)
    state_dict = reference.state_dict()
    del reference

    model = Autoencoder(VAEConfig.from_dict(config))
    move_weights(model, state_dict, map_vae_weight)

    def run_ours() -> dict:
        mean, logvar = model.encode(to_mlx(image))
        ours = {"encode.mean": mean, "encode.logvar": logvar, "decode": model.decode(to_mlx(latent))}
        mx.eval(ours)
        return ours

    ours, mlx_seconds = timed(run_ours)
    return compare(expected, ours, torch_seconds, mlx_seconds)


def check(model: Model, component: str, unet_latent: int | None, vae_latent: int) -> list[Row]:
    if component in model.text_encoders:
        return check_text_encoder(*model.text_encoders[component])
    if component == "unet":
        return check_unet(model.unet, unet_latent or model.unet_latent)
    return check_vae(model.vae, vae_latent)


# --- main ---------------------------------------------------------------------------------------------

def names(text: str, allowed) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda s: names(s, MODELS), default=list(MODELS),
                        help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    parser.add_argument("--components", type=lambda s: names(s, COMPONENTS), default=list(COMPONENTS),
                        help=f"comma-separated, from {','.join(COMPONENTS)} (default: all the model has)")
    parser.add_argument("--unet-latent", type=int, help="UNet latent side (default: 32 for SD 1.5/2.1, 64 for SDXL)")
    parser.add_argument("--vae-latent", type=int, default=32,
                        help="VAE latent side; the encoded image is 8x that (default: 32, a 256x256 image)")
    args = parser.parse_args()
    ensure_fast_blas()  # Linux: re-executes once with OpenBLAS preloaded (MLX's bundled BLAS is ~50x slower)

    import mlx.core as mx
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    print(f"{'model':6} {'component':15} {'output':18} {'max_rel_err':>11} {'max_abs_err':>11} "
          f"{'torch s':>8} {'mlx s':>8}", flush=True)
    failures = []
    for model_name in args.models:
        model = MODELS[model_name]
        for component in args.components:
            if component == "text_encoder_2" and component not in model.text_encoders:
                continue
            for row in check(model, component, args.unet_latent, args.vae_latent):
                print(f"{model_name:6} {component:15} {row.output:18} {row.max_rel_err:11.2e} {row.max_abs_err:11.2e} "
                      f"{row.torch_seconds:8.1f} {row.mlx_seconds:8.1f}", flush=True)
                if not row.max_rel_err <= TOLERANCE:  # also catches NaN
                    failures.append(f"{model_name} {component} {row.output}")
            gc.collect()
            mx.clear_cache()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory {peak_gb:.1f} GB")
    if failures:
        print(f"FAILED (max_rel_err > {TOLERANCE:g}): {'; '.join(failures)}")
        return 1
    print(f"all outputs within max_rel_err {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
