#!/usr/bin/env bash
# Creates .venv beside the checkout (once) and installs the project into it.
# Usage: scripts/bootstrap.sh [EXTRAS]   e.g. "test" for the test/benchmark references.
# Idempotent: a second run only installs what changed. Sourced by ./mlx-sd-server and ./run-tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="$root/.venv"
stamp="$venv/.installed-${extras:-base}"

# Linux: MLX's CPU wheel bundles a slow reference BLAS; OpenBLAS is interposed at start-up when present.
if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas*.so* >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing OpenBLAS (libopenblas0-pthread)" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "bootstrap: note: install libopenblas0-pthread (or another OpenBLAS) for ~50x faster MLX on the CPU" >&2
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "bootstrap: creating $venv" >&2
    python3 -m venv "$venv"
fi
if [ ! -e "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    if [ -n "$extras" ] && [ "$(uname -s)" = Linux ]; then
        # The references need torch; this exact version is a CPU wheel. Unpinned, pip fetches a CUDA build.
        "$venv/bin/python" -m pip install -q "torch==2.13.0"
    fi
    "$venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}"
    touch "$stamp"
fi
