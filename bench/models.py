"""Real-size random-weight models for the benchmarks: SD 1.5 and SDXL at their released shapes (and the tests'
tiny SD 1.x, "tiny-sd1": the benches' --smoke model).

The released configs live in bench/realsize_parity.py. `converted_model` builds a diffusers pipeline
folder from them with random weights (no download), converts it with `convert_model`, and caches both, so
only the first benchmark run pays for it. From the command line (what bench/engine.py runs, in a child
process, so that the build's memory is gone before anything is measured):

    python bench/models.py --model sd15 --dtype float32 [--cache DIR]

prints the converted folder as JSON on its last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from realsize_parity import MODELS, Model  # noqa: E402

TINY = "tiny-sd1"  # tests/tiny_diffusers.py's SD 1.x: seconds to build, for --smoke runs
BENCH_MODELS = ("sd15", "sdxl", TINY)
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "mlx-sd-server-bench"
PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
SCHEDULER_FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}  # both epsilon-prediction, SD's training betas


def build_diffusers_folder(name: str, dst: Path) -> Path:
    """A diffusers pipeline folder of model `name` with random weights, one component in memory at a time.

    Weights are stored in float16 (half the disk and conversion memory; SDXL's UNet is 5 GB so, 10 GB in
    float32): random values lose nothing to it, and the conversion casts to whatever dtype is asked for.
    """
    import diffusers
    import torch
    import transformers

    from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path
    from tiny_diffusers import scheduler_config

    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.partial-"))
    if name == TINY:
        import tiny_diffusers

        tiny_diffusers.make_pipeline(work, "sd1")
        work.rename(dst)
        return dst
    model: Model = MODELS[name]
    index = {"_class_name": PIPELINE_CLASS[name], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    torch.set_default_dtype(torch.float16)  # built directly in float16: no float32 copy of SDXL's UNet
    try:
        torch.manual_seed(0)
        for encoder, (config, pad_token) in model.text_encoders.items():
            architecture = config["architectures"][0]
            module = getattr(transformers, architecture)(transformers.CLIPTextConfig.from_dict(config))
            module.save_pretrained(str(work / encoder))
            tokenizer = "tokenizer" if encoder == "text_encoder" else "tokenizer_2"
            CLIPTokenizer.from_bpe_file(default_vocab_path(), pad_token=pad_token).save(work / tokenizer)
            index[encoder] = ["transformers", architecture]
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
            del module
            gc.collect()
        for component, cls, config in (("unet", diffusers.UNet2DConditionModel, model.unet),
                                       ("vae", diffusers.AutoencoderKL, model.vae)):
            module = cls.from_config(config)
            module.save_pretrained(str(work / component), safe_serialization=True)
            index[component] = ["diffusers", cls.__name__]
            del module
            gc.collect()
        (work / "scheduler").mkdir()
        (work / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(SCHEDULER_FAMILY[name])))
        (work / "model_index.json").write_text(json.dumps(index, indent=2))
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        torch.set_default_dtype(torch.float32)
    return dst


def converted_model(name: str, dtype: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Our converted folder of model `name` in `dtype`, built (diffusers folder, then conversion) if not cached."""
    from convert.model import convert_model
    from mlx_sd_server.engine.model_io import MANIFEST

    cache.mkdir(parents=True, exist_ok=True)
    converted = cache / f"{name}-{dtype}"
    if (converted / MANIFEST).exists():
        return converted
    diffusers_folder = cache / f"{name}-diffusers"
    if not (diffusers_folder / "model_index.json").exists():
        print(f"building a random-weight {name} diffusers folder in {diffusers_folder}", file=sys.stderr, flush=True)
        build_diffusers_folder(name, diffusers_folder)
    print(f"converting it to {converted}", file=sys.stderr, flush=True)
    return convert_model(diffusers_folder, converted, dtype=dtype, name=f"random-{name}", progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BENCH_MODELS, required=True)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    print(json.dumps({"folder": str(converted_model(args.model, args.dtype, args.cache))}))


if __name__ == "__main__":
    main()
