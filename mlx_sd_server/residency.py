"""What is in memory: models and ControlNets loaded on demand, kept within a memory budget, unloaded when idle.

Each loaded thing is a `Resident` with its measured size (the bytes of its weights at the compute dtype).
Loading one evicts the least recently used idle residents until the budget holds it; one larger than the
whole budget is refused (`ModelTooLargeError`, HTTP 507) before its weights are read. A resident is unloaded
when its keep-alive runs out after its last job (Ollama's `keep_alive`: 0 unloads at once, `math.inf` never),
or when asked. Only the worker thread loads and unloads (MLX work stays on one thread); the table is read
from request threads under the lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mlx_sd_server.models")

MODEL = "model"
CONTROLNET = "controlnet"
Key = tuple[str, str]  # (MODEL or CONTROLNET, name)


class ModelTooLargeError(MemoryError):
    """A model that cannot fit the memory budget even with everything else unloaded (HTTP 507)."""

    def __init__(self, message: str, needed: int, budget: int):
        super().__init__(message)
        self.needed = needed
        self.budget = budget


def gigabytes(size: float) -> str:
    """A size for messages, in GB; a small one (a tiny model, a small --max-memory) in MB or bytes, as "0.00 GB"
    would say nothing."""
    if size >= 2**30 / 10:
        return f"{size / 2**30:.2f} GB"
    return f"{size / 2**20:.2f} MB" if size >= 2**20 / 10 else f"{size:.0f} bytes"


@dataclass
class Resident:
    key: Key
    value: Any  # a pipeline, or a ControlNet's module
    memory_bytes: int
    loaded_at: float  # time.time()
    keep_alive: float  # seconds after its last job; math.inf: until asked or evicted
    users: int = 0  # jobs using it now: never evicted or expired while > 0
    expires_at: float | None = None  # time.time() its keep-alive ends; None while in use or kept
    unload_when_idle: bool = False  # asked to unload while in use


@dataclass
class Residency:
    """The loaded residents, least recently used first, within `budget` bytes."""

    budget: int
    keep_alive: float  # the default, for jobs that do not say
    clock: Callable[[], float] = time.time
    _residents: OrderedDict[Key, Resident] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- reading (any thread) -------------------------------------------------------------------------

    def get(self, key: Key) -> Resident | None:
        with self._lock:
            return self._residents.get(key)

    def loaded(self, kind: str = MODEL) -> list[Resident]:
        with self._lock:
            return [r for r in self._residents.values() if r.key[0] == kind]

    def used_bytes(self) -> int:
        with self._lock:
            return sum(r.memory_bytes for r in self._residents.values())

    def next_expiry(self) -> float | None:
        """Seconds until the next keep-alive ends (0 if one has), None when none is counting down."""
        with self._lock:
            ends = [r.expires_at for r in self._residents.values() if r.expires_at is not None and not r.users]
        return max(min(ends) - self.clock(), 0.0) if ends else None

    # --- loading and unloading (the worker thread) ----------------------------------------------------

    def acquire(self, key: Key, load: Callable[[], tuple[Any, int]], what: str = "") -> Any:
        """The resident's value, loaded (and made room for) if needed, marked in use until `release`.
        `load()` returns (value, its memory in bytes) without reading weights into memory yet (MLX reads them
        lazily), so a refusal or an eviction happens before any memory is taken."""
        with self._lock:
            resident = self._residents.get(key)
            if resident is not None:
                self._residents.move_to_end(key)
                resident.users += 1
                resident.expires_at = None
                return resident.value
        started = time.monotonic()
        value, size = load()
        name = what or key[1]
        if size > self.budget:
            del value
            raise ModelTooLargeError(
                f"{name} needs {gigabytes(size)} of memory, more than the whole budget of {gigabytes(self.budget)} "
                "(--max-memory); use a quantized conversion (--quantize 4 or 8) or raise --max-memory",
                size,
                self.budget,
            )
        self._make_room(size, name)
        with self._lock:
            self._residents[key] = Resident(key, value, size, self.clock(), self.keep_alive, users=1)
        log.info(
            "loaded %s %s (%s; %s of %s in use) in %.2f s",
            key[0],
            key[1],
            gigabytes(size),
            gigabytes(self.used_bytes()),
            gigabytes(self.budget),
            time.monotonic() - started,
        )
        return value

    def _make_room(self, size: int, name: str) -> None:
        while True:
            with self._lock:
                used = sum(r.memory_bytes for r in self._residents.values())
                if used + size <= self.budget:
                    return
                idle = [r.key for r in self._residents.values() if not r.users]  # (keys: see _unload)
                if not idle:
                    busy = ", ".join(f"{r.key[1]} ({gigabytes(r.memory_bytes)})" for r in self._residents.values())
                    raise ModelTooLargeError(
                        f"{name} needs {gigabytes(size)} of memory; the budget is {gigabytes(self.budget)} "
                        f"(--max-memory) and {busy} in use cannot be unloaded now",
                        size,
                        self.budget,
                    )
            self._unload(idle[0], f"to make room for {name} ({gigabytes(size)})")

    def release(self, key: Key, keep_alive: float | None = None) -> None:
        """A job is done with the resident: its keep-alive (the job's, else the default) starts now."""
        with self._lock:
            resident = self._residents.get(key)
            if resident is None:
                return
            resident.users = max(resident.users - 1, 0)
            resident.keep_alive = self.keep_alive if keep_alive is None else keep_alive  # each job sets it (Ollama)
            if resident.users:
                return
            unload_now = resident.unload_when_idle or resident.keep_alive <= 0
            reason = "asked to unload" if resident.unload_when_idle else "keep_alive 0"
            resident.expires_at = None if math.isinf(resident.keep_alive) else self.clock() + resident.keep_alive
            del resident  # (see _unload)
        if unload_now:
            self._unload(key, reason)

    def unload(self, key: Key, reason: str) -> bool:
        """Unload now, or once its running job is done. False: it was not loaded."""
        with self._lock:
            resident = self._residents.get(key)
            if resident is None:
                return False
            if resident.users:
                resident.unload_when_idle = True
                log.info("%s %s unloads when its running job ends (%s)", key[0], key[1], reason)
                return True
            del resident  # (see _unload)
        self._unload(key, reason)
        return True

    def expire(self, gone: Callable[[Key], bool] = lambda key: False) -> None:
        """Unload the idle residents whose keep-alive has ended, and those whose files are `gone`."""
        now = self.clock()
        with self._lock:
            idle = [(r.key, r.expires_at, r.keep_alive) for r in self._residents.values() if not r.users]
        for key, expires_at, keep_alive in idle:  # (not the residents themselves: see _unload)
            if gone(key):
                self._unload(key, "its files were removed")
            elif expires_at is not None and expires_at <= now:
                self._unload(key, f"idle for {keep_alive:g} s (keep_alive)")

    def _unload(self, key: Key, reason: str) -> None:
        """Drop the resident and give its memory back. Callers hold no reference to it (only its key): its
        weights are freed as the last one goes, and free_memory must run after that to return them."""
        with self._lock:
            resident = self._residents.pop(key, None)
        if resident is None:
            return
        size = resident.memory_bytes
        del resident
        free_memory()
        log.info("unloaded %s %s (%s freed): %s", key[0], key[1], gigabytes(size), reason)


def free_memory() -> None:
    """Give freed weights back to the system: Python's cycles collected, MLX's buffer cache emptied, and
    (glibc) the C heap trimmed, so that the process's RSS falls, not only MLX's active memory."""
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except ImportError:  # the torch engine without MLX
        pass
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_libc = _glibc()
