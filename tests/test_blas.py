"""blas.ensure_fast_blas: finds OpenBLAS, re-execs once with it preloaded, and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_sd_server import blas

REPO = Path(__file__).resolve().parents[1]
# The child records each start in a file, calls ensure_fast_blas, then reports what it got.
CHILD = """
import os, sys
with open(sys.argv[1], "a") as starts:
    starts.write("start\\n")
from mlx_sd_server import blas
blas.ensure_fast_blas()
print(blas.fast_blas_loaded(), os.environ.get("OPENBLAS_NUM_THREADS"), os.environ.get("GLIBC_TUNABLES"))
"""


def run_child(tmp_path: Path, **env_changes: str) -> tuple[str, int]:
    """(what the child printed, how many times it started) for a child run with these env changes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", blas.DISABLE_ENV, blas.REEXEC_MARKER_ENV, blas.OVERRIDE_ENV)}
    env.update(env_changes, PYTHONPATH=str(REPO))
    starts = tmp_path / "starts"
    result = subprocess.run([sys.executable, "-c", CHILD, str(starts)], env=env, capture_output=True,
                            text=True, check=True, timeout=60)
    return result.stdout.strip(), starts.read_text().count("start")


needs_openblas = pytest.mark.skipif(not sys.platform.startswith("linux") or blas.find_fast_blas() is None,
                                    reason="no OpenBLAS on this machine")


@needs_openblas
def test_reexecs_once_with_openblas_preloaded(tmp_path):
    output, starts = run_child(tmp_path)
    assert starts == 2
    assert output == f"True {len(os.sched_getaffinity(0))} {blas.HUGE_PAGES_TUNABLE}"


@needs_openblas
def test_keeps_a_thread_count_the_user_chose(tmp_path):
    output, _ = run_child(tmp_path, OPENBLAS_NUM_THREADS="1", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert output == f"True 1 glibc.malloc.arena_max=2:{blas.HUGE_PAGES_TUNABLE}"


@needs_openblas
def test_disabled_by_environment(tmp_path):
    output, starts = run_child(tmp_path, **{blas.DISABLE_ENV: "1"})
    assert (output, starts) == ("False None None", 1)


@needs_openblas
def test_no_reexec_when_already_preloaded(tmp_path):
    output, starts = run_child(tmp_path, LD_PRELOAD=blas.find_fast_blas())
    assert (output.split()[0], starts) == ("True", 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-exec is Linux-only")
def test_a_preload_that_brings_no_blas_does_not_loop(tmp_path):
    """A library that loads but is no BLAS leaves fast_blas_loaded() False after the re-exec: no second one."""
    not_a_blas = next(p for p in ["/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6",
                                  "/lib64/libm.so.6", "/usr/lib/libm.so.6"] if os.path.isfile(p))
    output, starts = run_child(tmp_path, **{blas.OVERRIDE_ENV: not_a_blas})
    assert starts == 2
    assert output.split()[0] == "False"


def test_override_names_the_library(monkeypatch, tmp_path):
    library = tmp_path / "libmyblas.so"
    library.write_bytes(b"")
    monkeypatch.setenv(blas.OVERRIDE_ENV, str(library))
    assert blas.find_fast_blas() == str(library)
    monkeypatch.setenv(blas.OVERRIDE_ENV, str(tmp_path / "missing.so"))
    assert blas.find_fast_blas() is None


def test_nothing_happens_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("re-exec off Linux"))
    blas.ensure_fast_blas()
