import time

import pytest

from mlx_sd_server.store import FileStore, InvalidFileIdError, max_age, max_gb


def test_save_get_list_delete(tmp_path):
    store = FileStore(tmp_path)
    first = store.save(b"one", "image_1.png")
    second = store.save(b"two!", "image_2.png")
    assert first.id.startswith("file_") and first.id != second.id
    assert store.get(second.id).to_dict() == {
        "id": second.id, "bytes": 4, "created_at": second.created_at, "filename": "image_2.png",
        "purpose": "assistants_output", "object": "file",
    }
    assert {f.id for f in store.list()} == {first.id, second.id}
    assert store.path(first.id, "image_1.png").read_bytes() == b"one"
    store.delete(first.id)
    assert [f.id for f in store.list()] == [second.id]
    with pytest.raises(FileNotFoundError):
        store.get(first.id)


@pytest.mark.parametrize("file_id", [
    "../etc", "..", ".", "/etc/passwd", "file_../../x", "file_1234", "FILE_00000000-0000-0000-0000-000000000000",
    "file_00000000-0000-0000-0000-000000000000/..", "", "file_00000000-0000-0000-0000-00000000000g",
])
def test_malformed_ids_are_refused_before_touching_the_disk(tmp_path, file_id):
    store = FileStore(tmp_path / "store")
    for action in (store.get, store.delete, lambda i: store.path(i, "x.png")):
        with pytest.raises(InvalidFileIdError):
            action(file_id)


def test_unknown_id_and_wrong_name_are_not_found(tmp_path):
    store = FileStore(tmp_path)
    saved = store.save(b"x", "a.png")
    with pytest.raises(FileNotFoundError):
        store.get("file_00000000-0000-0000-0000-000000000000")
    for wrong in ("b.png", "../a.png", "a.png/..", ""):
        with pytest.raises(FileNotFoundError):
            store.path(saved.id, wrong)


@pytest.mark.parametrize("name", ["../x.png", "/abs.png", "a/b.png", ".hidden", "", "x" * 200])
def test_unsafe_names_are_refused_on_save(tmp_path, name):
    with pytest.raises(ValueError):
        FileStore(tmp_path).save(b"x", name)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_writes_leave_nothing_visible(tmp_path):
    leftover = tmp_path / ".tmp-abc"
    leftover.mkdir()
    (leftover / "half.png").write_bytes(b"partial")
    store = FileStore(tmp_path)  # a restart cleans up after a crash mid-write
    assert store.list() == [] and not leftover.exists()


def test_new_ids_are_time_ordered_and_carry_their_creation_time(tmp_path):
    store = FileStore(tmp_path)
    saved = store.save_batch([(b"1", "a.png"), (b"2", "b.png")]) + [store.save(b"3", "c.png")]
    assert [f.id for f in saved] == sorted(f.id for f in saved)  # creation order, also within a batch
    assert [f.id for f in store.list()] == [f.id for f in saved]
    assert all(abs(f.created_at - time.time()) < 5 for f in saved)
    assert [f.to_dict() for f in FileStore(tmp_path).list()] == [f.to_dict() for f in saved]  # after a restart


def test_retention_options():
    assert max_age("90s") == 90 and max_age("30m") == 1800 and max_age("12h") == max_age("12") == 43200
    assert max_age("7d") == 7 * 86400 and max_age("1.5h") == 5400
    assert max_gb("10") == 10 * 2**30 and max_gb("0.5") == 2**29
    for bad in ("0", "-1h", "1w", "", "h", "nan"):
        with pytest.raises(ValueError):
            max_age(bad)
    for bad in ("0", "-2", "x", "", "nan", "1e-12"):
        with pytest.raises(ValueError):
            max_gb(bad)
    with pytest.raises(ValueError):
        FileStore("/nonexistent-never-created", max_bytes=0)
