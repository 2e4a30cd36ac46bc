"""Helpers the whole-model benchmarks share: timing, running a measurement in a child process, a table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlx_sd_server.blas import DISABLE_ENV


def median_seconds(run: Callable[[], Any], runs: int, warmup: Callable[[], Any] | None = None) -> float:
    """Median wall time of `runs` calls of `run`, after one call of `warmup` (default: `run` itself)."""
    (warmup or run)()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_ms(run: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` calls of `run` in milliseconds, after one warm-up call (kernel benches)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def run_child(arguments: list[str], with_fast_blas: bool = True) -> dict:
    """Run `python ARGUMENTS` and return the JSON object its last stdout line holds; stderr passes through.

    Each measurement runs in its own process so that its memory peak and max RSS are its own. torch brings
    its own BLAS, so its children run without our OpenBLAS preload (as bench/blas.py's do).
    """
    env = dict(os.environ)
    if not with_fast_blas:
        env.pop("LD_PRELOAD", None)
        env[DISABLE_ENV] = "1"
    result = subprocess.run([sys.executable, *arguments], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_parts(script: str, parts: Sequence[str], wanted: str, child_arguments: list[str]) -> dict[str, dict]:
    """Run each of `parts` named in `wanted` (comma-separated) as `script ... --child PART`, one after another,
    each in its own process (run_child); their JSON results by part."""
    chosen = {p.strip() for p in wanted.split(",") if p.strip()}
    results = {}
    for part in parts:
        if part not in chosen:
            continue
        start = time.perf_counter()
        results[part] = run_child([str(Path(script).resolve()), *child_arguments, "--child", part])
        print(f"{part} done in {time.perf_counter() - start:.0f} s; {load_average()}", flush=True)
    return results


def load_average() -> str:
    """The 1/5/15-minute load averages and the core count: how shared the machine was during a run."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {len(os.sched_getaffinity(0))} cores"


def print_table(title: str, columns: list[str], rows: list[tuple[str, list[float | None], str]]) -> None:
    """One row per measurement: a label, a value per column (None: not measured), and the number format."""
    print(title)
    print(f"{'':34}" + "".join(f"{c:>16}" for c in columns))
    for label, values, number_format in rows:
        cells = ["-" if v is None else format(v, number_format) for v in values]
        print(f"{label:34}" + "".join(f"{c:>16}" for c in cells))


def whole_image(
    label: str, weights: dict[str, float], text_encoders: tuple[str, ...], activation: dict[str, float],
    low_memory_decoding: float, unread_while_encoding: tuple[str, ...] = (),
) -> None:
    """Print the peak of a whole image, phase by phase, in GB: the weights resident during each phase plus its
    activations (`activation` by phase: "encoding", "denoising", "decoding"). By default everything stays
    loaded; --low-memory frees the `text_encoders` (names among `weights`) after encoding and decodes with
    `low_memory_decoding` activations (tiles). The denoiser stays loaded between jobs, so a job's text encoding
    has every weight resident in both modes, unless the family frees it while encoding with --low-memory
    (`unread_while_encoding`: names among `weights`, FamilySpec.low_memory_unreads_denoiser)."""
    total = sum(weights.values())
    kept = max(activation, key=lambda phase: activation[phase])
    without_text = total - sum(weights[name] for name in text_encoders)
    encoding = total - sum(weights[name] for name in unread_while_encoding)
    freed = {"encoding": encoding + activation["encoding"], "denoising": without_text + activation["denoising"],
             "decoding": without_text + low_memory_decoding}
    print(f"\nwhole image, {label}:")
    print("  weights: " + " + ".join(f"{name} {value:.2f}" for name, value in weights.items()) + f" = {total:.2f} GB")
    print(f"  default (everything loaded): peak {total + activation[kept]:.2f} GB, while {kept}")
    unread = f", {', '.join(unread_while_encoding)} freed while encoding" if unread_while_encoding else ""
    print(f"  --low-memory ({', '.join(text_encoders)} freed after encoding{unread}, decoded in tiles): "
          + ", ".join(f"{phase} {value:.2f}" for phase, value in freed.items())
          + f": peak {max(freed.values()):.2f} GB")
