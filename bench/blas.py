"""MLX matmul and conv3x3 throughput with the bundled reference BLAS against a real one (OpenBLAS).

MLX's CPU wheel links the netlib reference BLAS; `mlx_sd_server.blas` re-execs with a real BLAS in
LD_PRELOAD. This script measures what that buys, and which OPENBLAS_NUM_THREADS to use: it runs itself
once per configuration in a child process (the preload must be in place before the process starts) and
prints one table, with torch (its own bundled BLAS) as the reference.

    python bench/blas.py [--threads 1,2] [--repeats 5]
    python bench/blas.py --smoke      # tiny workloads, one thread count, one repeat: that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shapes are SD 1.5's; --smoke's are tiny.
MATMUL_SIZES = [(1024, 1024, 1024), (4096, 320, 320), (8192, 40, 4096)]
CONV_SHAPES = [(2, 64, 64, 320), (2, 16, 16, 1280)]  # NHWC input, 3x3 conv to the same channel count
SMOKE_MATMUL_SIZES = [(64, 64, 64)]
SMOKE_CONV_SHAPES = [(1, 8, 8, 32)]


def best_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocation, thread-pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_mlx(repeats: int) -> dict[str, float]:
    import mlx.core as mx

    rows = {}
    for m, k, n in MATMUL_SIZES:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        seconds = best_seconds(lambda: mx.eval(a @ b), repeats)
        rows[f"matmul {m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
    for batch, h, w, c in CONV_SHAPES:
        x, weight = mx.random.normal((batch, h, w, c)), mx.random.normal((c, 3, 3, c)) * 0.02
        mx.eval(x, weight)
        seconds = best_seconds(lambda: mx.eval(mx.conv2d(x, weight, padding=1)), repeats)
        rows[f"conv3x3 {batch}x{h}x{w}x{c}"] = 2 * batch * h * w * c * c * 9 / seconds / 1e9
    return rows


def measure_torch(repeats: int) -> dict[str, float]:
    import torch

    rows = {}
    with torch.inference_mode():
        for m, k, n in MATMUL_SIZES:
            a, b = torch.randn(m, k), torch.randn(k, n)
            seconds = best_seconds(lambda: a @ b, repeats)
            rows[f"matmul {m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
        for batch, h, w, c in CONV_SHAPES:
            x, weight = torch.randn(batch, c, h, w), torch.randn(c, c, 3, 3) * 0.02
            seconds = best_seconds(lambda: torch.nn.functional.conv2d(x, weight, padding=1), repeats)
            rows[f"conv3x3 {batch}x{h}x{w}x{c}"] = 2 * batch * h * w * c * c * 9 / seconds / 1e9
    return rows


def run_child(library: str, preload: str | None, threads: int, repeats: int, smoke: bool) -> dict[str, float]:
    env = dict(os.environ, MLX_SD_NO_BLAS_REEXEC="1", OPENBLAS_NUM_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads))
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    command = [sys.executable, __file__, "--child", library, "--repeats", str(repeats)] + (["--smoke"] if smoke else [])
    return json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="OPENBLAS_NUM_THREADS values to try")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="skip the (slow) netlib reference BLAS")
    parser.add_argument("--smoke", action="store_true", help="tiny workloads, one thread count, one repeat")
    parser.add_argument("--child", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        global MATMUL_SIZES, CONV_SHAPES
        MATMUL_SIZES, CONV_SHAPES = SMOKE_MATMUL_SIZES, SMOKE_CONV_SHAPES
        args.threads, args.repeats = "1", 1
    if args.child:
        measure = measure_mlx if args.child == "mlx" else measure_torch
        print(json.dumps(measure(args.repeats)))
        return

    from mlx_sd_server.blas import find_fast_blas

    fast_blas = find_fast_blas()
    print(f"real BLAS found: {fast_blas}")
    columns = {}
    if not args.skip_reference:
        columns["mlx netlib"] = run_child("mlx", None, 1, min(args.repeats, 2), args.smoke)
    for threads in [int(t) for t in args.threads.split(",")]:
        if fast_blas:
            columns[f"mlx openblas t{threads}"] = run_child("mlx", fast_blas, threads, args.repeats, args.smoke)
        columns[f"torch t{threads}"] = run_child("torch", None, threads, args.repeats, args.smoke)

    names = list(next(iter(columns.values())))
    print("GFLOP/s (higher is better)")
    print(f"{'workload':28}" + "".join(f"{c:>18}" for c in columns))
    for name in names:
        print(f"{name:28}" + "".join(f"{columns[c][name]:18.1f}" for c in columns))


if __name__ == "__main__":
    main()
