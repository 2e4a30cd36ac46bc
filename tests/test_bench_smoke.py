"""Each bench script at its smoke size, in a subprocess as a user runs it: that it still runs on a fresh clone
and prints its table (bench modules are imported by file, so nothing else would notice a broken one).

By default (40-75 s on the 2-core CI machine, depending on its load): the kernel benches' --smoke
(attention.py, conv.py, kernel_speed.py, blas.py: tiny shapes, one repeat), server.py and streaming.py at
64x64, lora.py and hires_memory.py --smoke (the tiny SD 1.x), bench/gpu.sh --dry-run (its driver on tiny
models on the CPU, the same table it prints on a GPU), and bench/gpu.sh on a machine without a GPU (status 2
and why, at once).

Marker `bench_smoke` (not in the default run; .ci/run runs it, ~5 min here): engine.py and profile_sd.py
--smoke (a tiny model, but a diffusers child and a conversion: ~30 s), realsize_parity.py (one real-size VAE at a 4x4 latent), and
the real-width memory benches at their smallest (flux.py, sd3.py, kontext.py, dit_memory.py): they measure
real widths, so a block of each is the least they build (15-95 s each); a tiny-width mode would measure
nothing they are for. Not run: model_switch.py (tests/test_bench_model_switch.py runs its --smoke), models.py
(the builder the --smoke runs use), common.py (helpers), cluster_throughput.py (new, another change's).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run(arguments: list[str], timeout: float, **options) -> str:
    """A bench run to its end: its stdout; stderr's end shown if it fails."""
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **options)
    assert result.returncode == 0, (
        f"{arguments}: status {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def bench(script: str, *arguments: str, timeout: float = 120) -> str:
    return run([sys.executable, str(BENCH / script), *arguments], timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One model cache for the module: the tiny SD 1.x is built once."""
    return str(tmp_path_factory.mktemp("bench-cache"))


@pytest.mark.parametrize(
    "script, rows",
    [
        ("attention.py", ["torch sdpa", "mx.fast sdpa", "attention() [ours, numpy]"]),
        ("conv.py", ["torch conv2d", "mx.conv2d", "9 shifted matmuls", "winograd [ours]"]),
        ("kernel_speed.py", ["group_norm", "gelu_tanh", "smoke 8x128>256"]),
        ("blas.py", ["matmul 64x64x64", "conv3x3 1x8x8x32"]),
    ],
)
def test_kernel_benches(script, rows):
    out = bench(script, "--smoke")
    for row in rows:
        assert row in out, out


def test_server_and_streaming_benches():
    out = bench("server.py", "--size", "64x64", "--steps", "1", "--runs", "1")
    assert "POST /v1/images/generations" in out and "server overhead" in out, out
    out = bench("streaming.py", "--size", "64x64", "--steps", "2", "--partials", "1", "--runs", "1")
    assert "streamed, 1 partial images" in out, out


def test_lora_bench(cache):
    out = bench("lora.py", "--smoke", "--cache", cache)
    assert re.search(r"UNet step, r4 fused +[\d.]+", out) and "r4 bind (first use)" in out, out


def test_hires_memory_bench():
    out = bench("hires_memory.py", "--smoke")
    assert "64x64 -> 128x128" in out and re.search(r"hires job: MLX peak \(GB\) +[\d.]+", out), out


GPU_ROWS = [
    "step, MLX (s)",
    "step, diffusers (s)",
    "image, MLX (s)",
    "image, diffusers (s)",
    "image, MLX/diffusers",
    "peak memory, MLX (GB)",
    "peak memory, diffusers (GB)",
    "rounds",
]
GPU_COLUMNS = ["SD 1.5 512", "SDXL 1024", "FLUX.1s bf16", "FLUX.1s 4-bit", "Z-Image-Turbo"]


def test_gpu_dry_run(tmp_path):
    """The GPU benchmark's every step on the CPU: each case's diffusers pipeline built and converted by our
    converter, both engines in their children, alternating, one table with a number in every timed cell."""
    out = run([str(BENCH / "gpu.sh"), "--dry-run", "--work", str(tmp_path)], timeout=300)
    assert "--dry-run: tiny models on the CPU" in out, out
    header = next(line for line in out.splitlines() if "SD 1.5 512" in line)
    assert header.split() == " ".join(GPU_COLUMNS).split(), out
    for row in GPU_ROWS:
        line = next((line for line in out.splitlines() if line.startswith(row)), None)
        assert line is not None, out
        cells = line[len(row) :].split()
        assert len(cells) == len(GPU_COLUMNS), line
        if "diffusers (GB)" in row:  # torch.cuda's peak: no GPU here
            assert set(cells) == {"-"}, line
        else:
            assert all(re.fullmatch(r"[\d.]+", cell) and float(cell) > 0 for cell in cells), line
    assert "ours 4-bit (--quantize 4), diffusers bfloat16" in out and "skipped" not in out, out


def test_gpu_script_without_a_gpu(tmp_path):
    """No usable GPU: status 2 and a sentence that says so, before anything is installed."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n'
    )
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", MLX_SD_GPU_VENV=str(tmp_path / "venv"))
    result = subprocess.run([str(BENCH / "gpu.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert "no usable NVIDIA GPU" in result.stderr and "couldn't communicate" in result.stderr
    assert not (tmp_path / "venv").exists()


# --- bench_smoke: .ci/run's second run of this file -------------------------------------------------------


@pytest.mark.bench_smoke
def test_engine_bench(cache):
    out = bench("engine.py", "--smoke", "--cache", cache, timeout=300)
    for row in ("load (s)", "UNet eval, CFG batch 2 (s)", "VAE decode (s)", "image, 2 steps (s)", "MLX peak memory"):
        assert row in out, out


@pytest.mark.bench_smoke
def test_profile_bench(cache):
    out = bench("profile_sd.py", "--smoke", "--cache", cache, timeout=300)
    for part in ("unet", "vae"):
        assert f"tiny-sd1 {part}, 64x64" in out, out
    assert re.search(r"conv 3x3 +[\d.]+ +[\d.]+", out) and "unprofiled call" in out, out


@pytest.mark.bench_smoke
def test_realsize_parity_bench():
    out = bench("realsize_parity.py", "--models", "sd15", "--components", "vae", "--vae-latent", "4", timeout=300)
    assert "all outputs within max_rel_err" in out, out


REAL_WIDTH = {
    "flux.py": (["--blocks", "1", "--size", "64x64", "--text-tokens", "16", "--t5-layers", "1"], "whole image"),
    "sd3.py": (["--blocks", "1", "--size", "64x64", "--text-tokens", "16"], "full-depth step peak"),
    "kontext.py": (
        ["--blocks", "1,1", "--size", "64x64", "--reference", "64x64", "--text-tokens", "16", "--attention-heads", "1"],
        "reference",
    ),
    "dit_memory.py": (
        ["--model", "zimage-turbo", "--blocks", "1", "--te-layers", "1", "--size", "64x64", "--text-tokens", "16"],
        "whole image",
    ),
}


@pytest.mark.bench_smoke
@pytest.mark.parametrize("script", list(REAL_WIDTH))
def test_real_width_benches(script):
    arguments, expected = REAL_WIDTH[script]
    out = bench(script, *arguments, timeout=600)
    assert expected in out, out
