"""The image store in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, R2, ...): `--store s3://BUCKET/PREFIX`,
the same `Store` interface and invariants as the folder store (store.py), shared by every server using it.

Client: boto3, the reference S3 client: presigned urls, listing with StartAfter and continuation tokens,
connect/read timeouts and bounded retries, and error codes that every S3-compatible server is tested against.
Endpoint and credentials: the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION) or boto3's other usual sources.

Keys under PREFIX:

- `files/<id>/<filename>`: a file's bytes (its Content-Type from its name);
- `batches/<first id>`: a batch's manifest (JSON: its files), written after all of them: that PUT is the commit.

- A batch is all-or-nothing: a file is listed, read or deleted only while its batch's manifest exists. The
  ids of one batch share their random bits and count up in the 12 bits after the version (RFC 9562's
  counter method, one millisecond apart as in the folder store), so each id names its batch's manifest, and a
  listing checks a page's batches with one listing of manifests, made before the files are listed (a batch
  committed meanwhile is shown whole or not at all). A failed save deletes what it wrote; what a crash (or an
  outage that also failed that undo) leaves is invisible, and removed by `sweep` (at start, and in each
  `prune`) once older than STALE_SECONDS, so that no save in flight on another server is touched.
- Ids and names as the folder store checks them: a key is only ever made of a checked id and a stored name.
- Retention: files older than `max_age` are not listed or served and are removed; beyond `max_bytes` the
  oldest go first (never the batch being saved). `prune` lists the whole store (1000 keys a request).
- Listing pages ascending from `after` through S3's StartAfter; descending (S3 lists ascending only) in
  windows of time that widen backwards from `after` or now, so a page costs about its own length.
- An outage (connection refused, timeouts, 5xx after MAX_ATTEMPTS tries, a missing bucket, refused
  credentials) is StoreUnavailableError, HTTP 503, for saves, reads, listings and deletes alike.
- Urls: through /v1/files (`files`), or presigned GET urls valid `url_expiry` seconds (`presigned`).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Set
from contextlib import contextmanager

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mlx_sd_server.images import MIME_TYPES
from mlx_sd_server.store import (
    IdClock,
    InvalidFileIdError,
    Page,
    StoredFile,
    StoreUnavailableError,
    check_file_id,
    check_filename,
    check_retention,
    id_time_ms,
    make_id,
    retention_interval,
    s3_location,
)

log = logging.getLogger("mlx_sd_server.store")

URL_MODES = ("files", "presigned")
DEFAULT_URL_EXPIRY = 3600  # seconds a presigned url is valid
MAX_URL_EXPIRY = 7 * 86400  # SigV4's longest
CONNECT_TIMEOUT = 3.0  # seconds; an unreachable store is a 503 in seconds, not a hung request
READ_TIMEOUT = 20.0
MAX_ATTEMPTS = 3  # tries of one S3 request (boto3's standard retry mode: backoff, transient errors only)
LIST_PAGE = 1000  # keys per LIST request (S3's largest); module-level so tests can page in small steps
MAX_BATCH = 4096  # files in one batch: the 12-bit counter in its ids
STALE_SECONDS = 3600.0  # an uncommitted file this old is a leftover, not a save in flight
DESC_WINDOW_MS = 60_000  # the first window of a descending page, widened 4x until the page is full
FILES = "files/"
BATCHES = "batches/"
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_TAIL_BITS = 62  # the random bits an id's batch shares (UUIDv7's rand_b)


def batch_of(file_id: str) -> str | None:
    """The first id of the batch `file_id` belongs to (its manifest's name); None for an id not made here."""
    ms = id_time_ms(file_id)
    if ms is None:
        return None
    value = uuid.UUID(file_id[5:]).int
    index = (value >> 64) & 0xFFF
    if index > ms:
        return None
    return make_id(ms - index, value & (2**_TAIL_BITS - 1))


def _batch_ids(first_ms: int, count: int) -> list[str]:
    """`count` new ids for one batch: milliseconds first_ms, first_ms + 1, ..., counter 0, 1, ..., one tail."""
    tail = int.from_bytes(os.urandom(8), "big") & (2**_TAIL_BITS - 1)
    return [make_id(first_ms + i, (i << 64) | tail) for i in range(count)]


def _put(client, bucket: str, key: str, body: bytes, content_type: str) -> None:
    """One object written. Module-level so tests can fail a save part-way."""
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)


class S3Store:
    def __init__(
        self,
        location: str,
        *,
        max_age: float | None = None,
        max_bytes: int | None = None,
        urls: str = "files",
        url_expiry: int = DEFAULT_URL_EXPIRY,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ):
        """`location`: s3://BUCKET/PREFIX. `urls`: `files` (through /v1/files) or `presigned`. The endpoint,
        region and credentials default to the standard AWS variables. Checks the bucket (ValueError if it
        does not exist or refuses these credentials), then sweeps and applies retention; an unreachable store
        is only logged (it answers 503 until it is back)."""
        check_retention(max_age, max_bytes)
        if urls not in URL_MODES:
            raise ValueError(f"urls must be one of {', '.join(URL_MODES)}, got {urls!r}")
        if not 1 <= url_expiry <= MAX_URL_EXPIRY:
            raise ValueError(f"url_expiry must be 1 to {MAX_URL_EXPIRY} seconds, got {url_expiry}")
        self.bucket, self.prefix = s3_location(location)
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.urls = urls
        self.url_expiry = url_expiry
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            signature_version="s3v4",
            # S3-compatible servers: path-style urls (no per-bucket DNS), checksums only where S3 requires them
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self._clock = IdClock()
        try:
            self._check_bucket()
            self.sweep()
            self.prune()
        except StoreUnavailableError as error:
            log.warning("%s; the image store answers 503 until it is back", error)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    # --- saving -------------------------------------------------------------------------------------

    def save(self, data: bytes, filename: str) -> StoredFile:
        return self.save_batch([(data, filename)])[0]

    def save_batch(self, items: Iterable[tuple[bytes, str]]) -> list[StoredFile]:
        """Save every (data, filename) or none of them: the files, then the manifest that commits them.
        Raises ValueError for an unsafe name (before writing anything), StoreUnavailableError when S3 fails,
        and whatever else failed; what was written is deleted (or, if S3 is down, left invisible for `sweep`)."""
        items = list(items)
        for _, filename in items:
            check_filename(filename)
        if not items:
            return []
        if len(items) > MAX_BATCH:
            raise ValueError(f"a batch is at most {MAX_BATCH} files, got {len(items)}")
        ids = _batch_ids(self._clock.take(len(items)), len(items))
        stored = [
            StoredFile(id=file_id, bytes=len(data), created_at=self._created_at(file_id), filename=name)
            for file_id, (data, name) in zip(ids, items)
        ]
        written: list[str] = []
        try:
            with self._errors("save the images"):
                for entry, (data, _) in zip(stored, items):
                    key = self._file_key(entry.id, entry.filename)
                    _put(self._client, self.bucket, key, data, _content_type(entry.filename))
                    written.append(key)
                manifest = json.dumps({"files": [entry.to_dict() for entry in stored]}).encode()
                written.append(self._batch_key(ids[0]))  # undone too, should the commit fail after all
                _put(self._client, self.bucket, written[-1], manifest, "application/json")
        except BaseException:
            self._undo(written)
            raise
        if self.max_bytes is not None:
            try:
                self.prune(keep=set(ids))
            except OSError:
                log.exception("retention: could not remove old files from %s", self.location)
        return stored

    def _undo(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self._delete_keys(keys)
        except OSError as error:
            log.warning(
                "could not undo a failed save (%s): %d object(s) stay invisible until the sweep", error, len(keys)
            )

    # --- reading ------------------------------------------------------------------------------------

    def get(self, file_id: str) -> StoredFile:
        """Raises InvalidFileIdError for a malformed id, FileNotFoundError for an unknown one."""
        return self._find(file_id)[0]

    def read(self, file_id: str, filename: str | None = None) -> tuple[str, bytes]:
        """The stored file's name and bytes; with `filename`, only if that is the stored file's name."""
        entry, key = self._find(file_id)
        if filename is not None and filename != entry.filename:
            raise FileNotFoundError(filename)
        with self._errors("read an image"):
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as error:
                if _error_code(error) in _NOT_FOUND:
                    raise FileNotFoundError(file_id) from None
                raise
            with body:
                return entry.filename, body.read()

    def list(self) -> builtins.list[StoredFile]:
        """Every file, oldest first."""
        return self._visible(None, None, None, self._cutoff())[0]

    def list_page(self, limit: int = 10_000, after: str | None = None, order: str = "desc") -> Page:
        """Up to `limit` files following the file `after` in (created_at, id) order, `asc` or `desc`.
        Raises InvalidFileIdError for a malformed `after`, FileNotFoundError for one not made by a store of
        ours (ours carry their creation time, so a deleted file's id stays a valid cursor)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        if after is not None:
            check_file_id(after)
            if id_time_ms(after) is None:
                raise FileNotFoundError(after)
        cutoff = self._cutoff()
        if order == "asc":
            files, more = self._visible(after, None, limit, cutoff)
            return Page(files, more)
        return self._page_desc(after, limit, cutoff)

    def _page_desc(self, after: str | None, limit: int, cutoff: int | None) -> Page:
        """Windows [lo, top) of creation time, from `after` (or now) backwards, each 4x the last, until the
        page is full or the oldest file is in: each window is listed ascending, newest windows in front."""
        floor_ms = self._oldest_ms()
        if floor_ms is None:
            return Page([], False)
        if cutoff is not None:
            floor_ms = max(floor_ms, cutoff * 1000)
        after_ms = id_time_ms(after) if after is not None else None
        top_ms = after_ms if after_ms is not None else int(time.time() * 1000)
        stop, span = after, DESC_WINDOW_MS
        newest_last: builtins.list[StoredFile] = []
        while True:
            lo_ms = top_ms - span
            start = make_id(lo_ms, 0) if lo_ms > floor_ms else None  # the smallest id of that millisecond
            newest_last = self._visible(start, stop, None, cutoff)[0] + newest_last
            if len(newest_last) > limit or start is None:
                break
            stop, top_ms, span = start, lo_ms, span * 4
        files = newest_last[::-1]
        return Page(files[:limit], len(files) > limit)

    def _visible(
        self, start: str | None, stop: str | None, limit: int | None, cutoff: int | None
    ) -> tuple[builtins.list[StoredFile], bool]:
        """Visible files with ids in (start, stop), ascending: at most `limit` of them, and whether more
        follow. Manifests are read ahead of the files they decide on: a run of manifests (one LIST), then
        the files whose batches it settles; a file past it waits, and the files are listed again from there
        after the next run (so no file is judged on a manifest listing older than its own)."""
        batches_prefix, files_prefix = self.prefix + BATCHES, self.prefix + FILES
        manifest_after = ""
        if start is not None:
            start_ms = id_time_ms(start) or 0
            manifest_after = batches_prefix + make_id(max(start_ms - MAX_BATCH + 1, 0), 0)
        manifest_pages = self._pages(batches_prefix, manifest_after)
        committed: set[str] = set()
        horizon, settled_all = "", False

        def read_manifests() -> None:
            nonlocal horizon, settled_all
            keys, settled_all = next(manifest_pages)
            for key, _ in keys:
                batch = key[len(batches_prefix) :]
                if _is_id(batch):
                    committed.add(batch)
                    horizon = max(horizon, batch)

        read_manifests()
        found: builtins.list[StoredFile] = []
        cursor = files_prefix + start + "0" if start is not None else ""  # "0" sorts right after "/"
        while True:
            for key, entry, batch in self._files(cursor):
                if stop is not None and entry.id >= stop:
                    return found, False
                if not settled_all and batch > horizon:
                    break  # not settled yet: read more manifests, then list again from here
                cursor = key
                if batch in committed and (cutoff is None or entry.created_at >= cutoff):
                    found.append(entry)
                    if limit is not None and len(found) > limit:
                        return found[:limit], True
            else:
                return found, False
            read_manifests()

    def _oldest_ms(self) -> int | None:
        """The creation time of the oldest file key (committed or not); None: the store has none."""
        for _, entry, _ in self._files(""):
            return _ms(entry.id)
        return None

    # --- removing -----------------------------------------------------------------------------------

    def delete(self, file_id: str) -> None:
        """Remove a stored file (and its batch's manifest once the batch has no file left)."""
        _, key = self._find(file_id)
        with self._errors("delete an image"):
            self._client.delete_object(Bucket=self.bucket, Key=key)
        batch = batch_of(file_id)
        assert batch is not None  # _find found it
        try:
            self._drop_manifest_if_empty(batch)
        except OSError as error:
            log.warning("could not check %s's batch for files left (%s); the next sweep does", file_id, error)

    def _drop_manifest_if_empty(self, batch: str) -> None:
        with self._errors("read a batch manifest"):
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=self._batch_key(batch))["Body"]
            except ClientError as error:
                if _error_code(error) in _NOT_FOUND:
                    return
                raise
            with body:
                ids = {entry["id"] for entry in json.loads(body.read())["files"]}
        last = max(ids)
        for _, entry, _ in self._files(self.prefix + FILES + batch):  # the batch's ids, and what came between
            if entry.id in ids:
                return  # one is left
            if entry.id > last:
                break
        self._delete_keys([self._batch_key(batch)])

    def prune(self, now: float | None = None, keep: Set[str] = frozenset()) -> builtins.list[str]:
        """Apply retention: remove files older than max_age, then the oldest until within max_bytes (except
        `keep`); and what `sweep` removes. Returns the ids removed."""
        if self.max_age is None and self.max_bytes is None:
            return []
        committed, keys = self._scan()
        cutoff = self._cutoff(now)
        total = sum(entry.bytes for _, entry, batch in keys if batch in committed)
        doomed: dict[str, StoredFile] = {}
        for key, entry, batch in keys:  # oldest first
            if batch not in committed:
                continue
            expired = cutoff is not None and entry.created_at < cutoff
            over = self.max_bytes is not None and total > self.max_bytes
            if not (expired or over):
                break  # nothing later is older, and the rest fits
            if entry.id in keep:
                continue
            doomed[key] = entry
            total -= entry.bytes
        left = [item for item in keys if item[0] not in doomed]
        self._delete_keys([*doomed, *self._leftovers(committed, left, STALE_SECONDS)])
        if doomed:
            log.info("retention: removed %d old file(s) from %s", len(doomed), self.location)
        return [entry.id for entry in doomed.values()]

    def sweep(self, stale_after: float = STALE_SECONDS) -> None:
        """Remove what failed or interrupted saves left (files of no manifest, older than `stale_after`
        seconds) and manifests whose files are all gone."""
        committed, keys = self._scan()
        leftovers = self._leftovers(committed, keys, stale_after)
        self._delete_keys(leftovers)
        if leftovers:
            log.warning("removed %d object(s) left by saves that failed or were interrupted", len(leftovers))

    def _leftovers(
        self, committed: set[str], keys: builtins.list[tuple[str, StoredFile, str]], stale_after: float
    ) -> builtins.list[str]:
        stale_ms = (time.time() - stale_after) * 1000
        uncommitted = [key for key, entry, batch in keys if batch not in committed and _ms(entry.id) < stale_ms]
        used = {batch for _, _, batch in keys}
        return uncommitted + [self._batch_key(batch) for batch in sorted(committed - used)]

    @property
    def prune_interval(self) -> float | None:
        """How often a server should call `prune` (None: no retention to apply)."""
        return retention_interval(self.max_age, self.max_bytes)

    @property
    def total_bytes(self) -> int:
        """The visible files' size in all (a listing of the whole store)."""
        committed, keys = self._scan()
        return sum(entry.bytes for _, entry, batch in keys if batch in committed)

    # --- urls ---------------------------------------------------------------------------------------

    def download_url(self, stored: StoredFile) -> str | None:
        """With `presigned` urls: a GET url valid url_expiry seconds (made here, no request); else None."""
        if self.urls != "presigned":
            return None
        check_file_id(stored.id)
        check_filename(stored.filename)
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._file_key(stored.id, stored.filename)},
            ExpiresIn=self.url_expiry,
        )

    # --- internals ----------------------------------------------------------------------------------

    def _check_bucket(self) -> None:
        """ValueError for a bucket that is not there or refuses these credentials (a setting to fix)."""
        with self._errors("reach the bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (403, 404):
                    reason = "does not exist" if status == 404 else "refuses these credentials"
                    raise ValueError(f"the S3 bucket {self.bucket!r} {reason}") from None
                raise

    def _find(self, file_id: str) -> tuple[StoredFile, str]:
        """A visible file and its key: its batch's manifest first, then the file under its id."""
        check_file_id(file_id)
        batch = batch_of(file_id)
        if batch is None:
            raise FileNotFoundError(file_id)
        with self._errors("look up an image"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._batch_key(batch))
            except ClientError as error:
                if _error_code(error) in _NOT_FOUND:
                    raise FileNotFoundError(file_id) from None
                raise
        folder = self.prefix + FILES + file_id + "/"
        keys = next(self._pages(folder, "", max_keys=2))[0]
        names = [(key[len(folder) :], size) for key, size in keys if _is_name(key[len(folder) :])]
        if len(names) != 1:
            raise FileNotFoundError(file_id)
        (name, size), cutoff = names[0], self._cutoff()
        entry = StoredFile(id=file_id, bytes=size, created_at=self._created_at(file_id), filename=name)
        if cutoff is not None and entry.created_at < cutoff:
            raise FileNotFoundError(file_id)
        return entry, folder + name

    def _scan(self) -> tuple[set[str], builtins.list[tuple[str, StoredFile, str]]]:
        """The whole store: the committed batches, then (listed after them) every file key, oldest first,
        with its file and its batch."""
        batches_prefix = self.prefix + BATCHES
        committed = {
            key[len(batches_prefix) :]
            for keys, _ in self._pages(batches_prefix, "")
            for key, _ in keys
            if _is_id(key[len(batches_prefix) :])
        }
        return committed, list(self._files(""))

    def _files(self, start_after: str) -> Iterator[tuple[str, StoredFile, str]]:
        """(key, file, batch) of each file key after `start_after`, ascending, listed as they are consumed;
        keys that are not `<id>/<filename>` of an id made here are passed over."""
        files_prefix = self.prefix + FILES
        for keys, _ in self._pages(files_prefix, start_after):
            for key, size in keys:
                parsed = _parse_file_key(key[len(files_prefix) :])
                batch = batch_of(parsed[0]) if parsed else None
                if parsed and batch:
                    file_id, name = parsed
                    entry = StoredFile(id=file_id, bytes=size, created_at=self._created_at(file_id), filename=name)
                    yield key, entry, batch

    def _pages(
        self, prefix: str, start_after: str, max_keys: int | None = None
    ) -> Iterator[tuple[builtins.list[tuple[str, int]], bool]]:
        """The (key, size) pairs under `prefix` after `start_after`, ascending, one LIST reply at a time,
        each with whether it is the last."""
        request = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys or LIST_PAGE}
        if start_after:
            request["StartAfter"] = start_after
        while True:
            with self._errors("list the images"):
                reply = self._client.list_objects_v2(**request)
            keys = [(item["Key"], item["Size"]) for item in reply.get("Contents", ())]
            token = reply.get("NextContinuationToken") if reply.get("IsTruncated") else None
            yield keys, token is None
            if token is None:
                return
            request["ContinuationToken"] = token

    def _delete_keys(self, keys: builtins.list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects' most
            chunk = [{"Key": key} for key in keys[start : start + 1000]]
            with self._errors("delete images"):
                reply = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
            failed = reply.get("Errors") or []
            if failed:
                first = failed[0]
                raise StoreUnavailableError(
                    f"the image store (S3) did not delete {len(failed)} object(s): {first.get('Code')} "
                    f"{first.get('Message', '')}".strip()
                )

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """S3 and connection failures -> StoreUnavailableError (a clear message, no endpoint in it; the
        details go to the log). Errors the caller handles (a missing key) pass as they are."""
        try:
            yield
        except ClientError as error:
            code = _error_code(error)
            if code in _NOT_FOUND:
                raise
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            log.warning("S3 (%s) could not %s: %s", self.location, action, error)
            raise StoreUnavailableError(
                f"the image store could not {action}: S3 answered {status} {code}; try again later"
            ) from error
        except BotoCoreError as error:
            log.warning("S3 (%s) could not %s: %s", self.location, action, error)
            raise StoreUnavailableError(
                f"the image store could not {action}: S3 is unreachable ({type(error).__name__}); try again later"
            ) from error

    def _file_key(self, file_id: str, filename: str) -> str:
        return f"{self.prefix}{FILES}{file_id}/{filename}"

    def _batch_key(self, batch: str) -> str:
        return f"{self.prefix}{BATCHES}{batch}"

    def _cutoff(self, now: float | None = None) -> int | None:
        if self.max_age is None:
            return None
        return int((time.time() if now is None else now) - self.max_age)

    @staticmethod
    def _created_at(file_id: str) -> int:
        return _ms(file_id) // 1000


def _ms(file_id: str) -> int:
    return id_time_ms(file_id) or 0


def _is_id(text: str) -> bool:
    try:
        check_file_id(text)
    except InvalidFileIdError:
        return False
    return True


def _is_name(text: str) -> bool:
    try:
        check_filename(text)
    except ValueError:
        return False
    return True


def _parse_file_key(rest: str) -> tuple[str, str] | None:
    """`<id>/<filename>` (a key less its `files/` prefix) -> (id, filename); None for anything else."""
    file_id, slash, name = rest.partition("/")
    return (file_id, name) if slash and _is_id(file_id) and _is_name(name) else None


def _content_type(filename: str) -> str:
    return MIME_TYPES.get(filename.rpartition(".")[2].lower(), "application/octet-stream")


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
