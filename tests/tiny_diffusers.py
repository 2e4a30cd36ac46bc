"""Tiny random-weight reference models built offline with diffusers/transformers (torch).

Every parity test builds its reference here, so all tests agree on what "a tiny SD1/SD2-v/SDXL" is.
Families:
  sd1   — CLIP ViT-L style text encoder (quick_gelu, pads with <|endoftext|>), epsilon prediction
  sd2v  — OpenCLIP-H style (gelu, pads with "!"), linear projections in the UNet, v-prediction
  sdxl  — two text encoders (second with projection), text-time micro-conditioning, epsilon prediction
Options: inpaint=True (9-channel UNet), lcm=True (guidance embedding, time_cond_proj_dim).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

FAMILIES = ("sd1", "sd2v", "sdxl")
TEXT_DIM = 32  # hidden size of the tiny CLIP text encoders


# --- tokenizer --------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table (same order as the real vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TINY_MERGES = [
    "t h", "th e</w>", "a n", "i n", "o n</w>", "e r", "a t", "r e", "o r", "e n", "c a", "ca t</w>",
    "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>", "i n</w>", "s t", "a r",
]


def write_tokenizer(dst: Path, pad_token: str, merges: list[str] | None = None) -> Path:
    """A small but real CLIP BPE vocabulary: all bytes, their word-final forms, a few merges, specials."""
    merges = TINY_MERGES if merges is None else merges
    dst.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (dst / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(dst / "vocab.json"), str(dst / "merges.txt"), pad_token=pad_token)
    tok.model_max_length = 77
    tok.save_pretrained(str(dst))
    return dst


def tokenizer_vocab_size() -> int:
    return 512 + len(TINY_MERGES) + 2


# --- components -------------------------------------------------------------------------------------

def text_encoder(kind: str = "sd1", with_projection: bool = False, seed: int = 0):
    """kind: sd1 (quick_gelu, pad=eos id), sd2 (gelu), sdxl2 (the bigG-style second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab = tokenizer_vocab_size()
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if kind == "sd1" else "gelu",
        projection_dim=TEXT_DIM,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1 if kind == "sd1" else 0,
        layer_norm_eps=1e-5,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def unet(family: str = "sd1", inpaint: bool = False, lcm: bool = False, seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=16,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
    )
    if family == "sd2v":
        kwargs.update(attention_head_dim=(2, 4, 4), use_linear_projection=True)
    if family == "sdxl":
        kwargs.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            cross_attention_dim=2 * TEXT_DIM,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
        )
    if lcm:
        kwargs.update(time_cond_proj_dim=16)
    kwargs.update(overrides)
    model = UNet2DConditionModel(**kwargs).eval()
    _randomize_zero_init(model)
    return model


def vae(family: str = "sd1", seed: int = 0):
    """Four blocks, so latents are 1/8 of the image size as in the real models."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    ).eval()
    _randomize_zero_init(model)
    return model


def controlnet(base_unet, seed: int = 1):
    """A ControlNet shaped like `base_unet`, with its zero-initialised convs randomised."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=(8, 16, 32, 32)).eval()
    _randomize_zero_init(model)
    return model


def _randomize_zero_init(model: torch.nn.Module) -> None:
    """diffusers zero-initialises some output convs; random values make parity tests meaningful."""
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().max() == 0 and param.ndim > 1:
                param.normal_(0, 0.05)


# --- whole pipelines --------------------------------------------------------------------------------

def scheduler_config(family: str) -> dict:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if family == "sd2v" else "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 1,
    }


def make_pipeline(dst: Path, family: str = "sd1", inpaint: bool = False, lcm: bool = False):
    """Build a tiny pipeline, save it as a diffusers folder at `dst`, and return the pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    dst = Path(dst)
    scheduler = EulerDiscreteScheduler(**scheduler_config(family))
    if family == "sdxl":
        from transformers import CLIPTokenizer

        tok_dir = write_tokenizer(Path(tempfile.mkdtemp()), pad_token="<|endoftext|>")
        tok2_dir = write_tokenizer(Path(tempfile.mkdtemp()), pad_token="!")
        tokenizer_dirs = {"tokenizer": tok_dir, "tokenizer_2": tok2_dir}
        pipe = StableDiffusionXLPipeline(
            vae=vae(family),
            text_encoder=text_encoder("sd1", seed=1),
            text_encoder_2=text_encoder("sdxl2", with_projection=True, seed=2),
            tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(tok2_dir)),
            unet=unet(family, inpaint=inpaint, lcm=lcm),
            scheduler=scheduler,
        )
    else:
        from transformers import CLIPTokenizer

        tok_dir = write_tokenizer(Path(tempfile.mkdtemp()), pad_token="<|endoftext|>" if family == "sd1" else "!")
        tokenizer_dirs = {"tokenizer": tok_dir}
        pipe = StableDiffusionPipeline(
            vae=vae(family),
            text_encoder=text_encoder("sd1" if family == "sd1" else "sd2", seed=1),
            tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
            unet=unet(family, inpaint=inpaint, lcm=lcm),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(str(dst), safe_serialization=True)
    # Hub repos of SD models carry vocab.json + merges.txt (transformers 5 writes only tokenizer.json).
    for folder, source in tokenizer_dirs.items():
        for name in ("vocab.json", "merges.txt"):
            (dst / folder / name).write_bytes((source / name).read_bytes())
    pipe.set_progress_bar_config(disable=True)
    return pipe
