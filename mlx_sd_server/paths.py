"""Where this server keeps its files on a user's machine (shared by the server and the converters)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def model_dir(override: str | os.PathLike | None = None) -> Path:
    """--model-dir, else $MLX_SD_MODEL_DIR, else the platform's per-user data directory."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("MLX_SD_MODEL_DIR"):
        return Path(os.environ["MLX_SD_MODEL_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlx-sd-server" / "models"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "mlx-sd-server" / "models"
