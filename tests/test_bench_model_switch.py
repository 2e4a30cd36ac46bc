"""bench/model_switch.py at its smoke size (tiny models): it runs, each switch evicts the other model (the
script asserts it), and the idle unload gives back the MLX memory the load took."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_switch_bench_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "model_switch.py"), "--smoke", "--cache", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for row in ("switch: load", "re-use: acquire + release", "first step, switching model", "after the idle unload"):
        assert row in out, out
    loaded = r"\+([\d.]+) MB loaded \(([\d.]+) of the weights' bytes\)"
    memory = re.search(loaded + r", [\d.]+ MB given back by the idle unload \(([\d.]+)\)", out)
    assert memory is not None, out
    assert float(memory[1]) > 0 and float(memory[2]) > 0.9 and float(memory[3]) > 0.99, out
