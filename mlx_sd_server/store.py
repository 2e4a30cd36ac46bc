"""The file store behind `/v1/files`: one folder per file, `ROOT/file_<uuid>/<filename>`.

Its invariants:

- Ids and names from requests are never joined onto a path: an id must match the `file_<uuid>` pattern,
  and a name is only compared with the name actually stored.
- Nothing inside the store is followed as a symlink: an id folder or a file that is a link (to anywhere)
  is not a stored file (not found, never read, never deleted through).
- A batch (one request's images) is saved all-or-nothing. Its files are written and synced in a staging
  folder `ROOT/.tmp-*` with a journal of their ids, renamed into place, and only then is the journal
  removed: that removal is the commit. Until it, the files are invisible here; if the process dies
  before it, the next `FileStore` on the folder removes every id the journal names and the staging folder
  (`sweep`), so an interrupted save leaves nothing listed. A failed save (ENOSPC, ...) removes all of it
  at once; a full disk is `StoreFullError`.
- Retention: files older than `max_age` seconds are not listed or served and are removed; beyond
  `max_bytes` in all, the oldest files are removed first (never the batch being saved).
- The reply gap: a committed batch is the store's, whether or not its urls reached a client. If the process
  is killed outright (SIGKILL, power loss) after the commit but before the HTTP reply is sent, its files
  stay: complete, listed, served, and removed by `delete` or by retention like every other file (nothing
  marks them apart, and nothing needs to). While the process lives, a batch whose client went away during
  the save is deleted at once (api/images.py `_discard`).
- Listing reads an in-memory index (built once at start, kept up to date by this store), so a page of
  `list_page` costs its own length, not the store's size.

New ids are time-ordered (UUIDv7's layout: milliseconds first), so a file's `created_at` comes from its id
and listings order by (created_at, id), which is creation order; a cursor (`after`) stays valid after
its file is gone. Ids of older stores (uuid4) still work, ordered by their file's modification time.

The server types against `Store`, which this folder store and `s3_store.S3Store` (a bucket, the same
invariants) both are.
"""

from __future__ import annotations

import bisect
import builtins
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("mlx_sd_server.store")

_ID_RE = re.compile(r"^file_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEMP_PREFIX = ".tmp-"
_JOURNAL = "ids"  # in a staging folder: the ids its batch puts into the store, one a line
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_STORAGE_ERRNOS: set[int] = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_rename = os.rename  # module-level so that tests can interrupt a commit between two renames


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}


def max_age(text: str) -> float:
    """`--store-max-age`: `90s`, `30m`, `12h`, `7d` (a bare number is hours), in seconds. (Not
    idempotent: a command line keeps the text and converts it once, as cli.py's `_checked` does.)"""
    match = _DURATION_RE.match(text)
    seconds = float(match[1]) * _SECONDS[match[2]] if match else 0.0
    if seconds <= 0:
        raise ValueError(f"not a positive duration (e.g. 12h, 7d): {text!r}")
    return seconds


def max_gb(text: str) -> int:
    """`--store-max-gb`: a positive size in GB (GiB, 2**30 bytes; fractions allowed), in bytes."""
    try:
        size = float(text)
    except ValueError:
        size = 0.0
    if not size * 2**30 >= 1:  # also refuses nan
        raise ValueError(f"not a positive size in GB: {text!r}")
    return int(size * 2**30)


STORE_ENV = "MLX_SD_STORE"  # the default of `serve --store`
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket names
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def s3_location(text: str) -> tuple[str, str]:
    """`--store s3://BUCKET/PREFIX` -> (bucket, prefix ending in "/", or "" for the bucket's top). The prefix
    is of plain segments (letters, digits, `._-`; no `.` or `..`)."""
    scheme, _, rest = text.partition("://")
    bucket, _, prefix = rest.partition("/")
    segments = [segment for segment in prefix.split("/") if segment]
    if scheme != "s3" or not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(f"not an S3 location s3://BUCKET/PREFIX (a valid bucket name): {text!r}")
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT_RE.match(segment):
            raise ValueError(f"the prefix of {text!r} may only have letters, digits and ._- between slashes")
    return bucket, "".join(f"{segment}/" for segment in segments)


def check_retention(max_age: float | None, max_bytes: int | None) -> None:
    """Raises ValueError for a retention limit that is not positive (None: no limit)."""
    if max_age is not None and max_age <= 0:
        raise ValueError(f"max_age must be positive, got {max_age}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")


def retention_interval(max_age: float | None, max_bytes: int | None) -> float | None:
    """How often a server should apply retention (`prune`): every minute, sooner for short ages; None: no
    retention to apply."""
    if max_age is None and max_bytes is None:
        return None
    return 60.0 if max_age is None else min(60.0, max(1.0, max_age / 10))


class InvalidFileIdError(ValueError):
    """Not of the form file_<uuid>: cannot name anything in the store."""


class StoreFullError(OSError):
    """The disk (or quota) is full: nothing of the batch was kept. HTTP 507."""


class StoreUnavailableError(OSError):
    """The store cannot be reached or refused to work (an S3 outage: connection refused, timeouts, 5xx):
    nothing of a batch being saved was kept. HTTP 503; the message names no endpoint or credentials."""


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

    @property
    def key(self) -> tuple[int, str]:
        return (self.created_at, self.id)


@dataclass(frozen=True)
class Page:
    files: list[StoredFile]
    has_more: bool


class Store(Protocol):
    """What the server needs of an image store, with FileStore's invariants (above): a folder here, or a
    bucket (mlx_sd_server/s3_store.py). Ids and names as `check_file_id` and `check_filename` allow."""

    @property
    def location(self) -> str:
        """Where the files are, for the log (a folder, or s3://BUCKET/PREFIX)."""
        ...

    def save(self, data: bytes, filename: str) -> StoredFile: ...

    def save_batch(self, items: Iterable[tuple[bytes, str]]) -> list[StoredFile]: ...

    def get(self, file_id: str) -> StoredFile: ...

    def read(self, file_id: str, filename: str | None = None) -> tuple[str, bytes]: ...

    def list(self) -> list[StoredFile]: ...

    def list_page(self, limit: int = 10_000, after: str | None = None, order: str = "desc") -> Page: ...

    def delete(self, file_id: str) -> None: ...

    def prune(self, now: float | None = None, keep: Set[str] = frozenset()) -> builtins.list[str]: ...

    def sweep(self) -> None: ...

    @property
    def prune_interval(self) -> float | None: ...

    @property
    def total_bytes(self) -> int: ...

    def download_url(self, stored: StoredFile) -> str | None:
        """A url clients fetch the file at directly (a presigned S3 url), or None: through /v1/files."""
        ...


def check_file_id(file_id: object) -> None:
    """Raises InvalidFileIdError unless `file_id` is of the form file_<uuid> (lower-case hex): the only
    ids a store looks up, so nothing else a request sends reaches a path or a key."""
    if not isinstance(file_id, str) or not _ID_RE.match(file_id):
        raise InvalidFileIdError(file_id)


def check_filename(filename: object) -> None:
    """Raises ValueError for a name a store does not save (a path, a hidden name, too long)."""
    if not isinstance(filename, str) or not _NAME_RE.match(filename):
        raise ValueError(f"unsafe file name {filename!r}")


def id_time_ms(file_id: str) -> int | None:
    """The creation time in an id of ours (version 7), None for other (older, uuid4) ids."""
    hexdigits = file_id[5:].replace("-", "")
    if hexdigits[12] != "7":
        return None
    return int(hexdigits[:12], 16)


def make_id(ms: int, low_bits: int | None = None) -> str:
    """A version 7 id made at `ms`: its 80 low bits random (or `low_bits`), version and variant stamped over."""
    low = int.from_bytes(os.urandom(10), "big") if low_bits is None else low_bits & (2**80 - 1)
    value = (ms & (2**48 - 1)) << 80 | low
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return f"file_{uuid.UUID(int=value)}"


class IdClock:
    """Creation times for new ids: each batch its own consecutive milliseconds, later than the last
    batch's, so ids are in creation order also within a batch and a millisecond."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0

    def take(self, count: int) -> int:
        """The first of `count` milliseconds reserved for a batch (the others follow it)."""
        with self._lock:
            first = max(int(time.time() * 1000), self._last_ms + 1)
            self._last_ms = first + count - 1
        return first


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _write_file(folder: Path, name: str, data: bytes) -> None:
    """Create `folder/name` (never through a link), write and sync it. Module-level so tests can fail it."""
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a folder (or a link, or a file) at `path`, never following a link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)  # does not follow links inside, and refuses a path that became a link
    else:
        os.unlink(path)


class FileStore:
    def __init__(self, root: str | os.PathLike, *, max_age: float | None = None, max_bytes: int | None = None):
        """`max_age`: seconds a file is kept; `max_bytes`: the store's largest size (oldest removed first).
        None: no limit. Sweeps interrupted saves, indexes the folder and applies retention."""
        check_retention(max_age, max_bytes)
        self.root = Path(root)
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        self._order: list[tuple[int, str]] = []  # sorted keys of _files
        self._bytes = 0
        self._pending: set[str] = set()  # renamed into place, batch not committed yet: invisible
        self._clock = IdClock()
        self.sweep()
        self._index()
        self.prune()

    @property
    def location(self) -> str:
        return str(self.root)

    def download_url(self, stored: StoredFile) -> None:
        """Files of a folder are served through /v1/files."""
        return None

    # --- saving -------------------------------------------------------------------------------------

    def save(self, data: bytes, filename: str) -> StoredFile:
        return self.save_batch([(data, filename)])[0]

    def save_batch(self, items: Iterable[tuple[bytes, str]]) -> list[StoredFile]:
        """Save every (data, filename) or none of them. Raises ValueError for an unsafe name (before
        writing anything), StoreFullError when the disk is full, and whatever else failed, with nothing
        of the batch kept either way."""
        items = list(items)
        for _, filename in items:
            check_filename(filename)
        if not items:
            return []
        ids = self._new_ids(len(items))
        try:
            self._commit(ids, items)
        except OSError as error:
            if error.errno in _STORAGE_ERRNOS:
                raise StoreFullError(
                    error.errno,
                    f"the image store is full ({os.strerror(error.errno)}): no image of this request was kept",
                ) from error
            raise
        stored: list[StoredFile] = []
        for file_id, (data, name) in zip(ids, items):
            ms = id_time_ms(file_id)
            assert ms is not None  # _new_ids makes ids of ours, which carry their time
            stored.append(StoredFile(id=file_id, bytes=len(data), created_at=ms // 1000, filename=name))
        with self._lock:
            self._pending.difference_update(ids)
            for entry in stored:
                self._add(entry)
        try:
            self.prune(keep=set(ids))
        except OSError:
            log.exception("retention: could not remove old files from %s", self.root)
        return stored

    def _commit(self, ids: list[str], items: list[tuple[bytes, str]]) -> None:
        """Stage, journal, move into place, commit; on any failure (or interruption) undo all of it."""
        staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.root))
        moved: list[str] = []
        try:
            for file_id, (data, filename) in zip(ids, items):
                os.mkdir(staging / file_id)
                _write_file(staging / file_id, filename, data)
            _write_file(staging, _JOURNAL, "".join(f"{i}\n" for i in ids).encode())
            _fsync_dir(staging)
            with self._lock:
                self._pending.update(ids)
            for file_id in ids:
                _rename(staging / file_id, self.root / file_id)
                moved.append(file_id)
            _fsync_dir(self.root)
            os.unlink(staging / _JOURNAL)  # the commit
            _fsync_dir(staging)
        except BaseException:
            try:
                for file_id in moved:
                    _remove(self.root / file_id)
                _remove(staging)
            except OSError:  # the journal stays, and so do the ids it names (invisible) till the sweep
                log.exception("could not undo a failed save in %s; the next start removes it", self.root)
            else:
                with self._lock:
                    self._pending.difference_update(ids)
            raise
        try:
            _remove(staging)  # empty now
        except OSError:
            log.warning("could not remove %s (the next start does)", staging)

    def _new_ids(self, count: int) -> list[str]:
        """Ids in creation order, also within a batch and a millisecond (one millisecond apart)."""
        first = self._clock.take(count)
        return [make_id(first + i) for i in range(count)]

    # --- reading ------------------------------------------------------------------------------------

    def get(self, file_id: str) -> StoredFile:
        """Raises InvalidFileIdError for a malformed id, FileNotFoundError for an unknown one."""
        self._check_id(file_id)
        with self._open_dir(file_id) as folder:
            name, st = folder.entry()
        return self._visible(self._stored(file_id, name, st))

    def read(self, file_id: str, filename: str | None = None) -> tuple[str, bytes]:
        """The stored file's name and bytes; with `filename`, only if that is the stored file's name."""
        self._check_id(file_id)
        with self._open_dir(file_id) as folder:
            name, st = folder.entry()
            self._visible(self._stored(file_id, name, st))
            if filename is not None and filename != name:
                raise FileNotFoundError(filename)
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=folder.fd)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise FileNotFoundError(file_id)
                return name, f.read()

    def path(self, file_id: str, filename: str | None = None) -> Path:
        """The stored file's path; with `filename`, only if that is the stored file's name. (Opening it
        follows a link swapped in later; `read` does not.)"""
        self._check_id(file_id)
        with self._open_dir(file_id) as folder:
            name, st = folder.entry()
        self._visible(self._stored(file_id, name, st))
        if filename is not None and filename != name:
            raise FileNotFoundError(filename)
        return self.root / file_id / name

    def list(self) -> list[StoredFile]:
        """Every file, oldest first."""
        files: list[StoredFile] = []
        after = None
        while True:
            page = self.list_page(limit=10_000, after=after, order="asc")
            files += page.files
            if not page.has_more:
                return files
            after = page.files[-1].id

    def list_page(self, limit: int = 10_000, after: str | None = None, order: str = "desc") -> Page:
        """Up to `limit` files following the file `after` in (created_at, id) order, `asc` or `desc`.
        Raises InvalidFileIdError for a malformed `after`, FileNotFoundError for an unknown one that is
        not of ours (an id of ours needs no lookup: it carries its creation time)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        if after is not None:
            self._check_id(after)
        cutoff = self._cutoff()
        files: list[StoredFile] = []
        gone: list[StoredFile] = []
        with self._lock:
            if after is None:
                position = 0 if order == "asc" else len(self._order) - 1
            else:
                key = self._key_of(after)
                position = (
                    bisect.bisect_right(self._order, key)
                    if order == "asc"
                    else bisect.bisect_left(self._order, key) - 1
                )
            step = 1 if order == "asc" else -1
            candidates: list[StoredFile] = []
            while 0 <= position < len(self._order) and len(candidates) <= limit:
                entry = self._files[self._order[position][1]]
                position += step
                if cutoff is None or entry.created_at >= cutoff:
                    candidates.append(entry)
            more_beyond = 0 <= position < len(self._order)
        for entry in candidates:  # the disk is the truth: what was removed or replaced by a link is dropped
            try:
                with self._open_dir(entry.id) as folder:
                    folder.entry()
                files.append(entry)
            except FileNotFoundError:
                gone.append(entry)
        if gone:
            with self._lock:
                for entry in gone:
                    self._discard(entry.id)
        has_more = len(files) > limit or more_beyond
        return Page(files[:limit], has_more)

    def _key_of(self, file_id: str) -> tuple[int, str]:
        entry = self._files.get(file_id)
        if entry is not None:
            return entry.key
        ms = id_time_ms(file_id)
        if ms is None:
            raise FileNotFoundError(file_id)
        return (ms // 1000, file_id)

    # --- removing -----------------------------------------------------------------------------------

    def delete(self, file_id: str) -> None:
        """Remove a stored file. A link in the store is not a stored file: FileNotFoundError, untouched."""
        self._check_id(file_id)
        with self._open_dir(file_id) as folder:
            name, st = folder.entry()
        self._visible(self._stored(file_id, name, st))
        try:
            shutil.rmtree(self.root / file_id)  # refuses a folder replaced by a link meanwhile
        except OSError as error:
            if os.path.islink(self.root / file_id):
                raise FileNotFoundError(file_id) from error
            raise
        finally:
            if not os.path.lexists(self.root / file_id):
                with self._lock:
                    self._discard(file_id)

    # builtins.list: in this class body, `list` names the method above
    def prune(self, now: float | None = None, keep: Set[str] = frozenset()) -> builtins.list[str]:
        """Apply retention: remove files older than max_age, then the oldest until within max_bytes
        (except `keep`). Returns the ids removed."""
        if self.max_age is None and self.max_bytes is None:
            return []
        cutoff = self._cutoff(now)
        doomed: list[str] = []
        with self._lock:
            total = self._bytes
            for _, file_id in self._order:  # oldest first
                entry = self._files[file_id]
                expired = cutoff is not None and entry.created_at < cutoff
                over = self.max_bytes is not None and total > self.max_bytes
                if not (expired or over):
                    break  # nothing later is older, and the rest fits
                if file_id in keep:
                    continue
                doomed.append(file_id)
                total -= entry.bytes
            for file_id in doomed:
                self._discard(file_id)
        for file_id in doomed:
            _remove(self.root / file_id)
        if doomed:
            log.info("retention: removed %d old file(s) from %s", len(doomed), self.root)
        return doomed

    @property
    def prune_interval(self) -> float | None:
        """How often a server should call `prune` (None: no retention to apply)."""
        return retention_interval(self.max_age, self.max_bytes)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def sweep(self) -> None:
        """Remove what interrupted saves left: every id an uncommitted journal names, and the staging
        folders. Runs at start; a second process saving into the same folder would lose its batch."""
        with os.scandir(self.root) as entries:
            leftovers = [Path(e.path) for e in entries if e.name.startswith(_TEMP_PREFIX)]
        for staging in leftovers:
            if stat.S_ISDIR(os.lstat(staging).st_mode):
                try:
                    fd = os.open(staging / _JOURNAL, os.O_RDONLY | _NOFOLLOW)
                    with os.fdopen(fd, "rb") as f:
                        journal = f.read(1 << 20).decode("ascii", "replace").splitlines()
                except OSError:
                    journal = []  # not written yet (nothing moved) or committed (nothing to undo)
                undone = [i for i in journal if _ID_RE.match(i)]
                for file_id in undone:
                    _remove(self.root / file_id)
                if undone:
                    log.warning("removed %d file(s) of a save that was interrupted", len(undone))
            _remove(staging)

    # --- internals ----------------------------------------------------------------------------------

    def _index(self) -> None:
        files: dict[str, StoredFile] = {}
        with os.scandir(self.root) as entries:
            ids = [e.name for e in entries if _ID_RE.match(e.name) and e.is_dir(follow_symlinks=False)]
        for file_id in ids:
            try:
                with self._open_dir(file_id) as folder:
                    name, st = folder.entry()
            except FileNotFoundError:
                continue
            files[file_id] = self._stored(file_id, name, st)
        with self._lock:
            self._files = files
            self._order = sorted(entry.key for entry in files.values())
            self._bytes = sum(entry.bytes for entry in files.values())

    def _add(self, entry: StoredFile) -> None:
        if entry.id in self._files:
            self._discard(entry.id)
        self._files[entry.id] = entry
        bisect.insort(self._order, entry.key)
        self._bytes += entry.bytes

    def _discard(self, file_id: str) -> None:
        entry = self._files.pop(file_id, None)
        if entry is None:
            return
        position = bisect.bisect_left(self._order, entry.key)
        if position < len(self._order) and self._order[position] == entry.key:
            del self._order[position]
        self._bytes -= entry.bytes

    def _cutoff(self, now: float | None = None) -> int | None:
        if self.max_age is None:
            return None
        return int((time.time() if now is None else now) - self.max_age)

    def _visible(self, entry: StoredFile) -> StoredFile:
        cutoff = self._cutoff()
        if entry.id in self._pending or (cutoff is not None and entry.created_at < cutoff):
            raise FileNotFoundError(entry.id)
        return entry

    @staticmethod
    def _stored(file_id: str, name: str, st: os.stat_result) -> StoredFile:
        ms = id_time_ms(file_id)
        created = ms // 1000 if ms is not None else int(st.st_mtime)
        return StoredFile(id=file_id, bytes=st.st_size, created_at=created, filename=name)

    @staticmethod
    def _check_id(file_id: str) -> None:
        check_file_id(file_id)

    def _open_dir(self, file_id: str) -> _IdFolder:
        return _IdFolder(self.root / file_id, file_id)


class _IdFolder:
    """An id folder opened without following a link to it (a link is FileNotFoundError)."""

    def __init__(self, path: Path, file_id: str):
        self.file_id = file_id
        try:
            self.fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(file_id) from None
        except OSError as error:
            if error.errno == errno.ELOOP:  # a link
                raise FileNotFoundError(file_id) from None
            raise
        if not stat.S_ISDIR(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise FileNotFoundError(file_id)

    def entry(self) -> tuple[str, os.stat_result]:
        """The one regular file in the folder (not a link) and its stat."""
        with os.scandir(self.fd) as entries:
            names = [e.name for e in entries]
        if len(names) != 1:
            raise FileNotFoundError(self.file_id)
        st = os.stat(names[0], dir_fd=self.fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(self.file_id)
        return names[0], st

    def __enter__(self) -> _IdFolder:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
