"""Everyday use of the command line: generate never overwrites, the random model is never the default beside a
real one, models are managed by name (convert into the model directory, models, rm), pull keeps the precision
it converts to, and the help says versions, defaults and choices."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from PIL import Image

import tiny_diffusers
from convert.pull import ALLOW_PATTERNS, allow_patterns
from mlx_sd_server.cli import build_parser, main
from mlx_sd_server.engine.model_io import MANIFEST
from mlx_sd_server.engine.sampling.samplers import SAMPLE_METHODS
from mlx_sd_server.engine.sampling.schedules import SCHEDULERS
from mlx_sd_server.generate import cli_message, job_from_args
from mlx_sd_server.job import FIELDS, Capabilities, JobError, ModelDefaults, request_schema
from mlx_sd_server.registry import TINY_MODEL_NAME, ModelInfo, ModelRegistry

ARGS = ["--model", TINY_MODEL_NAME, "--prompt", "a cat", "--size", "64x64", "--steps", "1"]


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "Tiny-SD"
    tiny_diffusers.make_pipeline(src, "sd1")
    return src


def test_generate_into_a_directory_never_replaces_a_file(tmp_path, capsys):
    models, out = str(tmp_path / "models"), tmp_path / "out"
    for _ in range(2):  # the same seed twice, then a batch that starts on it
        assert main(["generate", "--model-dir", models, *ARGS, "--seed", "7", "-o", str(out)]) == 0
    assert main(["generate", "--model-dir", models, *ARGS, "--seed", "7", "-n", "2", "-o", str(out)]) == 0
    names = sorted(f.name for f in out.iterdir())
    assert names == sorted([f"{TINY_MODEL_NAME}-7.png", f"{TINY_MODEL_NAME}-7-2.png", f"{TINY_MODEL_NAME}-7-3.png",
                            f"{TINY_MODEL_NAME}-8.png"])
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and len(set(printed)) == 4
    assert all(os.path.getsize(out / name) > 0 for name in names)


def test_generate_to_a_file_refuses_to_overwrite_without_force(tmp_path, capsys):
    models, target = str(tmp_path / "models"), tmp_path / "cat.png"
    target.write_bytes(b"precious")
    assert main(["generate", "--model-dir", models, *ARGS, "-o", str(target)]) == 1
    assert "already exists" in capsys.readouterr().err and target.read_bytes() == b"precious"
    assert main(["generate", "--model-dir", models, *ARGS, "-o", str(target), "--force"]) == 0
    with Image.open(target) as image:
        assert image.format == "PNG"


def test_generate_width_height_and_output_format(tmp_path):
    models, out = str(tmp_path / "models"), tmp_path / "out"
    args = ["--model", TINY_MODEL_NAME, "--prompt", "a cat", "--steps", "1", "--seed", "3"]
    assert main(["generate", "--model-dir", models, *args, "--width", "64", "--height", "128",
                 "--output-format", "webp", "--output-compression", "50", "-o", str(out)]) == 0
    (file,) = out.iterdir()
    assert file.name == f"{TINY_MODEL_NAME}-3.webp"
    with Image.open(file) as image:
        assert image.format == "WEBP" and image.size == (64, 128)
    assert main(["generate", "--model-dir", models, *args, "--size", "64x64", "--output-format", "jpeg",
                 "-o", str(tmp_path / "x.png")]) == 2  # the name says png


def test_generate_errors_name_the_flags(tmp_path, capsys):
    models = str(tmp_path / "models")
    assert main(["generate", "--model-dir", models, *ARGS, "--cfg-scale", "-5", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--cfg-scale" in err and "cfg_scale" not in err
    assert main(["generate", "--model-dir", models, *ARGS, "--sample-method", "nope", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--sample-method" in err and "sample_method" not in err
    assert cli_message(JobError("n must be at most 10", "n")) == "-n must be at most 10"
    assert cli_message(JobError("bad value", "control_image")) == "--control-image: bad value"


def test_generate_options_are_the_job_fields():
    options = build_parser()._subparsers._group_actions[0].choices["generate"]._option_string_actions
    schema = request_schema()
    for field in FIELDS:
        if not field.cli:  # (--model names a model to load, not the API's served-model name)
            assert "--" + field.name.replace("_", "-") not in options or field.name in ("model", "control_net"), field.name
            continue
        action = options["--" + field.name.replace("_", "-")]
        assert action.default is None and action.required == (field.name == "prompt"), field.name
        if "default" in schema[field.name] and schema[field.name]["default"] != "":  # the table's
            assert action.help.endswith(f"(default: {schema[field.name]['default']})"), field.name
        elif schema[field.name]["description"].endswith("(default: the model's)"):
            assert action.help.endswith("(default: the model's)"), field.name
        assert all(choice in action.help for choice in schema[field.name].get("enum", ())), field.name
    assert options["-n"] is options["--n"]
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "-n", "2", "--strength", "0.5",
                                      "--control-preprocess", "Canny"])
    assert (args.n, args.strength, args.control_preprocess, args.steps, args.seed) == (2, 0.5, "Canny", None, None)


def test_generate_refuses_what_the_model_cannot_do_before_loading_it(tmp_path):
    from types import SimpleNamespace

    Image.new("RGB", (64, 64)).save(tmp_path / "edges.png")
    sd3_like = Capabilities("sd3", controlnet=False, size_multiple=16, largest_side=1536)
    info = ModelInfo(name="m", family="sd3", created=0, defaults=ModelDefaults(), has_controlnet=False, folder=None,
                     capabilities=sd3_like)
    registry = SimpleNamespace(default_name="m", info=lambda: info, loras=SimpleNamespace(family=lambda name: "flux"),
                               upscalers=SimpleNamespace(names=lambda: ["lanczos"]))
    base = ["generate", "--model", "m", "--prompt", "a cat", "--size", "512x512"]
    for extra, param, code in [(["--control-image", str(tmp_path / "edges.png")], "control_image",
                                "controlnet_unavailable"),
                               (["--lora", "realism:0.5"], "loras", "lora_family_mismatch"),
                               (["--steps", "60", "--scheduler", "lcm"], "steps", "out_of_range"),
                               (["--size", "2048x2048"], "size", "invalid_size"),
                               (["--hr-scale", "2", "--hr-upscaler", "4x-none"], "hr_upscaler", "upscaler_not_found")]:
        with pytest.raises(JobError) as caught:
            job_from_args(build_parser().parse_args([*base, *extra]), registry)
        assert (caught.value.param, caught.value.code) == (param, code)
        assert "--" + param.replace("_", "-") in cli_message(caught.value)


def test_the_random_model_is_not_the_default_beside_real_ones(tmp_path, sd1_folder, caplog, capsys):
    caplog.set_level(logging.INFO)
    models = tmp_path / "models"
    assert main(["generate", "--model-dir", str(models), *ARGS, "-o", str(tmp_path / "o")]) == 0  # builds the tiny one
    assert (models / TINY_MODEL_NAME / MANIFEST).exists()
    assert main(["convert", str(sd1_folder), "older", "--model-dir", str(models), "--dtype", "float32"]) == 0
    assert main(["convert", str(sd1_folder), "newer", "--model-dir", str(models)]) == 0
    past = time.time() - 3600
    os.utime(models / "older" / MANIFEST, (past, past))
    os.utime(models / TINY_MODEL_NAME / MANIFEST)  # even when the tiny model is the newest
    registry = ModelRegistry([], models)
    assert registry.default_name == "newer" and TINY_MODEL_NAME not in registry.names()
    assert registry.names() == ["newer", "older"]
    assert "default model: newer" in caplog.text
    assert not registry.info().random_weights
    assert ModelRegistry([TINY_MODEL_NAME], models).info().random_weights

    capsys.readouterr()
    assert main(["models", "--model-dir", str(models)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "SIZE", "DTYPE", "SOURCE"]
    assert [line.split()[0] for line in lines[1:]] == ["newer", "older", TINY_MODEL_NAME]  # the tiny one once
    newer, older, tiny = lines[1:]
    assert newer.split()[1:4] == ["sd1", *newer.split()[2:4]] and "float16" in newer and "float32" in older
    assert "MB" in newer.split()[3] or "KB" in newer.split()[3]
    assert str(sd1_folder.resolve()) in newer
    assert "RANDOM WEIGHTS" in tiny


def test_convert_by_name_into_the_model_dir_and_rm(tmp_path, sd1_folder, capsys):
    models = tmp_path / "models"
    assert main(["convert", str(sd1_folder), "mine", "--model-dir", str(models), "--quantize", "8"]) == 0
    manifest = json.loads((models / "mine" / MANIFEST).read_text())
    assert manifest["name"] == "mine" and manifest["source"]["from"] == str(sd1_folder.resolve())
    assert manifest["source"]["converted"].endswith("Z")
    # no name: the source's; a path with a slash: that folder; --output: elsewhere, by name
    assert main(["convert", str(sd1_folder), "--model-dir", str(models)]) == 0
    assert (models / "tiny-sd" / MANIFEST).exists()
    assert main(["convert", str(sd1_folder), str(tmp_path / "elsewhere"), "--model-dir", str(models)]) == 0
    assert (tmp_path / "elsewhere" / MANIFEST).exists()
    assert main(["convert", str(sd1_folder), "named", "--output", str(tmp_path / "out-dir")]) == 0
    assert json.loads((tmp_path / "out-dir" / MANIFEST).read_text())["name"] == "named"
    assert main(["convert", str(sd1_folder), "mine", "--model-dir", str(models)]) == 1  # exists: refused
    capsys.readouterr()
    assert main(["models", "--model-dir", str(models)]) == 0
    assert "float16 q8" in capsys.readouterr().out

    assert main(["rm", "mine", "--model-dir", str(models)]) == 0
    assert not (models / "mine").exists() and "removed mine" in capsys.readouterr().out
    assert main(["rm", "mine", "--model-dir", str(models)]) == 1
    assert "no model named 'mine'" in capsys.readouterr().err
    assert main(["rm", TINY_MODEL_NAME, "--model-dir", str(models)]) == 1
    assert "built in" in capsys.readouterr().err
    assert main(["rm", "../models", "--model-dir", str(models)]) == 1 and models.exists()


SDXL_REPO = [  # the weight files of stabilityai/stable-diffusion-xl-base-1.0 (abridged) and its configs
    "model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
    "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer_2/vocab.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder_2/model.safetensors",  # (no fp16 variant here: the full one is kept)
    "sd_xl_base_1.0.safetensors", "unet/diffusion_pytorch_model.bin",
]


def test_pull_downloads_only_the_precision_it_keeps():
    from huggingface_hub.utils import filter_repo_objects

    def kept(dtype):
        return set(filter_repo_objects(SDXL_REPO, allow_patterns=allow_patterns(SDXL_REPO, dtype)))

    weights = {f for f in kept("float16") if f.endswith(".safetensors")}
    assert weights == {"unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                       "text_encoder/model.fp16.safetensors", "text_encoder_2/model.safetensors"}
    assert "model_index.json" in kept("float16") and "tokenizer_2/vocab.json" in kept("float16")
    full = {f for f in kept("float32") if f.endswith(".safetensors")}
    assert full == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"}
    assert allow_patterns(SDXL_REPO, "bfloat16") == ALLOW_PATTERNS


def test_version_and_help(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mlx-sd-server {version('mlx-sd-server')}"
    top = build_parser().format_help()
    assert "OpenAI-compatible" in top and "rm" in top
    generate = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert all(name in generate for name in SAMPLE_METHODS + SCHEDULERS)
    assert "(default: mlx)" in generate and "--output-format" in generate and "--force" in generate
    serve = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "(default: 8080)" in serve and "(default: None)" not in serve


def test_upscale_writes_the_enlarged_image(tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "out.webp"
    Image.new("RGB", (50, 30), "red").save(source)
    models = ["--model-dir", str(tmp_path / "models")]
    assert main(["upscale", str(source), "-o", str(out), "--upscaler", "lanczos", "--scale", "2.5", *models]) == 0
    assert Image.open(out).size == (125, 75) and Image.open(out).format == "WEBP"
    assert main(["upscale", str(source), "-o", str(out), "--upscaler", "lanczos", *models]) == 1  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["upscale", str(source), "-o", str(tmp_path / "b.png"), *models]) == 2  # none converted
    assert "--upscaler" in capsys.readouterr().err
    assert main(["upscale", str(source), "-o", str(tmp_path / "c.png"), "--upscaler", "lanczos", "--scale", "200",
                 *models]) == 2  # 10000x6000: over the pixel limit
    assert not (tmp_path / "c.png").exists()
