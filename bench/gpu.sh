#!/usr/bin/env bash
# One command on a fresh Linux machine with an NVIDIA GPU: a venv of its own with MLX's CUDA build, torch's
# CUDA wheel, diffusers and this checkout, then bench/gpu_compare.py's one table (MLX against diffusers on
# real-size random-weight SD 1.5, SDXL, FLUX.1-schnell in bfloat16 and 4-bit, Z-Image-Turbo), all within
# 8 minutes, installs included: what does not fit is skipped and named. Without a GPU it exits with status 2
# and says why; every step has a time limit, so it never hangs.
#
#   bench/gpu.sh [gpu_compare.py options, e.g. --cases sd15,sdxl --rounds 5]
#   bench/gpu.sh --dry-run      the same driver on the CPU, in the checkout's .venv: tiny models, one round
#
# Environment: MLX_SD_GPU_VENV (default $TMPDIR/mlx-sd-gpu-venv, kept for the next run), MLX_SD_GPU_BUDGET
# (seconds in all, default 480).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deadline=$(($(date +%s) + ${MLX_SD_GPU_BUDGET:-480}))

say() { echo "gpu.sh: $*" >&2; }
left() { echo $((deadline - $(date +%s))); }
# limited SECONDS COMMAND...: the command, killed after SECONDS or at the deadline, whichever comes first
limited() {
    local limit=$1 remaining
    shift
    remaining=$(left)
    if [ "$remaining" -lt "$limit" ]; then limit=$remaining; fi
    if [ "$limit" -le 0 ]; then
        say "out of time (the ${MLX_SD_GPU_BUDGET:-480} s budget) before: $*"
        return 124
    fi
    timeout --kill-after=10 "$limit" "$@"
}

if [ "${1:-}" = --dry-run ]; then
    shift
    python="$root/.venv/bin/python"
    if [ ! -x "$python" ]; then
        say "no $root/.venv: run scripts/bootstrap.sh test (or ./run-tests) first"
        exit 1
    fi
    limited 600 "$python" "$root/bench/gpu_compare.py" --dry-run --deadline "$deadline" "$@"
    exit
fi

# --- a GPU, and which CUDA its driver runs ------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "no NVIDIA GPU: nvidia-smi is not installed (bench/gpu.sh --dry-run runs the same steps on the CPU)"
    exit 2
fi
if ! gpus="$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)" \
        || [ -z "$gpus" ]; then
    say "no usable NVIDIA GPU: nvidia-smi says: ${gpus:-nothing}"
    exit 2
fi
cuda="$(timeout 30 nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n 1)"
if [ -z "$cuda" ]; then
    say "nvidia-smi shows no CUDA version; cannot choose MLX's and torch's CUDA builds"
    exit 2
fi
read -r cuda_major cuda_minor <<<"$cuda"
driver=$((cuda_major * 100 + cuda_minor))
say "GPU: $gpus; the driver runs CUDA $cuda_major.$cuda_minor"
if [ "$driver" -lt 1206 ]; then
    say "the driver's CUDA $cuda_major.$cuda_minor is older than 12.6, which MLX's and torch's CUDA wheels need"
    exit 2
fi
mlx_extra=$([ "$cuda_major" -ge 13 ] && echo cuda13 || echo cuda12)
torch_indexes=()  # torch's CUDA wheel indexes the driver runs, newest first
for index in cu130:1300 cu129:1209 cu128:1208 cu126:1206; do
    if [ "$driver" -ge "${index#*:}" ]; then torch_indexes+=("${index%%:*}"); fi
done

# --- the venv ------------------------------------------------------------------------------------------
venv="${MLX_SD_GPU_VENV:-${TMPDIR:-/tmp}/mlx-sd-gpu-venv}"
stamp="$venv/.installed-$mlx_extra"
if [ ! -e "$stamp" ]; then
    python="$("$root/scripts/bootstrap.sh" --print-python)"
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv with $python"
        limited 120 "$python" -m venv "$venv" || { say "could not create $venv (Debian/Ubuntu: apt install python3-venv)"; exit 1; }
    fi
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    # The versions the test suite passed with, but torch's: that comes from its CUDA index.
    constraints="$venv/constraints.txt"
    grep -v '^torch==' "$root/constraints.txt" >"$constraints"
    torch_pin="$(sed -n 's/^torch==//p' "$root/constraints.txt")"
    attempts=()  # the pinned version from each index the driver runs, newest first; then any version
    for index in "${torch_indexes[@]}"; do attempts+=("torch==$torch_pin $index"); done
    for index in "${torch_indexes[@]}"; do attempts+=("torch $index"); done
    installed=""
    for attempt in "${attempts[@]}"; do
        read -r spec index <<<"$attempt"
        say "installing $spec from https://download.pytorch.org/whl/$index"
        if limited 420 "${pip[@]}" "$spec" --index-url "https://download.pytorch.org/whl/$index"; then
            installed=$index
            break
        fi
    done
    if [ -z "$installed" ]; then
        say "could not install torch's CUDA wheel from any of ${torch_indexes[*]}"
        exit 1
    fi
    say "installing mlx[$mlx_extra], diffusers, transformers and this checkout"
    limited 420 "${pip[@]}" -c "$constraints" -e "$root[bench]" "mlx[$mlx_extra]" \
        || { say "pip could not install mlx[$mlx_extra] and the project"; exit 1; }
    # The project's Linux requirement mlx[cpu] shares its library's path with the CUDA build: the CUDA one wins.
    mlx_version="$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("mlx"))')"
    limited 120 "$venv/bin/python" -m pip uninstall -y -q mlx-cpu || true
    limited 300 "${pip[@]}" --force-reinstall --no-deps "mlx-${mlx_extra/cuda/cuda-}==$mlx_version" \
        || { say "could not reinstall mlx-${mlx_extra/cuda/cuda-}"; exit 1; }
fi
if ! limited 180 "$venv/bin/python" -c '
import mlx.core as mx, torch
assert mx.default_device() == mx.gpu, f"MLX computes on {mx.default_device()}, not the GPU"
assert torch.cuda.is_available(), "torch sees no CUDA device"
x = mx.ones((512, 512))
mx.eval(x @ x)
print(f"MLX {mx.__version__} on {mx.default_device()}, torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
'; then
    say "the venv $venv cannot compute on the GPU (see above); delete it to install again"
    exit 1
fi
touch "$stamp"

# --- the benchmark: it keeps to the deadline itself (and prints what it had to skip) ------------------
remaining=$(left)
timeout --kill-after=10 $((remaining > 0 ? remaining + 60 : 60)) \
    "$venv/bin/python" "$root/bench/gpu_compare.py" --deadline "$deadline" "$@"
