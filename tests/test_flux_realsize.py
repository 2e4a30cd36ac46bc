"""Real-size FLUX.1 parity: our MLX components against diffusers/transformers at the released widths.

The tiny FLUX tests (test_flux_transformer.py, test_t5.py, test_flux_pipeline.py) check the wiring at
widths of 16-32; these check what only shows at FLUX.1's own sizes: 24 heads of 128 with the (16, 56, 56)
rotary split, 3072-wide streams over 1024 image + 512 text tokens, T5-XXL's 64 heads and 10240-wide
gated-GELU at 512 tokens, CLIP-L in full, and the 16-channel autoencoder in full. Random weights, float32,
nothing downloaded. The transformer and T5 keep their widths but not their depth (1 double + 1 single
block, 2 T5 layers): every block is the same code, and depth only compounds float32 rounding.

Marked `realsize` (excluded from the default run):

    ./run-tests -m realsize tests/test_flux_realsize.py -s

Each test prints its max_rel_err and the forward times of torch and ours (one cold call each). ~4 minutes
in all on the 2-core CPU machine; peak ~5 GB (the transformer: diffusers' 545M float32 parameters plus ours).
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd_server.engine.text.mapping import map_clip_weight
from mlx_sd_server.engine.families.flux.mapping import map_flux_transformer_weight
from mlx_sd_server.engine.text.mapping import map_t5_weight
from mlx_sd_server.engine.vae import map_vae_weight
from parity import load_torch_weights, max_rel_err, nchw_to_nhwc

pytestmark = pytest.mark.realsize

TOLERANCE = 1e-4

# The released config.json files (black-forest-labs/FLUX.1-dev and -schnell; bookkeeping keys dropped).
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
T5_XXL = dict(  # text_encoder_2: google/t5-v1_1-xxl's encoder
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.0,
    is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
)
CLIP_L = dict(  # text_encoder: OpenAI CLIP ViT-L/14 (the same config as SD 1.5's)
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2,
    hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0, initializer_range=0.02,
    intermediate_size=3072, layer_norm_eps=1e-5, max_position_embeddings=77, model_type="clip_text_model",
    num_attention_heads=12, num_hidden_layers=12, pad_token_id=1, projection_dim=768, vocab_size=49408,
)
FLUX_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    force_upcast=True, in_channels=3, latent_channels=16, layers_per_block=2, mid_block_add_attention=True,
    norm_num_groups=32, out_channels=3, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    up_block_types=("UpDecoderBlock2D",) * 4, use_post_quant_conv=False, use_quant_conv=False,
)

CLIP_BOS, CLIP_EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> (FLUX's CLIP tokenizer pads with it)
T5_EOS = 1


def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def report(what: str, errors: dict[str, float], torch_s: float, mlx_s: float) -> None:
    """One line per output, the form the bench README quotes."""
    for output, err in errors.items():
        print(f"\n{what} {output}: max_rel_err {err:.2e} (torch {torch_s:.1f} s, mlx {mlx_s:.1f} s, "
              f"mlx/torch {mlx_s / torch_s:.2f})", end="")
    print()


def randomize_norms(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Norm scales start at 1 (and shifts at 0): random values, so a misplaced or missing one shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in names):
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0, 0.1)


# --- transformer ---------------------------------------------------------------------------------------

def flux_reference(guidance: bool, seed: int = 0):
    """diffusers' FluxTransformer2DModel at FLUX.1's widths, 1 double + 1 single block. Weights
    N(0, 1/fan_in) (variance-preserving: the modulations' shifts, scales and gates come out O(1), so
    every block changes the streams substantially; diffusers' own init makes them ~0.1), RMSNorm scales
    U(0.5, 1.5)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": 1, "num_single_layers": 1,
                                      "guidance_embeds": guidance}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0, param.shape[1] ** -0.5)
            elif ".norm_" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("variant,text_tokens", [("dev", 512), ("schnell", 256)])
def test_flux_transformer_released_widths_match_diffusers(variant, text_tokens):
    """A 512x512 image (64x64 latent: 1024 packed tokens) with dev's 512 or schnell's 256 T5 tokens.

    dev's error is ~5x schnell's (1.8e-5 against 3e-6 here) for a reason outside both models: its guidance
    embedding takes sinusoids of 3.5 x 1000, where one float32 rounding of a frequency moves the angle by
    ~1e-4 rad. Both diffusers' float32 sinusoids and ours are ~1.2e-4 off the exact ones there, and ~2e-4
    apart (their exp()s round a few frequencies differently); the rest of the model carries that through."""
    from mlx_sd_server.engine.families.flux.transformer import FluxTransformer2DModel, FluxTransformerConfig, latent_image_ids

    guidance = variant == "dev"
    reference = flux_reference(guidance)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 1024, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, text_tokens, 4096, generator=g),
        "pooled_projections": torch.randn(1, 768, generator=g),
        "timestep": torch.tensor([0.7317]),
        "img_ids": torch.from_numpy(np.array(latent_image_ids(64, 64))),
        "txt_ids": torch.zeros(text_tokens, 3),
        "guidance": torch.tensor([3.5]) if guidance else None,
    }
    with torch.no_grad():
        expected, torch_s = timed(lambda: reference(**inputs, return_dict=False)[0])

    model = FluxTransformer2DModel(FluxTransformerConfig.from_dict(dict(reference.config)))
    load_torch_weights(model, reference.state_dict(), map_flux_transformer_weight)
    del reference
    arrays = {k: None if v is None else mx.array(v.numpy()) for k, v in inputs.items()}

    def run_ours():
        out = model(**arrays)
        mx.eval(out)
        return out

    ours, mlx_s = timed(run_ours)
    err = max_rel_err(ours, expected)
    report(f"flux transformer {variant} (1+1 blocks, 1024 image + {text_tokens} text tokens)",
           {"output": err}, torch_s, mlx_s)
    assert err <= TOLERANCE


# --- T5-XXL --------------------------------------------------------------------------------------------

def test_t5_xxl_widths_match_transformers():
    """Two layers of T5 v1.1 XXL at FLUX dev's 512 tokens: a prompt padded to 512 (as FLUX encodes it,
    with no attention mask) and 512 random ids."""
    from transformers import T5Config as TransformersConfig
    from transformers import T5EncoderModel as Reference

    from mlx_sd_server.engine.text.t5 import T5Config, T5EncoderModel

    torch.manual_seed(0)
    reference = Reference(TransformersConfig(**{**T5_XXL, "num_layers": 2})).eval()
    randomize_norms(reference, ("layer_norm",))
    with torch.no_grad():  # transformers' init makes the bias ~0.016 against O(1) scores: make it matter
        reference.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 1)
    rng = np.random.default_rng(0)
    ids = np.zeros((2, 512), dtype=np.int64)
    ids[0, :40], ids[0, 40] = rng.integers(3, 32000, size=40), T5_EOS
    ids[1] = rng.integers(0, 32128, size=512)
    with torch.no_grad():
        expected, torch_s = timed(lambda: reference(torch.from_numpy(ids)).last_hidden_state)

    model = T5EncoderModel(T5Config.from_dict(reference.config.to_dict()))
    assert (model.config.d_model, model.config.num_heads, model.config.d_ff) == (4096, 64, 10240)
    load_torch_weights(model, reference.state_dict(), map_t5_weight)
    del reference

    def run_ours():
        out = model(mx.array(ids))
        mx.eval(out)
        return out

    ours, mlx_s = timed(run_ours)
    errors = {"prompt + padding": max_rel_err(ours[0], expected[0]), "random ids": max_rel_err(ours[1], expected[1])}
    report("t5-xxl (2 layers, 512 tokens)", errors, torch_s, mlx_s)
    assert max(errors.values()) <= TOLERANCE


# --- CLIP-L --------------------------------------------------------------------------------------------

def test_clip_l_matches_transformers():
    """FLUX's text_encoder in full (12 layers). FLUX uses its pooled output (at the first end token: the
    config's legacy eos_token_id 2 makes transformers pool at the highest id, the same position)."""
    from transformers import CLIPTextConfig as TransformersConfig
    from transformers import CLIPTextModel as Reference

    from mlx_sd_server.engine.text.clip import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    reference = Reference(TransformersConfig(**CLIP_L)).eval()
    randomize_norms(reference, ("layer_norm",))
    rng = np.random.default_rng(0)
    ids = np.full((2, 77), CLIP_EOS)
    ids[:, 0] = CLIP_BOS
    ids[0, 1:12] = rng.integers(0, CLIP_BOS, size=11)  # a short prompt, padded with the end token
    ids[1, 1:76] = rng.integers(0, CLIP_BOS, size=75)  # a truncated one
    with torch.no_grad():
        out, torch_s = timed(lambda: reference(torch.from_numpy(ids)))
    expected = {"last_hidden_state": out.last_hidden_state, "pooled_output": out.pooler_output}

    model = CLIPTextModel(CLIPTextConfig.from_dict(CLIP_L))
    load_torch_weights(model, reference.state_dict(), map_clip_weight)

    def run_ours():
        out = model(mx.array(ids))
        result = {"last_hidden_state": out.last_hidden_state, "pooled_output": out.pooled_output}
        mx.eval(result)
        return result

    ours, mlx_s = timed(run_ours)
    errors = {key: max_rel_err(ours[key], expected[key]) for key in expected}
    report("clip-l (12 layers, 77 tokens)", errors, torch_s, mlx_s)
    assert max(errors.values()) <= TOLERANCE


# --- autoencoder ---------------------------------------------------------------------------------------

def test_flux_autoencoder_matches_diffusers():
    """FLUX's 16-channel autoencoder in full: encode a 256x256 image, decode a 32x32 latent."""
    from diffusers import AutoencoderKL

    from mlx_sd_server.engine.vae import Autoencoder, VAEConfig

    torch.manual_seed(0)
    reference = AutoencoderKL(**FLUX_VAE).eval()
    randomize_norms(reference, ("norm",))
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    latent = torch.randn(1, 16, 32, 32, generator=g)

    def run_reference():
        posterior = reference.encode(image).latent_dist
        return {"encode.mean": posterior.mean, "encode.logvar": posterior.logvar,
                "decode": reference.decode(latent).sample}

    with torch.no_grad():
        expected, torch_s = timed(run_reference)

    model = Autoencoder(VAEConfig.from_dict(dict(reference.config)))
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in reference.state_dict())
    load_torch_weights(model, reference.state_dict(), map_vae_weight)
    nhwc = {name: mx.array(nchw_to_nhwc(t).astype(np.float32)) for name, t in (("image", image), ("latent", latent))}

    def run_ours():
        mean, logvar = model.encode(nhwc["image"])
        result = {"encode.mean": mean, "encode.logvar": logvar, "decode": model.decode(nhwc["latent"])}
        mx.eval(result)
        return result

    ours, mlx_s = timed(run_ours)
    errors = {key: max_rel_err(ours[key], nchw_to_nhwc(expected[key])) for key in expected}
    report("flux autoencoder (256x256)", errors, torch_s, mlx_s)
    assert max(errors.values()) <= TOLERANCE
