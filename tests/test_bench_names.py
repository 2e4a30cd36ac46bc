"""A bench script's folder comes first on sys.path, so a bench module named like an installed package would
be imported in its place by everything the script imports (bench/kernels.py once hid the `kernels` package
that transformers imports)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_module_shadows_an_installed_one(monkeypatch):
    outside = [p for p in sys.path if Path(p or ".").resolve() not in (BENCH, Path.cwd().resolve())]
    monkeypatch.setattr(sys, "path", outside)
    names = sorted(path.stem for path in BENCH.glob("*.py"))
    assert "engine" in names  # the folder was read
    shadowed = {}
    for name in names:
        if name in sys.modules:  # imported by the tests themselves from bench/ (conftest puts it on the path)
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if Path(origin).resolve().parent == BENCH:
                continue
        spec = importlib.util.find_spec(name) if name not in sys.stdlib_module_names else None
        if name in sys.stdlib_module_names or spec is not None:
            shadowed[name] = "the standard library" if spec is None else spec.origin
    assert not shadowed, f"bench modules named like installed ones: {shadowed}"
