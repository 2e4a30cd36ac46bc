"""Switching models: loading one in place of another under a memory budget that holds one, against re-using a
loaded one, and the memory a model takes and gives back when it unloads.

    python bench/model_switch.py [--dtype float32] [--size 256x256] [--rounds 3] [--cache DIR]
    python bench/model_switch.py --smoke        # tiny random-weight models, seconds

Two models A and B, both bench/models.py's real-size random-weight SD 1.5 (built and converted once into
--cache, in a child process so that its memory is not this one's): two names in a scratch model directory over
the same converted weights (each a folder of links to its files and its own manifest). --smoke uses the tiny
SD 1.x of the tests (tests/tiny_diffusers.py) instead. One process, one `ModelRegistry` (as `serve` has), its
budget (--max-memory) 1.5 models, so each switch evicts the other model. Rows:

  first load          the process's first `registry.load`: one-time setup, and the files read from disk if they
                      are not in the page cache
  switch: load        `registry.load(name)`: the other model evicted and its memory freed, this one loaded and
                      every weight read (materialize), as POST /v1/models/{id}/load does
  re-use: acquire     `registry.acquire(job)` + `release(job)` of the loaded model: what every job on it pays
  first step, switch  a job on the other model: acquire (evict, load; weights are read as the job first uses
                      them), text encoding and one denoising step (CFG batch 2) at --size
  first step, loaded  the same job on the loaded model
  memory              MLX active memory and the process's RSS: before any load, after a load + materialize,
                      after the idle unload (its keep_alive ran out, `registry.expire()` as the idle worker calls
                      it), and after the idle unload at the end of all the switches

Times are medians over --rounds rounds, each A -> B then B -> A, each way two switches by `registry.load` and one
by a job; ratios are to a re-use. The weights come from the page cache
after the first read (both names share the files, and the machine has memory to spare): a cold read from disk
adds the disk's time. The script re-execs itself with OpenBLAS preloaded (mlx_sd_server.blas), as the CLI does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import load_average, print_table, run_child  # noqa: E402
from models import DEFAULT_CACHE, TINY  # noqa: E402

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

NAMES = ("model-a", "model-b")
REUSES = 20  # acquires timed per round (each takes well under a millisecond)
PROMPT = "a lighthouse on a cliff at dusk"


def named_copy(src: Path, dst: Path, name: str) -> Path:
    """A model folder `dst` served as `name`: links to `src`'s files, its own manifest."""
    from mlx_sd_server.engine.model_io import MANIFEST, read_manifest, write_manifest

    for path in src.rglob("*"):
        if path.is_file() and path.name != MANIFEST:
            link = dst / path.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    manifest = read_manifest(src)
    manifest.pop("format")  # (write_manifest puts it first)
    write_manifest(dst, {**manifest, "name": name})
    return dst


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux: /proc; macOS: psutil when installed)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(models: Path, dtype: str, size: str, rounds: int) -> dict[str, Any]:
    """The switching, re-use and memory measurements of the two models in `models` (NAMES)."""
    import mlx.core as mx

    from mlx_sd_server.engine.model_io import load_model
    from mlx_sd_server.engine.pipeline import DiffusionPipeline
    from mlx_sd_server.job import build_job
    from mlx_sd_server.registry import ModelRegistry

    size_bytes = DiffusionPipeline(load_model(models / NAMES[0], dtype=dtype)).memory_bytes()  # (lazy: no read)
    registry = ModelRegistry([NAMES[0]], models, dtype=dtype, max_memory=size_bytes * 3 // 2, low_memory=False)

    def memory() -> dict[str, int | None]:
        return {"active": mx.get_active_memory(), "rss": rss_bytes()}

    def idle_unload(name: str) -> None:
        """Its keep-alive set short and run out, then the idle worker's call."""
        registry.load(name, keep_alive=0.05)
        time.sleep(0.1)
        registry.expire()
        assert registry.loaded() == [], registry.loaded()

    fields = {"prompt": PROMPT, "size": size, "steps": 4, "seed": 1, "sample_method": "euler", "cfg_scale": 7.0}
    jobs = {name: build_job({**fields, "model": name}) for name in NAMES}

    def first_step(name: str) -> None:
        """A job from its model's acquire to its first denoising step (then dropped)."""
        pipeline = registry.acquire(jobs[name])
        try:
            steps = pipeline.generate(jobs[name])
            next(steps)
            steps.close()
        finally:
            registry.release(jobs[name])

    def reuse(name: str) -> None:
        registry.acquire(jobs[name])
        registry.release(jobs[name])

    results: dict[str, Any] = {"memory_bytes": size_bytes, "budget_bytes": registry.residency.budget}
    results["before"] = memory()
    results["first_load"] = timed(lambda: registry.load(NAMES[0]))  # (its files maybe not in the page cache yet)
    results["loaded"] = memory()
    idle_unload(NAMES[0])
    results["after_unload"] = memory()

    times: dict[str, list[float]] = {"switch": [], "reuse": [], "first_switch": [], "first_loaded": []}
    registry.load(NAMES[1])
    for _ in range(rounds):
        for name, other in (NAMES, NAMES[::-1]):
            assert registry.loaded() == [other]
            times["switch"].append(timed(lambda name=name: registry.load(name)))
            assert registry.loaded() == [name]  # (the other was evicted)
            reuse(name)  # (warm-up)
            times["reuse"] += [timed(lambda name=name: reuse(name)) for _ in range(REUSES)]
            times["first_loaded"].append(timed(lambda name=name: first_step(name)))
            times["first_switch"].append(timed(lambda other=other: first_step(other)))
            assert registry.loaded() == [other]
            times["switch"].append(timed(lambda name=name: registry.load(name)))  # (back: the next pass leaves it)
    idle_unload(registry.loaded()[0])
    results["after_switches"] = memory()
    results["switches"] = len(times["switch"]) + len(times["first_switch"])
    results.update({key: statistics.median(values) for key, values in times.items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--smoke", action="store_true", help="tiny random-weight models, 64x64, 1 round")
    args = parser.parse_args()
    ensure_fast_blas()
    import mlx.core as mx

    if args.smoke:
        args.size, args.rounds, args.dtype = "64x64", 1, "float32"
    build = [str(ROOT / "bench" / "models.py"), "--model", TINY if args.smoke else "sd15", "--dtype", args.dtype,
             "--cache", str(args.cache)]
    folder = Path(run_child(build)["folder"])
    with tempfile.TemporaryDirectory(prefix="bench-model-switch-") as scratch:
        models = Path(scratch)
        for name in NAMES:
            named_copy(folder, models / name, name)
        results = measure(models, args.dtype, args.size, args.rounds)

    label = "tiny SD 1.x" if args.smoke else "SD 1.5 (random weights)"
    mib = 2**20
    print(
        f"{label} {args.dtype}, {results['memory_bytes'] / mib:.0f} MB of weights, budget "
        f"{results['budget_bytes'] / mib:.0f} MB (one model); jobs {args.size}; median of {args.rounds} round(s), "
        f"{results['switches']} switches; MLX {mx.__version__} on {mx.default_device()}; {load_average()}"
    )
    reuse = results["reuse"]
    print_table(
        "milliseconds (ratio to a re-use)",
        ["ms", "ratio"],
        [
            (row, [results[key] * 1e3, results[key] / reuse], ".3f")
            for row, key in (
                ("first load (files maybe uncached)", "first_load"),
                ("switch: load (evict, load, read)", "switch"),
                ("re-use: acquire + release", "reuse"),
                ("first step, switching model", "first_switch"),
                ("first step, model loaded", "first_loaded"),
            )
        ],
    )

    def megabytes(value: int | None) -> float | None:
        return None if value is None else value / mib

    print_table(
        "memory (MB)",
        ["MLX active", "RSS"],
        [
            (row, [megabytes(results[key]["active"]), megabytes(results[key]["rss"])], ".1f")
            for row, key in (
                ("before any load", "before"),
                ("loaded (weights read)", "loaded"),
                ("after the idle unload", "after_unload"),
                (f"after {results['switches']} switches + unload", "after_switches"),
            )
        ],
    )
    switching = results["first_switch"] - results["first_loaded"]
    throughput = results["memory_bytes"] / results["switch"] / 1e9
    slower = results["first_switch"] / results["first_loaded"]
    print(
        f"a switch costs {results['switch']:.3f} s as a load ({throughput:.2f} GB/s of weights), {switching:.3f} s "
        f"in a job's first step ({slower:.2f}x a loaded model's); re-using a loaded model costs {reuse * 1e3:.3f} ms "
        f"({results['switch'] / reuse:.0f}x less than a switch)"
    )
    loaded = results["loaded"]["active"] - results["before"]["active"]
    freed = results["loaded"]["active"] - results["after_unload"]["active"]
    print(
        f"MLX active memory: +{loaded / mib:.1f} MB loaded ({loaded / results['memory_bytes']:.3f} of the weights' "
        f"bytes), {freed / mib:.1f} MB given back by the idle unload ({freed / max(loaded, 1):.3f})"
    )


if __name__ == "__main__":
    main()
