"""The file store's invariants, in the store and through HTTP: a batch is saved all-or-nothing (a failure
or a kill -9 mid-save leaves nothing listed, and a restart sweeps the leftovers), a full disk is a 507
with nothing kept, retention by age and by size (oldest first), `GET /v1/files` in pages over 20,000
files and off the event loop, links in the store never followed, urls never built from the Host header."""

import dataclasses
import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import mlx_sd_server.store as store_module
from api_server import FakeRegistry, live_server, request
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.store import FileStore, StoreFullError

JSON = {"Content-Type": "application/json"}
REPO = Path(__file__).resolve().parents[1]


def post(url, headers=None, **fields):
    return request(url, "POST", "/v1/images/generations", json.dumps(fields).encode(), {**JSON, **(headers or {})})


def entries(root: Path) -> list[str]:
    """Everything in the store folder, hidden staging folders included."""
    return sorted(p.name for p in root.iterdir())


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def fail_on_call(monkeypatch, name: str, number: int, error: BaseException):
    """Make store_module.<name> raise `error` on its `number`th call (the others run as usual)."""
    real = getattr(store_module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, name, wrapper)
    return calls


BATCH = [(b"a" * 10, "image_1.png"), (b"b" * 10, "image_2.png"), (b"c" * 10, "image_3.png")]


# --- all or nothing -----------------------------------------------------------------------------------


def test_a_batch_failing_on_its_second_image_keeps_nothing(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    kept = store.save(b"earlier", "kept.png")
    fail_on_call(monkeypatch, "_write_file", 2, RuntimeError("encoder blew up"))
    with pytest.raises(RuntimeError):
        store.save_batch(BATCH)
    assert [f.id for f in store.list()] == [kept.id]
    assert entries(tmp_path) == [kept.id]  # no staging folder, no half batch
    assert [f.id for f in FileStore(tmp_path).list()] == [kept.id]


def test_a_batch_failing_while_moving_into_place_keeps_nothing(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    fail_on_call(monkeypatch, "_rename", 3, OSError(errno.EIO, "I/O error"))
    with pytest.raises(OSError):
        store.save_batch(BATCH)  # two of three were already in place: both taken back
    assert store.list() == [] and entries(tmp_path) == []


def test_a_saved_batch_is_listed_whole_in_order(tmp_path):
    store = FileStore(tmp_path)
    saved = store.save_batch(BATCH)
    assert [f.filename for f in store.list()] == ["image_1.png", "image_2.png", "image_3.png"]
    assert [f.id for f in store.list()] == [f.id for f in saved]
    assert store.read(saved[1].id, "image_2.png") == ("image_2.png", b"b" * 10)
    assert store.total_bytes == 30


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import mlx_sd_server.store as s
    store = s.FileStore(sys.argv[1])
    store.save(b"earlier", "kept.png")
    name = sys.argv[2]  # pause after the second write or the second rename, for the kill
    real, calls = getattr(s, name), []
    def pausing(*args):
        real(*args)
        calls.append(1)
        if len(calls) == 2:
            print("paused", flush=True)
            time.sleep(120)
    setattr(s, name, pausing)
    store.save_batch([(b"a" * 10, "a.png"), (b"b" * 10, "b.png"), (b"c" * 10, "c.png")])
""")


@pytest.mark.parametrize("phase", ["_write_file", "_rename"])
def test_kill_9_mid_save_leaves_nothing_listed_after_restart(tmp_path, phase):
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path), phase], cwd=REPO,
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline() == b"paused\n"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    before = entries(tmp_path)
    assert any(name.startswith(".tmp-") for name in before)
    if phase == "_rename":  # two of the batch's three already sat in the store when it died
        assert len([name for name in before if name.startswith("file_")]) == 3
    store = FileStore(tmp_path)  # the restart
    assert [f.filename for f in store.list()] == ["kept.png"]
    assert entries(tmp_path) == [store.list()[0].id]


# --- a full disk ----------------------------------------------------------------------------------------


def test_enospc_in_the_store_keeps_nothing(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    fail_on_call(monkeypatch, "_write_file", 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StoreFullError) as raised:
        store.save_batch(BATCH)
    assert raised.value.errno == errno.ENOSPC and "full" in str(raised.value)
    assert store.list() == [] and entries(tmp_path) == []


def test_enospc_is_a_507_with_nothing_listed(tmp_path, monkeypatch):
    app = create_app(FakeRegistry(), FileStore(tmp_path))
    with live_server(app) as url:
        fail_on_call(monkeypatch, "_write_file", 2, OSError(errno.ENOSPC, "No space left on device"))
        reply = post(url, prompt="x", size="64x64", steps=1, n=3)
        assert reply.status == 507, reply.body
        assert reply.headers["content-type"] == "application/json"
        error = reply.json()["error"]
        assert error["code"] == "insufficient_storage" and error["param"] is None
        assert "full" in error["message"] and error["type"]
        assert b"Traceback" not in reply.body
        assert request(url, "GET", "/v1/files").json()["data"] == []
        assert entries(tmp_path) == []
        monkeypatch.undo()  # space again: the server goes on
        reply = post(url, prompt="x", size="64x64", steps=1, n=2)
        assert reply.status == 200 and len(request(url, "GET", "/v1/files").json()["data"]) == 2


def test_a_client_gone_while_saving_leaves_no_files(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()
    real_save = store.save_batch

    def slow_save(items):
        entered.set()
        release.wait(30)
        try:
            return real_save(items)
        finally:
            returned.set()

    monkeypatch.setattr(store, "save_batch", slow_save)
    with live_server(create_app(FakeRegistry(), store)) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "x", "size": "64x64", "steps": 1, "n": 2}).encode()
        client = socket.create_connection((host, int(port)))
        client.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert entered.wait(30)
        client.close()
        time.sleep(0.5)  # the server notices the hang-up
        release.set()
        assert returned.wait(30)
        wait_for(lambda: not [name for name in entries(tmp_path) if name.startswith("file_")])
        assert store.list() == []


# --- retention ------------------------------------------------------------------------------------------


def legacy_file(root: Path, file_id: str, data: bytes, mtime: float, name="old.png") -> None:
    """A file as an older version stored it (uuid4 id; created_at is its modification time)."""
    (root / file_id).mkdir()
    (root / file_id / name).write_bytes(data)
    os.utime(root / file_id / name, (mtime, mtime))


def test_retention_by_age(tmp_path):
    now = time.time()
    old = "file_00000000-0000-4000-8000-000000000001"
    legacy_file(tmp_path, old, b"x" * 5, now - 3 * 86400)
    store = FileStore(tmp_path, max_age=86400)  # at start: the three-day-old file goes
    assert store.list() == [] and not (tmp_path / old).exists()
    first = store.save(b"1", "a.png")
    second = store.save(b"2", "b.png")
    assert store.prune(now=now + 3600) == []
    assert store.prune(now=now + 86400 + 10) == [first.id, second.id]
    assert store.list() == [] and entries(tmp_path) == []


def test_retention_by_size_removes_the_oldest_first(tmp_path):
    store = FileStore(tmp_path, max_bytes=25)
    first = store.save(b"1" * 10, "a.png")
    second = store.save(b"2" * 10, "b.png")
    third = store.save(b"3" * 10, "c.png")  # 30 > 25: the oldest goes
    assert [f.id for f in store.list()] == [second.id, third.id] and not (tmp_path / first.id).exists()
    batch = store.save_batch(BATCH)  # a batch being saved is never removed for its own sake
    assert [f.id for f in store.list()] == [f.id for f in batch] and store.total_bytes == 30
    assert store.prune() == [batch[0].id]
    assert store.total_bytes == 20


def test_retention_at_start_by_size(tmp_path):
    now = time.time()
    ids = [f"file_00000000-0000-4000-8000-00000000000{i}" for i in range(4)]
    for age, file_id in enumerate(ids):
        legacy_file(tmp_path, file_id, b"x" * 10, now - 100 * (4 - age))  # ids[0] the oldest
    store = FileStore(tmp_path, max_bytes=20)
    assert [f.id for f in store.list()] == ids[2:]


def test_server_prunes_expired_files_in_the_background(tmp_path):
    store = FileStore(tmp_path, max_age=1)
    assert store.prune_interval == 1.0
    with live_server(create_app(FakeRegistry(), store)) as url:
        reply = post(url, prompt="x", size="64x64", steps=1)
        assert reply.status == 200
        file_id = reply.json()["data"][0]["url"].split("/")[-2]
        assert (tmp_path / file_id).is_dir()
        wait_for(lambda: not (tmp_path / file_id).exists(), timeout=10)
        assert request(url, "GET", f"/v1/files/{file_id}").status == 404


# --- listing: pages, and off the event loop ---------------------------------------------------------------


def many_files(root: Path, count: int) -> list[str]:
    """`count` stored files, ten to a millisecond's id and hundreds to a second (ties in created_at)."""
    base = int(time.time() * 1000) - count * 10
    ids = []
    for i in range(count):
        file_id = store_module.make_id(base + i * 3)
        (root / file_id).mkdir()
        (root / file_id / f"image_{i}.png").write_bytes(b"x")
        ids.append(file_id)
    return ids


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    ids = many_files(root, 20_000)
    store = FileStore(root)
    with live_server(create_app(FakeRegistry(), store)) as url:
        yield url, store, ids


def page_through(url, limit, order=None):
    seen, after, pages = [], None, 0
    while True:
        query = f"/v1/files?limit={limit}" + (f"&order={order}" if order else "") + (f"&after={after}" if after else "")
        body = request(url, "GET", query).json()
        pages += 1
        assert body["object"] == "list" and len(body["data"]) <= limit
        ids = [f["id"] for f in body["data"]]
        assert (body["first_id"], body["last_id"]) == ((ids[0], ids[-1]) if ids else (None, None))
        seen += ids
        if not body["has_more"]:
            return seen, pages
        assert len(ids) == limit
        after = ids[-1]


def test_20000_files_list_in_pages(big_store):
    url, store, ids = big_store
    newest_first, pages = page_through(url, 1000)  # default order: desc, as OpenAI's
    assert newest_first == ids[::-1] and pages == 20
    oldest_first, pages = page_through(url, 7000, order="asc")
    assert oldest_first == ids and pages == 3
    default = request(url, "GET", "/v1/files").json()  # OpenAI's default limit: 10000
    assert len(default["data"]) == 10_000 and default["has_more"] and default["first_id"] == ids[-1]
    exact = request(url, "GET", f"/v1/files?order=asc&limit=5&after={ids[-6]}").json()
    assert [f["id"] for f in exact["data"]] == ids[-5:] and exact["has_more"] is False


def test_a_deleted_cursor_still_pages(big_store):
    url, store, ids = big_store
    cursor = ids[100]
    assert request(url, "DELETE", f"/v1/files/{cursor}").status == 200
    try:
        body = request(url, "GET", f"/v1/files?order=asc&limit=3&after={cursor}").json()
        assert [f["id"] for f in body["data"]] == ids[101:104]
        body = request(url, "GET", f"/v1/files?limit=2&after={cursor}").json()
        assert [f["id"] for f in body["data"]] == [ids[99], ids[98]]
    finally:
        os.mkdir(store.root / cursor)
        (store.root / cursor / "image_100.png").write_bytes(b"x")
        store._index()


@pytest.mark.parametrize("query, param", [
    ("limit=0", "limit"), ("limit=10001", "limit"), ("limit=x", "limit"), ("limit=-1", "limit"),
    ("order=up", "order"), ("after=../../etc", "after"), ("after=file_00000000-0000-4000-8000-00000000dead", "after"),
])
def test_bad_list_parameters_are_400(big_store, query, param):
    url, _, _ = big_store
    reply = request(url, "GET", f"/v1/files?{query}")
    assert reply.status == 400
    assert reply.json()["error"]["param"] == param


def test_a_huge_bad_parameter_is_not_echoed_whole(big_store):
    url, _, _ = big_store
    for query in ("after=" + "x" * 5000, "order=" + "y" * 5000, "limit=" + "9" * 5000):
        reply = request(url, "GET", f"/v1/files?{query}")
        assert reply.status == 400 and len(reply.json()["error"]["message"]) < 200


def test_health_answers_while_a_listing_is_under_way(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    entered, release = threading.Event(), threading.Event()
    real_page = store.list_page

    def blocked_page(**kwargs):
        entered.set()
        release.wait(30)
        return real_page(**kwargs)

    monkeypatch.setattr(store, "list_page", blocked_page)
    with live_server(create_app(FakeRegistry(), store)) as url:
        replies = []
        lister = threading.Thread(target=lambda: replies.append(request(url, "GET", "/v1/files")))
        lister.start()
        try:
            assert entered.wait(30)
            host, port = url.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=5)  # a listing on the loop would hang it
            started = time.monotonic()
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            assert time.monotonic() - started < 5
            conn.close()
        finally:
            release.set()
            lister.join(30)
        assert replies[0].status == 200 and replies[0].json()["data"] == []


# --- links are never followed ---------------------------------------------------------------------------


@pytest.fixture
def linked(tmp_path):
    """A store whose two files were replaced by links to outside it, one after the store had indexed it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "image_1.png").write_bytes(b"secret")
    root = tmp_path / "files"
    store = FileStore(root)
    dir_link, file_link, fine = (f.id for f in store.save_batch(BATCH))
    for file_id in (dir_link, file_link):
        for name in os.listdir(root / file_id):
            os.unlink(root / file_id / name)
    os.rmdir(root / dir_link)
    os.symlink(outside, root / dir_link)  # the id folder is a link
    os.symlink(outside / "image_1.png", root / file_link / "image_2.png")  # the file in it is a link
    return store, outside, dir_link, file_link, fine


def test_links_are_not_stored_files(linked):
    store, outside, dir_link, file_link, fine = linked
    for file_id in (dir_link, file_link):
        for action in (store.get, store.read, store.path, store.delete):
            with pytest.raises(FileNotFoundError):
                action(file_id)
    assert [f.id for f in store.list()] == [fine]  # indexed before the swap: dropped on sight
    assert [f.id for f in FileStore(store.root).list()] == [fine]  # never indexed
    assert (outside / "image_1.png").read_bytes() == b"secret"


def test_links_through_http_are_404_and_their_targets_untouched(linked):
    store, outside, dir_link, file_link, fine = linked
    with live_server(create_app(FakeRegistry(), store)) as url:
        for file_id, name in ((dir_link, "image_1.png"), (file_link, "image_2.png")):
            for method, path in (("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/download/{file_id}/{name}"),
                                 ("GET", f"/v1/files/download/{file_id}"), ("DELETE", f"/v1/files/{file_id}")):
                reply = request(url, method, path)
                assert reply.status == 404, (method, path, reply.body)
                assert reply.json()["error"]["code"] == "file_not_found"
                assert b"secret" not in reply.body
        listed = request(url, "GET", "/v1/files").json()
        assert [f["id"] for f in listed["data"]] == [fine]
        assert request(url, "DELETE", f"/v1/files/{fine}").status == 200
    assert (outside / "image_1.png").read_bytes() == b"secret"
    assert os.path.islink(store.root / dir_link) and os.path.islink(store.root / file_link / "image_2.png")


def test_the_start_sweep_does_not_follow_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ids").write_text("")
    (outside / "keep.png").write_bytes(b"keep")
    root = tmp_path / "files"
    root.mkdir()
    os.symlink(outside, root / ".tmp-evil")
    FileStore(root)
    assert entries(root) == [] and (outside / "keep.png").read_bytes() == b"keep"


# --- urls -------------------------------------------------------------------------------------------------


HOSTILE = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
           "Forwarded": "host=evil.example"}


@dataclasses.dataclass(frozen=True)
class BoundSettings(Settings):
    bound_url: str | None = None  # the server engineer's Settings field, until it lands


@pytest.mark.parametrize("settings, expected", [
    (Settings(), None),
    (Settings(download_url_prefix="https://images.example/"), "https://images.example"),
    (BoundSettings(bound_url="http://10.0.0.5:8080"), "http://10.0.0.5:8080"),
    (BoundSettings(download_url_prefix="https://cdn.example", bound_url="http://10.0.0.5:8080"), "https://cdn.example"),
])
def test_urls_never_come_from_the_host_header(tmp_path, settings, expected):
    with live_server(create_app(FakeRegistry(), FileStore(tmp_path), settings)) as url:
        reply = post(url, headers=HOSTILE, prompt="x", size="64x64", steps=1, n=2)
        assert reply.status == 200, reply.body
        urls = [item["url"] for item in reply.json()["data"]]
        prefix = expected or url  # no setting: the address the server answered on
        assert all(u.startswith(f"{prefix}/v1/files/download/file_") for u in urls), urls
        assert not any("evil" in u for u in urls)
        if expected is None:  # and those urls work
            assert request(url, "GET", urls[0].removeprefix(url)).status == 200
