"""FLUX.1 Kontext against FLUX.1 dev: what one reference image costs a denoising step, in time and MLX memory.

    python bench/kontext.py [--blocks 1] [--size 1024x1024] [--reference 1024x1024] [--bits 4]
                            [--text-tokens 512] [--attention-heads 4] [--parts steps,attention]

Kontext runs dev's transformer on the image's tokens followed by the reference image's (FluxFamily.denoiser):
at 1024x1024 with a 1024x1024 reference, 4096 + 4096 image tokens and 512 T5 tokens instead of 4096 + 512.
Two measurements, each in its own child process (bench/common.py's run_child), one after the other:

  steps      bench/flux.py's transformer part twice, at --blocks (default 1: 1 double + 2 single blocks), 4-bit
             group 64, built directly in MLX: the txt2img step, then the same model's Kontext step
             (`flux.py --reference`); time, MLX peak, block by block, and the full-depth estimates as
             bench/flux.py makes them (weights exactly at 19 + 38 blocks, activations as measured, since a
             step's activation peak is one block's).
  attention  the attention alone at both sequence lengths, --attention-heads heads of 128 (float32), two
             ways: ours (what the engine runs on the CPU: cpu_kernels.attention, numpy over row blocks of
             the scores, whose buffers MLX does not see: counted here with tracemalloc) and
             `mx.fast.scaled_dot_product_attention` (MLX's own, the engine's call on Metal and CUDA; on this
             CPU MLX runs it unfused). MLX peak is counted above the resident q, k, v. Whether the scores
             (heads x seq^2 float32) exist in memory is measured, not assumed.

Run time on the 2-core CPU machine: ~3 min at the defaults (bench/README.md). No GPU is needed or used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

import flux as flux_bench  # noqa: E402
from common import load_average, print_table, run_child  # noqa: E402

GB = flux_bench.GB
MB = 1e6
HEAD_DIM = flux_bench.FLUX_DEV_TRANSFORMER["attention_head_dim"]
HEADS = flux_bench.FLUX_DEV_TRANSFORMER["num_attention_heads"]
CASES = ("txt2img", "kontext")


def tokens(args) -> dict[str, int]:
    """The joint attention's sequence length (image + reference + text tokens) of each case."""
    (width, height), (ref_w, ref_h) = args.size, args.reference
    image = (width // 16) * (height // 16)
    return {"txt2img": image + args.text_tokens, "kontext": image + (ref_w // 16) * (ref_h // 16) + args.text_tokens}


def measure_attention(args) -> dict:
    """Per case and way: seconds, the MLX peak above the inputs and the numpy peak (tracemalloc) of one call."""
    import tracemalloc

    import mlx.core as mx

    from mlx_sd_server.engine.ops import cpu_kernels

    ways = {
        "ours": cpu_kernels.attention,
        "mlx": lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5),
    }
    results: dict = {}
    for case, length in tokens(args).items():
        q, k, v = (mx.random.normal((1, args.attention_heads, length, HEAD_DIM), key=mx.random.key(i))
                   for i in range(3))
        mx.eval(q, k, v)
        for way, attend in ways.items():
            mx.reset_peak_memory()
            resident = mx.get_active_memory()
            tracemalloc.start()
            start = time.perf_counter()
            out = attend(q, k, v)
            mx.eval(out)
            seconds = time.perf_counter() - start
            numpy_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            results[f"{case}_{way}"] = {"s": seconds, "mlx_bytes": mx.get_peak_memory() - resident,
                                        "numpy_bytes": numpy_peak}
            del out
    return results


def flux_step(args, reference: bool) -> dict:
    """bench/flux.py's transformer child, with or without the reference image."""
    blocks = f"{args.blocks[0]},{args.blocks[1]}"
    arguments = [str(ROOT / "bench" / "flux.py"), "--child", "transformer", "--blocks", blocks, "--size",
                 "x".join(map(str, args.size)), "--bits", str(args.bits), "--group-size", str(args.group_size),
                 "--text-tokens", str(args.text_tokens), "--runs", str(args.runs), "--dtype", args.dtype,
                 "--per-block"]
    if reference:
        arguments += ["--reference", "x".join(map(str, args.reference))]
    return run_child(arguments)


def full_step_seconds(step: dict) -> float:
    double, single = flux_bench.FULL_DEPTH
    return step["other_s"] + double * step["double_s"] + single * step["single_s"]


def report(args, results: dict) -> None:
    length = tokens(args)
    steps = results.get("steps")
    if steps:
        activation = {c: steps[c]["peak_bytes"] - steps[c]["resident_bytes"] for c in CASES}
        metal = {c: activation[c] - steps[c]["transient_bytes"] for c in CASES}
        full_peak = {c: steps[c]["full_weights_bytes"] + activation[c] for c in CASES}

        def row(label: str, values: dict, number_format: str = ".2f"):
            """The two cases in `number_format`, and kontext / txt2img to two decimals (cells given as text)."""
            ratio = "-" if not values["txt2img"] else f"{values['kontext'] / values['txt2img']:.2f}"
            return label, [format(values[c], number_format) for c in CASES] + [ratio], ""

        def key(name: str, scale: float = GB):
            return {c: steps[c][name] / scale for c in CASES}

        print()
        print_table(f"one transformer step, {args.blocks[0]}+{args.blocks[1]} blocks, {args.bits}-bit (group "
                    f"{args.group_size}), {args.dtype}, median of {args.runs}", ["txt2img", "kontext", "ratio"], [
            row("tokens: image + reference + text", {c: length[c] for c in CASES}, ".0f"),
            row("step (s)", key("step_s", 1)),
            row("  double block (s)", key("double_s", 1)),
            row("  single block (s)", key("single_s", 1)),
            row("MLX peak (GB)", key("peak_bytes")),
            row("highest peak within a block (GB)", key("block_peak_bytes")),
            row("activations: peak - weights (GB)", {c: activation[c] / GB for c in CASES}),
            row("  of which dequantized weights (GB)", key("transient_bytes")),
            row("  the rest (as on Metal) (GB)", {c: metal[c] / GB for c in CASES}),
            row("full depth: step (s, est.)", {c: full_step_seconds(steps[c]) for c in CASES}, ".0f"),
            row("full depth: step peak (GB, est.)", {c: full_peak[c] / GB for c in CASES}),
        ])
        weights, mac_weights = steps["txt2img"]["full_weights_bytes"], steps["txt2img"]["full_weights_mac_bytes"]
        print(f"\nfull depth (19 + 38 blocks): {weights / GB:.2f} GB weights + activations: txt2img "
              f"{full_peak['txt2img'] / GB:.2f} GB, Kontext {full_peak['kontext'] / GB:.2f} GB "
              f"(+{(activation['kontext'] - activation['txt2img']) / GB:.2f} GB); a Mac (float16 scales, no "
              f"dequantized copies): {(mac_weights + metal['txt2img']) / GB:.2f} and "
              f"{(mac_weights + metal['kontext']) / GB:.2f} GB")
    attention = results.get("attention")
    if attention:
        heads = args.attention_heads
        print()
        columns = [f"{c} {w}" for c in CASES for w in ("ours", "mlx")]

        def cells(name: str, scale: float):
            return [attention[f"{c}_{w}"][name] / scale for c in CASES for w in ("ours", "mlx")]

        scores = [heads * length[c] ** 2 * 4 / MB for c in CASES for _ in range(2)]
        print_table(f"attention alone, {heads} heads of {HEAD_DIM}, float32 (ours: the engine's CPU kernel; mlx: "
                    f"mx.fast.scaled_dot_product_attention)", columns, [
            ("sequence length", [length[c] for c in CASES for _ in range(2)], ".0f"),
            ("seconds", cells("s", 1), ".2f"),
            ("MLX peak above q, k, v (MB)", cells("mlx_bytes", MB), ".0f"),
            ("numpy peak (MB)", cells("numpy_bytes", MB), ".1f"),
            ("the scores, heads x seq^2 x 4 (MB)", scores, ".0f"),
        ])
        growth = {w: attention[f"kontext_{w}"]["mlx_bytes"] / attention[f"txt2img_{w}"]["mlx_bytes"]
                  for w in ("ours", "mlx")}
        print(f"\nkontext / txt2img: sequence x{length['kontext'] / length['txt2img']:.2f}, seq^2 "
              f"x{(length['kontext'] / length['txt2img']) ** 2:.2f}; MLX peak x{growth['ours']:.2f} (ours), "
              f"x{growth['mlx']:.2f} (mlx); at FLUX.1's {HEADS} heads the mlx way's would be "
              + ", ".join(f"{attention[f'{c}_mlx']['mlx_bytes'] * HEADS / heads / GB:.2f} GB ({c})" for c in CASES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=flux_bench.blocks, default=(1, 2),
                        help="transformer depth: N (N double + 2N single blocks) or D,S (default: 1)")
    parser.add_argument("--size", type=flux_bench.size, default=(1024, 1024),
                        help="WxH image (default: 1024x1024)")
    parser.add_argument("--reference", type=flux_bench.size, default=(1024, 1024),
                        help="WxH reference image, as Kontext resizes it (default: 1024x1024)")
    parser.add_argument("--bits", type=int, default=4, help="quantization bits, 0 for none (default: 4)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (default: dev's 512)")
    parser.add_argument("--runs", type=int, default=1, help="steps per case (median; the peak is over all)")
    parser.add_argument("--attention-heads", type=int, default=4,
                        help="heads in the attention-alone measurement (MLX's unfused CPU attention holds "
                             "heads x seq^2 float32 scores: 1.2 GB at 4 heads of 8704 tokens)")
    parser.add_argument("--parts", default="steps,attention", help="comma-separated, from steps,attention")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="compute dtype (default: as load_model, float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--child", choices=["attention"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_fast_blas()

    import mlx.core as mx

    args.dtype = args.dtype or ("float16" if mx.default_device() == mx.gpu else "float32")
    if args.child:
        print(json.dumps(measure_attention(args)))
        return 0

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    print(f"FLUX.1 Kontext against dev: {args.size[0]}x{args.size[1]}, reference {args.reference[0]}x"
          f"{args.reference[1]}, {args.text_tokens} T5 tokens, {args.dtype}; MLX {mx.__version__} on "
          f"{mx.default_device()}; at start: {load_average()}", flush=True)
    results: dict = {}
    if "steps" in parts:
        results["steps"] = {}
        for case in CASES:
            start = time.perf_counter()
            results["steps"][case] = flux_step(args, reference=case == "kontext")
            print(f"{case} step done in {time.perf_counter() - start:.0f} s; {load_average()}", flush=True)
    if "attention" in parts:
        start = time.perf_counter()
        results["attention"] = run_child([str(Path(__file__).resolve()), *sys.argv[1:], "--dtype", args.dtype,
                                          "--child", "attention"])
        print(f"attention done in {time.perf_counter() - start:.0f} s; {load_average()}", flush=True)
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
