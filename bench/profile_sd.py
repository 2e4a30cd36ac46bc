"""Where an SD UNet eval and VAE decode spend their time, by kind of op: our MLX engine against diffusers.

    python bench/profile_sd.py --model sd15 --size 512x512 [--parts unet,vae] [--runs 2]
    python bench/profile_sd.py --smoke      # the tests' tiny SD 1.x at 64x64: that it runs

Same converted model as bench/engine.py (bench/models.py builds it once). Each engine runs in its own child
process. MLX: every layer of a kind (3x3 and 1x1 convolutions, linears, GroupNorm, attention, the
activations; a resnet's GroupNorm, SiLU and 3x3 convolution, which from 32x32 up are one Winograd
pass, count as "conv 3x3") is wrapped so that its inputs are evaluated before it starts and its output before it ends;
the time inside, less that of wrapped layers nested in it, is the kind's. What is left of the whole call
(the rest of the graph: adds, reshapes, concatenations, copies) is "other". Evaluating layer by layer is
how MLX's CPU backend runs anyway (it fuses nothing uncompiled), so the sum is within a few percent of an
unwrapped call, which is timed too. torch: torch.profiler's self CPU time per aten op, summed by kind.
Times are of the last of --runs calls after one warm-up, in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, run_child  # noqa: E402
from engine import mlx_engine, size, torch_engine, unet_inputs  # noqa: E402
from models import BENCH_MODELS, DEFAULT_CACHE, TINY  # noqa: E402

KINDS = ("conv 3x3", "conv 1x1", "linear", "attention", "group norm", "activation", "other")
# torch's aten ops by kind (self time); anything not named here is "other"
TORCH_KINDS = {
    "conv 3x3": ("convolution", "conv2d", "mkldnn_conv"),
    "linear": ("addmm", "aten::mm", "aten::linear", "aten::matmul"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::bmm", "aten::baddbmm", "softmax"),
    "group norm": ("group_norm",),
    "activation": ("silu", "gelu"),
}


class LayerTimer:
    """Exclusive wall time per kind of wrapped MLX layer (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []

    def wrap(self, kind_of: Callable[..., str], function: Callable) -> Callable:
        import mlx.core as mx

        def timed(*args, **kwargs):
            mx.eval([a for a in args if isinstance(a, mx.array)])
            self._nested.append(0.0)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            mx.eval(result)
            elapsed = time.perf_counter() - start
            self.seconds[kind_of(*args)] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed
            return result

        return timed


def instrument_mlx(timer: LayerTimer) -> None:
    from mlx_sd_server.engine.ops import cpu_kernels, layers
    from mlx_sd_server.engine.ops.group_norm import GroupNorm

    layers.Conv2d.__call__ = timer.wrap(
        lambda conv, _x: "conv 1x1" if conv.weight.shape[1:3] == (1, 1) else "conv 3x3", layers.Conv2d.__call__
    )
    from mlx_sd_server.engine.vae import BandedConv2d

    BandedConv2d.__call__ = timer.wrap(lambda *_: "conv 3x3", BandedConv2d.__call__)
    layers.Linear.__call__ = timer.wrap(lambda *_: "linear", layers.Linear.__call__)
    # a resnet's GroupNorm + SiLU + convolution: on the CPU from 32x32 up, one Winograd pass (the kind it is timed as)
    GroupNorm.silu_conv = timer.wrap(lambda *_: "conv 3x3", GroupNorm.silu_conv)
    GroupNorm.__call__ = timer.wrap(lambda *_: "group norm", GroupNorm.__call__)
    GroupNorm.with_silu = timer.wrap(lambda *_: "group norm", GroupNorm.with_silu)
    cpu_kernels.attention = timer.wrap(lambda *_: "attention", cpu_kernels.attention)
    for name in ("silu", "gelu", "geglu", "gelu_tanh", "quick_gelu"):
        setattr(cpu_kernels, name, timer.wrap(lambda *_: "activation", getattr(cpu_kernels, name)))


def profile_mlx(folder: Path, parts: list[str], width: int, height: int, runs: int) -> dict:
    _, unet_call, decode_call, _, _ = mlx_engine(folder, "float32")
    calls = engine_calls(folder, unet_call, decode_call, width, height)
    plain = {part: last_of_runs(calls[part], runs) for part in parts}
    timer = LayerTimer()
    instrument_mlx(timer)
    results = {}
    for part in parts:
        timer.seconds.clear()
        start = time.perf_counter()
        calls[part]()
        total = time.perf_counter() - start
        kinds = dict(timer.seconds)
        kinds["other"] = total - sum(kinds.values())
        results[part] = {"plain": plain[part], "wrapped": total, "kinds": kinds}
    return results


def last_of_runs(call: Callable[[], object], runs: int) -> float:
    """The time of the last of `runs` calls (the first warms up)."""
    for _ in range(runs):
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
    return seconds


def engine_calls(folder: Path, unet_call, decode_call, width: int, height: int) -> dict[str, Callable]:
    """One engine's UNet call and VAE decode on the bench's fixed inputs, by part name."""
    from mlx_sd_server.engine.model_io import read_manifest

    inputs = unet_inputs(read_manifest(folder)["components"]["unet"]["config"], width, height)
    return {"unet": unet_call(inputs), "vae": decode_call(inputs["sample"][:1])}


def profile_torch(folder: Path, parts: list[str], width: int, height: int, runs: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    _, unet_call, decode_call, _, _ = torch_engine(folder, "float32")
    calls = engine_calls(folder, unet_call, decode_call, width, height)
    results = {}
    for part in parts:
        call = calls[part]
        plain = last_of_runs(call, runs)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            call()
            total = time.perf_counter() - start
        kinds: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            kind = next((k for k, names in TORCH_KINDS.items() if any(n in event.key for n in names)), "other")
            kinds[kind] += event.self_cpu_time_total / 1e6
        # the profiler's own overhead and idle gaps: what the ops' self times leave of the wall time
        kinds["other"] += total - sum(kinds.values())
        results[part] = {"plain": plain, "wrapped": total, "kinds": dict(kinds)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BENCH_MODELS, default="sd15")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--parts", default="unet,vae")
    parser.add_argument("--engines", default="mlx,torch")
    parser.add_argument("--runs", type=int, default=2, help="calls before the profiled one (the first warms up)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--smoke", action="store_true", help="the tiny model at 64x64, one run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.runs = TINY, "64x64", 1
    parts = [p for p in args.parts.split(",") if p]
    width, height = size(args.size)
    if args.child:
        if args.child == "mlx":
            ensure_fast_blas()
        profile = profile_mlx if args.child == "mlx" else profile_torch
        print(json.dumps(profile(args.folder, parts, width, height, args.runs)))
        return

    folder = Path(run_child([str(ROOT / "bench" / "models.py"), "--model", args.model, "--dtype", "float32",
                             "--cache", str(args.cache)])["folder"])
    engines = [e for e in args.engines.split(",") if e]
    results = {}
    for engine in engines:
        results[engine] = run_child([__file__, "--child", engine, "--folder", str(folder), "--parts", args.parts,
                                     "--size", args.size, "--runs", str(args.runs)], with_fast_blas=engine == "mlx")
        print(f"{engine} done; {load_average()}", flush=True)
    for part in parts:
        print(f"\n{args.model} {part}, {args.size}, float32 (UNet: CFG batch 2), s")
        header = "".join(f"{e:>10}" for e in engines) + ("  mlx/torch" if len(engines) == 2 else "")
        print(f"{'':24}{header}")
        for label in (*KINDS, "sum (profiled call)", "unprofiled call"):
            values = []
            for engine in engines:
                entry = results[engine][part]
                values.append(entry["kinds"].get(label, 0.0) if label in KINDS
                              else entry["wrapped"] if label.startswith("sum") else entry["plain"])
            ratio = f"{values[0] / values[1]:11.2f}" if len(values) == 2 and values[1] > 0.005 else ""
            print(f"{label:24}" + "".join(f"{v:10.3f}" for v in values) + ratio)


if __name__ == "__main__":
    main()
