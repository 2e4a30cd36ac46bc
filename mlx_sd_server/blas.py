"""Run MLX's Linux CPU backend on a real BLAS.

The `mlx[cpu]` wheel links the netlib reference BLAS (about 6 GFLOP/s matmul; a real-size UNet step takes
minutes). The dynamic linker lets a library named in LD_PRELOAD supply the BLAS symbols instead, but only
from process start, so `ensure_fast_blas` re-executes the current command once with OpenBLAS preloaded.
Nothing happens on macOS (MLX uses Accelerate there), when a real BLAS is already loaded, or with
MLX_SD_NO_BLAS_REEXEC=1. MLX_SD_BLAS=/path/to/libblas.so names the library to preload.

The same restart asks glibc's malloc for transparent huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb=1,
glibc >= 2.35; ignored elsewhere). MLX's CPU allocator keeps no cache, so every large intermediate is a
fresh mmap whose 4 KB pages fault in one by one: a 134 MB buffer (one 512x512x128 VAE activation) cost
~70 ms to produce before, ~15 ms with 2 MB pages.
"""

from __future__ import annotations

import glob
import os
import sys

OVERRIDE_ENV = "MLX_SD_BLAS"
DISABLE_ENV = "MLX_SD_NO_BLAS_REEXEC"
# Set in the re-executed process, so that a preload that did not take cannot cause an exec loop.
REEXEC_MARKER_ENV = "MLX_SD_BLAS_REEXECED"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"

# Most specific first: Debian/Ubuntu's libopenblas0-pthread, then any OpenBLAS in the usual places.
# The pthread build is preferred to the OpenMP one, which can clash with torch's own OpenMP runtime.
CANDIDATE_PATTERNS = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r*.so",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblasp-r*.so",
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas*.so*",
    "/usr/lib/*-linux-gnu/libopenblas*.so*",
    "/usr/lib64/libopenblas*.so*",
    "/usr/local/lib/libopenblas*.so*",
    "/usr/lib/libopenblas*.so*",
    "/opt/OpenBLAS/lib/libopenblas*.so*",
]
# A library whose file name contains one of these, once mapped into the process, supplies a real BLAS.
FAST_BLAS_NAMES = ("openblas", "libmkl", "libblis", "libflexiblas")


def find_fast_blas() -> str | None:
    """The path of a real BLAS library to preload: $MLX_SD_BLAS if set, else the first OpenBLAS found."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        return override if os.path.isfile(override) else None
    for pattern in CANDIDATE_PATTERNS:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path) and "openmp" not in path:
                return path
    return None


def fast_blas_loaded() -> bool:
    """Whether a real BLAS is mapped into this process (preloaded, or linked by something imported)."""
    try:
        with open("/proc/self/maps") as maps:
            return any(name in line for line in maps for name in FAST_BLAS_NAMES)
    except OSError:
        return False


def default_thread_count() -> int:
    """OpenBLAS threads: one per core this process may run on (bench/blas.py: 2 threads ~1.9x on 2 cores)."""
    return len(os.sched_getaffinity(0))


def ensure_fast_blas() -> None:
    """Re-exec the current command with a real BLAS preloaded, once, where that helps; else return.

    Call it first thing in an entry point, before threads start or files are opened that the new
    process would not expect to inherit; on success it does not return.
    """
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get(DISABLE_ENV) == "1" or os.environ.get(REEXEC_MARKER_ENV) or fast_blas_loaded():
        return
    library = find_fast_blas()
    if library is None:
        print(
            "mlx-sd-server: no OpenBLAS found, MLX runs on its slow reference BLAS (install "
            f"libopenblas0-pthread, or set {OVERRIDE_ENV}=/path/to/libopenblas.so)",
            file=sys.stderr,
        )
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD")]))
    env.setdefault("OPENBLAS_NUM_THREADS", str(default_thread_count()))
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE]))
    env[REEXEC_MARKER_ENV] = "1"
    # A print, not a log record: this runs before the command has configured logging.
    print(
        f"mlx-sd-server: restarting with {library} as MLX's BLAS ({DISABLE_ENV}=1 to disable)",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
