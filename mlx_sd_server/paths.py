"""Where this server keeps its files on a user's machine (shared by the server and the converters)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


CONTROLNET_FOLDER = "controlnets"  # converted ControlNets, in the model directory


@contextmanager
def folder_written_atomically(dst: Path) -> Iterator[Path]:
    """A work folder beside `dst` (`.NAME.partial-*`) to write into; renamed to `dst` when the block ends, or
    deleted with everything in it if the block raises, so that a server listing the parent never sees half a
    folder and a failed write leaves nothing. An empty folder already at `dst` is replaced."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.partial-"))
    try:
        yield work
        if dst.exists():
            dst.rmdir()
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


# An absolute (or home-relative) path in a message: within quotes, all of it (`'/Users/me/Library/Application
# Support/...'`); else from a `/` at the start or after a space, bracket or `=`, up to the next space or
# quote (punctuation that ends a sentence or a clause is left outside it). This server's own url paths
# (`/v1/...`) are not file paths.
_PATH_IN_TEXT = re.compile(
    r"""(?P<q>['"])(?P<quoted>~?/(?!v1/)[^'"\n]*)(?P=q)"""
    r"""|(?:^|(?<=[\s(\[=]))(?P<bare>~?/(?!v1/)[^\s'"]*?)(?=[:,;.)\]]*(?:\s|$|['"]))"""
)


def _last_part(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2] or "…"


def without_paths(text: str) -> str:
    """`text` (a message for a client, e.g. an OSError's) with every absolute path cut to its last part
    (`/Users/me/models/x/unet.safetensors` -> `unet.safetensors`): where the server keeps its files is
    not a client's business. Logs keep the whole path."""

    def cut(match: re.Match) -> str:
        if match.group("quoted") is not None:
            return match.group("q") + _last_part(match.group("quoted")) + match.group("q")
        return _last_part(match.group("bare"))

    return _PATH_IN_TEXT.sub(cut, text)
