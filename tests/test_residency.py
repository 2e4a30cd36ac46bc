"""What stays in memory: eviction by measured size (least recently used first), refusals with the sizes,
Ollama's keep_alive (durations, 0, -1), unloads deferred while a job uses the model. A fake clock and fake
loads: the rules, without models."""

from __future__ import annotations

import math

import pytest

from mlx_sd_server.cli import build_parser
from mlx_sd_server.job import JobError
from mlx_sd_server.job.fields import as_keep_alive
from mlx_sd_server.residency import MODEL, ModelTooLargeError, Residency

GB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def residency(budget: int = 10 * GB, keep_alive: float = 300.0) -> tuple[Residency, Clock, list[str]]:
    clock = Clock()
    return Residency(budget, keep_alive, clock=clock), clock, []


def loader(name: str, size: int, loads: list[str]):
    def load():
        loads.append(name)
        return f"pipeline {name}", size

    return load


def use(r: Residency, name: str, size: int, loads: list[str], keep_alive: float | None = None) -> str:
    value = r.acquire((MODEL, name), loader(name, size, loads))
    r.release((MODEL, name), keep_alive)
    return value


def names(r: Residency) -> list[str]:
    return [resident.key[1] for resident in r.loaded()]


def test_loading_evicts_the_least_recently_used_until_the_new_model_fits(caplog):
    caplog.set_level("INFO", logger="mlx_sd_server.models")
    r, _, loads = residency(budget=10 * GB)
    use(r, "a", 4 * GB, loads)
    use(r, "b", 4 * GB, loads)
    use(r, "a", 4 * GB, loads)  # a is now the most recently used: b goes first
    use(r, "c", 4 * GB, loads)
    assert names(r) == ["a", "c"] and loads == ["a", "b", "c"]
    assert "unloaded model b (4.00 GB freed): to make room for c (4.00 GB)" in caplog.text
    use(r, "d", 9 * GB, loads)  # needs both gone
    assert names(r) == ["d"] and r.used_bytes() == 9 * GB


def test_a_model_larger_than_the_budget_is_refused_with_the_sizes_and_nothing_is_unloaded():
    r, _, loads = residency(budget=10 * GB)
    use(r, "a", 4 * GB, loads)
    with pytest.raises(ModelTooLargeError, match=r"big needs 12\.00 GB .* budget of 10\.00 GB") as error:
        use(r, "big", 12 * GB, loads)
    assert (error.value.needed, error.value.budget) == (12 * GB, 10 * GB)
    assert names(r) == ["a"]


def test_models_in_use_are_never_evicted():
    r, _, loads = residency(budget=10 * GB)
    r.acquire((MODEL, "busy"), loader("busy", 6 * GB, loads))  # a job is running on it
    with pytest.raises(ModelTooLargeError, match="busy .* cannot be unloaded now"):
        r.acquire((MODEL, "other"), loader("other", 6 * GB, loads))
    assert names(r) == ["busy"]


def test_keep_alive_counts_from_the_end_of_the_last_job():
    r, clock, loads = residency(keep_alive=300)
    r.acquire((MODEL, "a"), loader("a", GB, loads))
    clock.now += 1000  # a long job: no keep-alive runs while it is in use
    r.expire()
    assert names(r) == ["a"] and r.next_expiry() is None
    r.release((MODEL, "a"))
    assert r.get((MODEL, "a")).expires_at == clock.now + 300
    clock.now += 299
    r.expire()
    assert names(r) == ["a"] and r.next_expiry() == pytest.approx(1)
    clock.now += 1
    r.expire()
    assert names(r) == []


def test_a_jobs_keep_alive_overrides_the_default_zero_unloads_and_minus_one_keeps():
    r, clock, loads = residency(keep_alive=300)
    use(r, "once", GB, loads, keep_alive=0)
    assert names(r) == []
    use(r, "kept", GB, loads, keep_alive=math.inf)
    clock.now += 10**9
    r.expire()
    assert names(r) == ["kept"] and r.get((MODEL, "kept")).expires_at is None
    use(r, "kept", GB, loads, keep_alive=60)  # the next job's keep_alive replaces it
    clock.now += 61
    r.expire()
    assert names(r) == []


def test_unloading_a_model_in_use_waits_for_its_job():
    r, _, loads = residency()
    r.acquire((MODEL, "a"), loader("a", GB, loads))
    assert r.unload((MODEL, "a"), "asked") is True and names(r) == ["a"]
    r.release((MODEL, "a"))
    assert names(r) == [] and r.unload((MODEL, "a"), "asked") is False


def test_removed_files_unload_the_idle_model():
    r, _, loads = residency()
    use(r, "a", GB, loads)
    use(r, "b", GB, loads)
    r.expire(gone=lambda key: key[1] == "a")
    assert names(r) == ["b"]


@pytest.mark.parametrize(
    "value, seconds",
    [("5m", 300), ("1h", 3600), ("1h30m", 5400), ("90s", 90), ("500ms", 0.5), ("300", 300), (300, 300),
     (2.5, 2.5), (0, 0), ("0", 0), (-1, math.inf), ("-1", math.inf), ("-1m", math.inf), (" 10m ", 600)],
)
def test_keep_alive_reads_as_ollama_reads_it(value, seconds):
    assert as_keep_alive("keep_alive", value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "5x", "", "1h-5m", True, None, [], "nan"])
def test_keep_alive_refuses_what_is_no_duration(value):
    with pytest.raises(JobError) as error:
        as_keep_alive("keep_alive", value)
    assert error.value.param == "keep_alive"


def test_serve_options_check_memory_and_keep_alive():
    parser = build_parser()
    args = parser.parse_args(["serve", "--max-memory", "12.5", "--keep-alive", "1h"])
    assert (args.max_memory, args.keep_alive) == ("12.5", "1h")  # kept as written, for `service install`
    for bad in (["--max-memory", "0"], ["--keep-alive", "soon"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])


class Weights:
    """A loaded value whose going away can be watched (weakref)."""


def test_every_unload_frees_the_weights_before_giving_memory_back(monkeypatch):
    """free_memory (gc, MLX's cache, malloc_trim) can only return what is already freed: on each way out (idle
    expiry, eviction, an asked unload, keep_alive 0) nothing holds the resident when it runs. (A reference left
    in a local made the RSS stay at the model's size after an idle unload that followed a switch.)"""
    import weakref

    import mlx_sd_server.residency as residency_module

    r, clock, _ = residency(budget=10 * GB)
    refs: dict[str, weakref.ref] = {}  # of the residents loaded so far (not of one being loaded)
    still_alive: list[str] = []

    def free_memory() -> None:
        unloaded = [name for name in refs if r.get((MODEL, name)) is None]
        still_alive.extend(name for name in unloaded if refs[name]() is not None)

    monkeypatch.setattr(residency_module, "free_memory", free_memory)

    def load(name: str, size: int, keep_alive: float | None = None) -> None:
        refs[name] = weakref.ref(r.acquire((MODEL, name), lambda: (Weights(), size)))
        r.release((MODEL, name), keep_alive)

    load("expires", 1 * GB, keep_alive=1)
    clock.now += 2
    r.expire()
    load("evicted", 6 * GB)
    load("evicts", 6 * GB)
    r.unload((MODEL, "evicts"), "asked")
    load("kept 0 s", 1 * GB, keep_alive=0)
    assert names(r) == [] and set(refs) == {"expires", "evicted", "evicts", "kept 0 s"}
    assert still_alive == []


def test_a_job_with_keep_alive_zero_leaves_nothing_holding_its_model(tmp_path, monkeypatch):
    """The worker's own reference to the pipeline is gone when a job's release unloads the model (keep_alive 0)."""
    import json
    import weakref

    from api_server import live_server, request, tiny_registry

    import mlx_sd_server.residency as residency_module
    from mlx_sd_server.api import create_app
    from mlx_sd_server.store import FileStore

    registry = tiny_registry(tmp_path / "models")
    acquire = registry.residency.acquire
    refs: list[weakref.ref] = []
    alive_at_free: list[bool] = []

    def watched(key, load, what=""):
        value = acquire(key, load, what)
        refs.append(weakref.ref(value))
        return value

    monkeypatch.setattr(registry.residency, "acquire", watched)
    monkeypatch.setattr(residency_module, "free_memory", lambda: alive_at_free.append(refs[0]() is not None))
    with live_server(create_app(registry, FileStore(tmp_path / "files"))) as url:
        body = json.dumps({"prompt": "a cat", "size": "64x64", "steps": 1, "keep_alive": 0}).encode()
        reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    assert len(refs) == 1 and alive_at_free == [False]
