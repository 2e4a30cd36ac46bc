"""Upscalers against spandrel 0.4.2 (the reference; installed without its dependencies: torchvision never is) on
random-weight files: ESRGAN's old, BSRGAN's and Real-ESRGAN's key layouts at odd widths, depths and grow
channels, scales 1/2/4/8 (x2 and x1 by pixel-unshuffle), ESRGAN+, and SRVGGNetCompact in both released
variants' shapes (smaller). Float32 outputs on [0, 1] images within 1e-4 max abs of spandrel's, hyperparameters
inferred as spandrel infers them; tiled = untiled within TILED_TOLERANCE; .pth refused without allow_pickle and
read (weights only) with it; `convert` writes upscalers/NAME and the library lists and runs it; the
repeat-then-resize makes exact sizes."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file

from convert.source import PickleRefusedError
from mlx_sd_server.cli import main
from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.source import CheckpointError
from mlx_sd_server.upscale.library import OVERLAP, UPSCALER_FOLDER, UpscalerLibrary, enlarge
from mlx_sd_server.upscale.networks import ESRGAN, SRVGG, RRDBNetConfig, SRVGGConfig, build_network
from mlx_sd_server.upscale.weights import CONFIG_FILE, WEIGHTS_FILE, load_network, read_upscaler

MAX_ABS = 1e-4  # float32 outputs on [0, 1] inputs, against spandrel
TILED_TOLERANCE = 1  # uint8 levels: tiled against untiled (what library.py's TILE/OVERLAP comment states)


def spandrel_arch(name: str) -> types.ModuleType:
    """One of spandrel's architecture modules alone: spandrel's own __init__ imports every architecture, some
    of which need torchvision, which this project never installs; ESRGAN and Compact need only torch."""
    if "spandrel" not in sys.modules:
        spec = importlib.util.find_spec("spandrel")
        assert spec is not None and spec.submodule_search_locations, "spandrel is a test dependency (bootstrap)"
        package = types.ModuleType("spandrel")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["spandrel"] = package  # its submodules import as usual; its __init__ does not run
    return importlib.import_module(f"spandrel.architectures.{name}")


ESRGAN_ARCH = spandrel_arch("ESRGAN")
COMPACT_ARCH = spandrel_arch("Compact")
BLOCKS = importlib.import_module("spandrel.architectures.__arch_helpers.block")


def randomized(model: torch.nn.Module, seed: int, gain: float = 1.0) -> dict[str, torch.Tensor]:
    """`model`'s state with weights N(0, gain^2/fan_in), biases small, PReLU slopes in [0, 0.3): outputs that
    vary through every depth tested, where torch's default init makes them nearly constant. (Unit gain for
    RRDBNet, whose residuals carry the signal; ~He's for SRVGGNet's plain stack of PReLUs.)"""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.ndim == 4:
            fan_in = value.shape[1] * value.shape[2] * value.shape[3]
            drawn = torch.randn(value.shape, generator=generator) * (gain / math.sqrt(fan_in))
        elif key.endswith("bias"):
            drawn = torch.randn(value.shape, generator=generator) * 0.05
        else:  # PReLU slopes
            drawn = torch.rand(value.shape, generator=generator) * 0.3
        state[key] = drawn
    model.load_state_dict(state)
    return state


def to_new_layout(state: dict[str, torch.Tensor], upsamples: int, bsrgan: bool = False) -> dict[str, torch.Tensor]:
    """An old-layout RRDBNet state as Real-ESRGAN (or BSRGAN) names it, written out here independently."""
    names = {"model.0": "conv_first", f"model.{3 * upsamples + 2}": "HRconv" if bsrgan else "conv_hr"}
    names[f"model.{3 * upsamples + 4}"] = "conv_last"
    names.update({f"model.{3 * i}": f"{'upconv' if bsrgan else 'conv_up'}{i}" for i in range(1, upsamples + 1)})
    out = {}
    for key, value in state.items():
        head, kind = key.rsplit(".", 1)
        parts = head.split(".")
        if head in names:
            out[f"{names[head]}.{kind}"] = value
        elif len(parts) == 4:  # model.1.sub.N: the trunk's last conv
            out[f"{'trunk_conv' if bsrgan else 'conv_body'}.{kind}"] = value
        else:  # model.1.sub.N.RDBj.convk.0
            block, rdb, conv = parts[3], parts[4], parts[5]
            new = f"RRDB_trunk.{block}.{rdb}.{conv}" if bsrgan else f"body.{block}.{rdb.lower()}.{conv}"
            out[f"{new}.{kind}"] = value
    return out


def ours(path: Path, allow_pickle: bool = False):
    read = read_upscaler(path, allow_pickle)
    network = build_network(read.arch, read.config.to_dict())
    network.load_weights(list(read.weights.items()), strict=True)
    return read, network


def compare(network, reference: torch.nn.Module, height: int, width: int, residual: bool = False) -> float:
    """Max abs difference of the two networks' float32 outputs on one random [0, 1] image. `residual`: the
    network adds the nearest-upsampled input, which the varied output checked must be more than."""
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        varied = expected - F.interpolate(x, scale_factor=network.scale) if residual else expected
    expected = expected.numpy().transpose(0, 2, 3, 1)
    got = np.array(network(mx.array(x.numpy().transpose(0, 2, 3, 1))))
    assert got.shape == expected.shape
    assert float(varied.std()) > 0.05  # the random weights make a varied image, not a constant
    return float(np.abs(got - expected).max())


def save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous().numpy() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))
    return path


# (name, spandrel's RRDBNet arguments, layout, input size); each loaded by spandrel's ESRGANArch from the file's
# own state, so spandrel infers the hyperparameters from it as from a downloaded file
ESRGAN_CASES = [
    ("old_x4", dict(num_filters=24, num_blocks=3, scale=4), "old", (13, 17)),
    ("old_x8", dict(num_filters=16, num_blocks=1, scale=8), "old", (10, 9)),  # its tail: banded convolutions
    ("old_x1", dict(num_filters=16, num_blocks=2, scale=1), "old", (15, 11)),
    ("esrgan_plus_x2", dict(num_filters=16, num_blocks=1, scale=2, plus=True), "old", (10, 13)),
    ("real_esrgan_x4", dict(num_filters=24, num_blocks=3, scale=4), "new", (11, 14)),
    ("real_esrgan_x2", dict(in_nc=12, num_filters=20, num_blocks=2, scale=4, shuffle_factor=2), "new", (13, 9)),
    ("real_esrgan_x1", dict(in_nc=48, num_filters=16, num_blocks=1, scale=4, shuffle_factor=4), "new", (14, 10)),
    ("bsrgan_x4", dict(num_filters=16, num_blocks=2, scale=4), "bsrgan", (12, 12)),
]


@pytest.mark.parametrize("name, arguments, layout, size", ESRGAN_CASES, ids=[c[0] for c in ESRGAN_CASES])
def test_esrgan_layouts_match_spandrel(tmp_path, name, arguments, layout, size):
    built = ESRGAN_ARCH.ESRGAN(**arguments)
    state = randomized(built, seed=len(name))
    upsamples = int(math.log2(arguments["scale"]))
    if layout != "old":
        state = to_new_layout(state, upsamples, bsrgan=layout == "bsrgan")
    descriptor = ESRGAN_ARCH.ESRGANArch().load(dict(state))  # spandrel reads the file's state itself
    reference = descriptor.model.eval()
    read, network = ours(save(tmp_path / f"{name}.safetensors", state))

    hyper = reference.hyperparameters
    shuffle = hyper["shuffle_factor"] or 1
    assert read.arch == ESRGAN
    assert read.config == RRDBNetConfig(
        num_in_ch=hyper["in_nc"] // shuffle**2,
        num_out_ch=hyper["out_nc"],
        num_feat=hyper["num_filters"],
        num_block=hyper["num_blocks"],
        num_grow_ch=32,  # spandrel's RRDBNet has no other
        scale=descriptor.scale,
        unshuffle=shuffle,
        plus=hyper["plus"],
    )
    error = compare(network, reference, *size)
    print(f"{name}: max abs {error:.2e}")
    assert error <= MAX_ABS


@pytest.mark.parametrize("layout, scale", [("old", 2), ("new", 4)])
def test_esrgan_grow_channels_other_than_32(tmp_path, layout, scale):
    """spandrel's loader fixes the grow channels at 32: the reference here is its RRDBNet with its RRDB blocks
    rebuilt at 12 grow channels (its own block classes), which is what such a file is."""
    reference = ESRGAN_ARCH.ESRGAN(num_filters=24, num_blocks=3, scale=scale).eval()
    trunk = reference.model[1].sub
    for i in range(3):
        trunk[i] = BLOCKS.RRDB(nf=24, gc=12, act_type="leakyrelu")
    state = randomized(reference, seed=scale)
    if layout == "new":
        state = to_new_layout(state, int(math.log2(scale)))
    read, network = ours(save(tmp_path / "grow.safetensors", state))
    assert read.config == RRDBNetConfig(num_feat=24, num_block=3, num_grow_ch=12, scale=scale)
    error = compare(network, reference, 12, 15)
    print(f"{layout} x{scale} grow 12: max abs {error:.2e}")
    assert error <= MAX_ABS


# realesr-general-x4v3 (64 features, 32 convolutions) and realesr-animevideov3 (64, 16), at 16 features; and a x2
# on an input large enough (> BandedConv2d.BAND_PIXELS) for the convolutions to run in bands on the CPU
SRVGG_GAIN = 1.35
SRVGG_CASES = [("general_x4v3", 32, 4, (14, 11)), ("animevideov3", 16, 4, (14, 11)), ("compact_x2", 8, 2, (72, 64))]


@pytest.mark.parametrize("name, num_conv, scale, size", SRVGG_CASES, ids=[c[0] for c in SRVGG_CASES])
def test_srvgg_matches_spandrel(tmp_path, name, num_conv, scale, size):
    built = COMPACT_ARCH.Compact(num_feat=16, num_conv=num_conv, upscale=scale)
    state = randomized(built, seed=num_conv, gain=SRVGG_GAIN)
    descriptor = COMPACT_ARCH.CompactArch().load(dict(state))
    reference = descriptor.model.eval()
    read, network = ours(save(tmp_path / f"{name}.safetensors", state))
    hyper = reference.hyperparameters
    assert read.arch == SRVGG
    assert read.config == SRVGGConfig(
        hyper["num_in_ch"], hyper["num_out_ch"], hyper["num_feat"], hyper["num_conv"], hyper["upscale"]
    )
    assert read.config.scale == descriptor.scale == scale
    error = compare(network, reference, *size, residual=True)
    print(f"{name}: max abs {error:.2e}")
    assert error <= MAX_ABS


def test_tiled_equals_untiled_within_the_stated_tolerance(tmp_path):
    """Tiles of 96 sharing the library's default overlap (48; its default tile is 256: the same blend, more
    context per tile) over images of 3x2 tiles, for an RRDBNet and a compact network as deep as
    realesr-general-x4v3 (random weights at He's gain: no trained network's influence reaches further):
    uint8 results within TILED_TOLERANCE of one pass."""
    references = {
        "rrdb": (ESRGAN_ARCH.ESRGAN(num_filters=16, num_blocks=2, scale=2), (150, 120), 1.0),
        "srvgg": (COMPACT_ARCH.Compact(num_feat=16, num_conv=32, upscale=4), (150, 120), SRVGG_GAIN),
    }
    for name, (reference, size, gain) in references.items():
        pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
        _, network = ours(save(tmp_path / f"{name}.safetensors", randomized(reference, seed=3, gain=gain)))
        whole = enlarge(network, pixels, tile=1024)
        tiled = enlarge(network, pixels, tile=96, overlap=OVERLAP)
        assert tiled.shape == whole.shape == (size[0] * network.scale, size[1] * network.scale, 3)
        difference = np.abs(tiled.astype(int) - whole.astype(int))
        print(f"{name}: tiled vs untiled max {difference.max()} levels, mean {difference.mean():.2e}")
        assert difference.max() <= TILED_TOLERANCE and difference.mean() < 0.01


def real_esrgan_x2(seed: int = 5) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A small Real-ESRGAN x2plus-shaped network (pixel-unshuffled input) and its state in basicsr's names."""
    reference = ESRGAN_ARCH.ESRGAN(in_nc=12, num_filters=16, num_blocks=1, scale=4, shuffle_factor=2).eval()
    return reference, to_new_layout(randomized(reference, seed), upsamples=2)


def test_pickles_only_when_allowed_and_read_without_running_code(tmp_path):
    reference, state = real_esrgan_x2()
    safetensors = save(tmp_path / "x2.safetensors", state)
    wrapped = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": state}, str(wrapped))  # as basicsr saves its models
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        read_upscaler(wrapped)
    read, _ = ours(wrapped, allow_pickle=True)
    expected = read_upscaler(safetensors)
    assert read.config == expected.config and read.config.scale == 2 and read.config.unshuffle == 2
    assert all(np.array_equal(np.array(read.weights[k]), np.array(v)) for k, v in expected.weights.items())
    compact = COMPACT_ARCH.Compact(num_feat=8, num_conv=2, upscale=4)
    torch.save({"params": {f"module.{k}": v for k, v in randomized(compact, 1).items()}}, str(tmp_path / "c.pth"))
    assert read_upscaler(tmp_path / "c.pth", allow_pickle=True).config == SRVGGConfig(3, 3, 8, 2, 4)

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"params_ema": state, "x": Payload()}, str(tmp_path / "evil.pth"))
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_upscaler(tmp_path / "evil.pth", allow_pickle=True)


def test_unknown_or_inconsistent_tensors_name_the_file(tmp_path):
    _, state = real_esrgan_x2()
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*tensors no esrgan layout has: surprise\.weight"):
        read_upscaler(save(tmp_path / "extra.safetensors", {**state, "surprise.weight": torch.zeros(2)}))
    broken = {k: v for k, v in state.items() if k != "body.0.rdb2.conv3.weight"}
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: not a consistent esrgan network"):
        read_upscaler(save(tmp_path / "broken.safetensors", broken))
    with pytest.raises(CheckpointError, match=r"other\.safetensors is not an upscaler"):
        read_upscaler(save(tmp_path / "other.safetensors", {"encoder.weight": torch.zeros(2, 2)}))


def test_convert_into_the_model_directory_then_list_and_run(tmp_path, capsys):
    reference, state = real_esrgan_x2()
    models = tmp_path / "models"
    source = save(tmp_path / "RealESRGAN_x2plus.safetensors", state)
    assert main(["convert", str(source), "--model-dir", str(models), "--dtype", "float32"]) == 0
    folder = models / UPSCALER_FOLDER / "realesrgan_x2plus"
    assert "upscaler=realesrgan_x2plus" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((folder / CONFIG_FILE).read_text())["config"]["unshuffle"] == 2
    assert not [p for p in (models / UPSCALER_FOLDER).iterdir() if p.name.startswith(".")]  # nothing partial

    pickled = tmp_path / "4x-Compact.pth"
    torch.save(randomized(COMPACT_ARCH.Compact(num_feat=8, num_conv=2, upscale=4), 2), str(pickled))
    assert main(["convert", str(pickled), "--model-dir", str(models)]) == 1  # a pickle needs --allow-pickle
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["convert", str(pickled), "--model-dir", str(models), "--allow-pickle", "--name", "compact"]) == 0
    assert main(["convert", str(source), "lanczos", "--model-dir", str(models)]) == 1  # a built-in's name
    assert main(["convert", str(source), "realesrgan_x2plus", "--model-dir", str(models)]) == 1  # taken

    library = UpscalerLibrary(models / UPSCALER_FOLDER)
    assert library.names() == ["lanczos", "nearest", "compact", "realesrgan_x2plus"]
    info = library.info("realesrgan_x2plus")
    assert (info.arch, info.scale, info.folder) == (ESRGAN, 2, folder)
    assert library.info("compact").arch == SRVGG and library.info("compact").scale == 4
    assert load_network(models / UPSCALER_FOLDER / "compact").parameters()["body"][0]["weight"].dtype == mx.float32
    with pytest.raises(JobError) as missing:
        library.info("4x-ultrasharp")
    assert (missing.value.code, missing.value.status, missing.value.param) == ("upscaler_not_found", 404, "upscaler")

    pixels = np.random.default_rng(2).integers(0, 256, (21, 26, 3), dtype=np.uint8)
    made = library.upscale("realesrgan_x2plus", Image.fromarray(pixels), 2)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels.transpose(2, 0, 1)[None] / 255.0).float())
    expected = (expected[0].clamp(0, 1).numpy().transpose(1, 2, 0) * 255.0).round()  # as A1111 makes an image
    assert made.size == (52, 42)
    assert np.abs(np.asarray(made).astype(int) - expected.astype(int)).max() <= 1

    image_file, output = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(pixels).save(image_file)
    command = ["upscale", str(image_file), "-o", str(output), "--upscaler", "compact"]
    assert main([*command, "--model-dir", str(models)]) == 0
    assert Image.open(output).size == (104, 84)


@pytest.mark.parametrize(
    "network_scale, scale, passes",
    [(2, 3, 2), (2, 1.5, 1), (2, 1, 1), (2, 9, 3), (1, 2, 1), (4, 0.5, 0)],
)
def test_repeat_then_resize_makes_exact_sizes(tmp_path, monkeypatch, network_scale, scale, passes):
    """A1111's Upscaler.upscale: the network again while the image is smaller than the target (at most 3
    times; at scale 1 once, a restoration), then Lanczos to exactly round(w*scale) x round(h*scale)."""
    config = SRVGGConfig(num_feat=4, num_conv=1, upscale=network_scale)
    state = randomized(COMPACT_ARCH.Compact(num_feat=4, num_conv=1, upscale=network_scale), 0)
    folder = tmp_path / UPSCALER_FOLDER
    main(["convert", str(save(tmp_path / "net.safetensors", state)), "--model-dir", str(tmp_path)])
    library = UpscalerLibrary(folder)
    assert library.info("net").scale == config.upscale
    sizes = []
    real_enlarge = enlarge

    def counted(network, pixels, tile, overlap):
        sizes.append(pixels.shape[:2])
        return real_enlarge(network, pixels, tile, overlap)

    monkeypatch.setattr("mlx_sd_server.upscale.library.enlarge", counted)
    made = library.upscale("net", Image.new("RGB", (13, 7), (200, 30, 90)), scale)
    assert made.size == (round(13 * scale), round(7 * scale)) and made.mode == "RGB"
    assert len(sizes) == passes
    assert sizes == [(7 * network_scale**i, 13 * network_scale**i) for i in range(passes)]
