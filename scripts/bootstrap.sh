#!/usr/bin/env bash
# Creates .venv beside the checkout (once) and installs the project into it.
# Usage: scripts/bootstrap.sh [EXTRAS]   e.g. "test" for the test/benchmark references.
# Idempotent: a second run only installs what changed. Run by ./mlx-sd-server and ./run-tests.
# The venv is built with the newest of python3.13 ... python3.10 on PATH, else python3 if it is 3.10 or
# newer ($MLX_SD_PYTHON names one instead); a .venv made by an older or missing Python is rebuilt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="$root/.venv"
stamp="$venv/.installed-${extras:-base}"
min_minor=10  # pyproject.toml: requires-python = ">=3.10"

# The MAJOR.MINOR of the Python at $1, or nothing if it does not run.
python_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

# Whether a MAJOR.MINOR version is new enough.
suitable() {
    local major="${1%%.*}" minor="${1#*.}"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] && { [ "$major" -gt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -ge "$min_minor" ]; }; }
}

# Prints the Python to build the venv with; fails with what to install when there is none.
find_python() {
    local candidates=(python3.13 python3.12 python3.11 python3.10 python3) found=() name path version
    if [ -n "${MLX_SD_PYTHON:-}" ]; then
        candidates=("$MLX_SD_PYTHON")
    fi
    for name in "${candidates[@]}"; do
        path="$(command -v "$name" 2>/dev/null)" || continue
        version="$(python_version "$path")"
        if suitable "$version"; then
            echo "$path"
            return 0
        fi
        found+=("$path (${version:-does not run})")
    done
    {
        echo "bootstrap: mlx-sd-server needs Python 3.$min_minor or newer, and there is none on PATH${found[0]:+; found: ${found[*]}}."
        if [ "$(uname -s)" = Darwin ]; then
            echo "bootstrap: install one with Homebrew (https://brew.sh): brew install python@3.12 — then run this again."
        else
            echo "bootstrap: install one (e.g. apt install python3.12-venv, dnf install python3.12) — then run this again."
        fi
        echo "bootstrap: (or point MLX_SD_PYTHON at a Python 3.$min_minor+ interpreter)"
    } >&2
    return 1
}

if [ "${1:-}" = --print-python ]; then  # which Python a new venv would be built with
    find_python
    exit
fi

# A venv made by an unsuitable Python (macOS's stock 3.9), or whose Python is gone (an upgraded Homebrew
# Python), cannot be installed into: start again.
if [ -e "$venv" ]; then
    venv_version="$(python_version "$venv/bin/python")"
    if ! suitable "$venv_version"; then
        echo "bootstrap: $venv was made by ${venv_version:+Python $venv_version}${venv_version:-a Python that no longer runs} (needs 3.$min_minor+); rebuilding it" >&2
        python="$(find_python)" || exit 1
        rm -rf "$venv"
    fi
fi
if [ ! -x "$venv/bin/python" ]; then
    python="${python:-$(find_python)}" || exit 1
    echo "bootstrap: creating $venv with $python ($(python_version "$python"))" >&2
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "bootstrap: could not create $venv with $python (Debian/Ubuntu: apt install python3-venv)" >&2
        exit 1
    fi
fi

# Linux: MLX's CPU wheel bundles a slow reference BLAS; OpenBLAS is interposed at start-up when present.
if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas*.so* >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing OpenBLAS (libopenblas0-pthread)" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "bootstrap: note: install libopenblas0-pthread (or another OpenBLAS) for ~50x faster MLX on the CPU" >&2
    fi
fi

# The test extra: the playground's browser test drives Debian's chromium (headless; skipped without it).
if [[ ",$extras," == *,test,* ]] && [ "$(uname -s)" = Linux ] && [ ! -x /usr/bin/chromium ] \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing chromium (for the playground's browser test)" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium >/dev/null 2>&1 || echo "bootstrap: note: could not install chromium; the browser test will be skipped" >&2
fi

# Every install is held to constraints.txt, the versions the test suite passed with (that file says how to
# update it); a change to it, as to pyproject.toml, installs again.
constraints=()
if [ -f "$root/constraints.txt" ]; then
    constraints=(-c "$root/constraints.txt")
fi
if [ ! -e "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip ${constraints[@]+"${constraints[@]}"}
    if [ -n "$extras" ] && [ "$(uname -s)" = Linux ]; then
        # The references need torch; this exact version is a CPU wheel. Unpinned, pip fetches a CUDA build.
        "$venv/bin/python" -m pip install -q "torch==2.13.0" ${constraints[@]+"${constraints[@]}"}
    fi
    "$venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}" ${constraints[@]+"${constraints[@]}"}
    if [[ ",$extras," == *,test,* ]]; then
        # spandrel: the upscalers' reference (tests/test_upscalers.py), without its dependencies: they include
        # torchvision, which its ESRGAN and Compact architectures never import (torch and einops are here).
        "$venv/bin/python" -m pip install -q --no-deps spandrel ${constraints[@]+"${constraints[@]}"}
    fi
    touch "$stamp"
fi
