"""The command line: `generate` writes images through the same job type and engine as the server."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mlx_sd_server.cli import main
from mlx_sd_server.registry import TINY_MODEL_NAME

ARGS = ["--model", TINY_MODEL_NAME, "--prompt", "a photo of a cat", "--size", "64x64", "--steps", "2"]


def test_generate_writes_pngs_with_parameters(tmp_path):
    models = str(tmp_path / "models")
    assert main(["generate", "--model-dir", models, *ARGS, "-n", "2", "--seed", "5", "-o", str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [f"{TINY_MODEL_NAME}-5.png", f"{TINY_MODEL_NAME}-6.png"]
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)
        assert "Seed: 5" in image.info["parameters"] and "Steps: 2" in image.info["parameters"]
    # the same job gives the same bytes; image 2 of the batch is seed 6 on its own (up to the last bit of
    # floating point: a batch of 2 and a batch of 1 may round differently inside the BLAS)
    for name in ("again-1.png", "again-2.png"):
        assert main(["generate", "--model-dir", models, *ARGS, "--seed", "6", "-o", str(tmp_path / name)]) == 0
    assert (tmp_path / "again-1.png").read_bytes() == (tmp_path / "again-2.png").read_bytes()
    with Image.open(tmp_path / "again-1.png") as single, Image.open(files[1]) as batched:
        assert np.abs(np.asarray(single, float) - np.asarray(batched, float)).max() <= 2


def test_generate_img2img_and_bad_input(tmp_path, capsys):
    models = str(tmp_path / "models")
    Image.new("RGB", (80, 48), (200, 30, 30)).save(tmp_path / "in.png")
    out = tmp_path / "edit.jpg"
    assert main(["generate", "--model-dir", models, *ARGS, "--image", str(tmp_path / "in.png"), "--strength", "0.5",
                 "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (64, 64)
    assert main(["generate", "--model-dir", models, *ARGS, "--sample-method", "nope", "-o", str(tmp_path)]) == 2
    assert "--sample-method must be one of" in capsys.readouterr().err
    assert main(["generate", "--model-dir", models, *ARGS, "--image", str(tmp_path / "missing.png")]) == 2


def test_generate_takes_several_images_in_order(tmp_path, capsys):
    """`--image` repeated: an edit's input images in order, each file's short sha256 in the metadata. The tiny SD
    model edits one image (a clear error); a model declaring references reads them all (job_from_args)."""
    import dataclasses
    import hashlib

    from api_server import FakeRegistry
    from mlx_sd_server.cli import build_parser
    from mlx_sd_server.generate import job_from_args
    from mlx_sd_server.job import Capabilities

    models = str(tmp_path / "models")
    paths = [str(tmp_path / f"in{i}.png") for i in range(2)]
    for path, size in zip(paths, ((96, 64), (32, 32))):
        Image.new("RGB", size, (200, 30, 30)).save(path)
    hashes = [hashlib.sha256(open(path, "rb").read()).hexdigest()[:10] for path in paths]
    assert main(["generate", "--model-dir", models, *ARGS, "--image", paths[0], "--image", paths[1]]) == 2
    assert "--image: 2 input images, and tiny-random-sd (sd1) takes 1" in capsys.readouterr().err
    out = tmp_path / "edit.png"
    assert main(["generate", "--model-dir", models, *ARGS, "--image", paths[0], "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert f'Input hashes: "image: {hashes[0]}"' in image.info["parameters"]

    class Klein(FakeRegistry):
        def info(self, name=None):
            return dataclasses.replace(super().info(name), capabilities=Capabilities("flux2", img2img=False,
                                                                                     references=2))

    job = job_from_args(build_parser().parse_args(["generate", *ARGS, "--image", paths[1], "--image", paths[0]]),
                        Klein())
    assert [image.size for image in job.reference_images] == [(32, 32), (96, 64)] and job.init_image is None
    assert job.input_hashes == (("image", hashes[1]), ("image", hashes[0]))


def test_models_lists_the_builtin(tmp_path, capsys):
    assert main(["models", "--model-dir", str(tmp_path)]) == 0
    assert TINY_MODEL_NAME in capsys.readouterr().out


def test_serve_listens_on_loopback_by_default():
    from mlx_sd_server.api.server import bind_address
    from mlx_sd_server.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host is None and args.cors_origin == []
    assert bind_address(args) == ("127.0.0.1", 8080)
    assert bind_address(build_parser().parse_args(["serve", "--host", "0.0.0.0"])) == ("0.0.0.0", 8080)


def test_store_retention_options_are_checked_and_kept_as_written(tmp_path, monkeypatch):
    import pytest

    from mlx_sd_server import service
    from mlx_sd_server.api.server import store_from_args
    from mlx_sd_server.cli import build_parser

    args = build_parser().parse_args(["serve", "--store-max-age", "7d", "--store-max-gb", "0.5",
                                      "--store-dir", str(tmp_path / "files")])
    store = store_from_args(args)
    assert (store.max_age, store.max_bytes) == (7 * 86400, 2**29)
    monkeypatch.setenv("MLX_SD_MODEL_DIR", str(tmp_path))
    argv = service.serve_argv(build_parser().parse_args(["service", "install", "--store-max-age", "7d"]))
    assert argv[argv.index("--store-max-age") + 1] == "7d"  # not 604800.0, which would read back as hours
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--store-max-age", "0"])
