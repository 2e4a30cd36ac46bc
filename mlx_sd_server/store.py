"""The file store behind `/v1/files`: one folder per file, `ROOT/file_<uuid>/<filename>`.

Ids and names from requests are never joined onto a path: an id must match the `file_<uuid>` pattern,
and a name is only compared with the name actually stored. Writes go to a temporary folder that is
renamed into place, so a file is either fully there or absent, even after a crash.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

_ID_RE = re.compile(r"^file_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEMP_PREFIX = ".tmp-"


class InvalidFileIdError(ValueError):
    """Not of the form file_<uuid>: cannot name anything in the store."""


@dataclass(frozen=True)
class StoredFile:
    """The metadata the reference returns for a file (OpenAI's file object)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str = "assistants_output"
    object: str = "file"

    def to_dict(self) -> dict:
        return asdict(self)


class FileStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(_TEMP_PREFIX + "*"):  # interrupted writes
            shutil.rmtree(leftover, ignore_errors=True)

    def save(self, data: bytes, filename: str) -> StoredFile:
        if not _NAME_RE.match(filename):
            raise ValueError(f"unsafe file name {filename!r}")
        file_id = f"file_{uuid.uuid4()}"
        temp_dir = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.root))
        try:
            with open(temp_dir / filename, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(temp_dir, self.root / file_id)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return self.get(file_id)

    def get(self, file_id: str) -> StoredFile:
        """Raises InvalidFileIdError for a malformed id, FileNotFoundError for an unknown one."""
        path = self._file_path(file_id)
        stat = path.stat()
        return StoredFile(id=file_id, bytes=stat.st_size, created_at=int(stat.st_mtime), filename=path.name)

    def path(self, file_id: str, filename: str | None = None) -> Path:
        """The stored file's path; with `filename`, only if that is the stored file's name."""
        path = self._file_path(file_id)
        if filename is not None and filename != path.name:
            raise FileNotFoundError(filename)
        return path

    def list(self) -> list[StoredFile]:
        files = []
        for folder in self.root.iterdir():
            if _ID_RE.match(folder.name):
                try:
                    files.append(self.get(folder.name))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return sorted(files, key=lambda f: (f.created_at, f.id))

    def delete(self, file_id: str) -> None:
        path = self._file_path(file_id)
        shutil.rmtree(path.parent)

    def _file_path(self, file_id: str) -> Path:
        if not isinstance(file_id, str) or not _ID_RE.match(file_id):
            raise InvalidFileIdError(file_id)
        folder = self.root / file_id
        entries = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        if len(entries) != 1:
            raise FileNotFoundError(file_id)
        return entries[0]
