"""Full fine-tuned checkpoints served beside the base: loaded on demand within a memory budget.

A model is loaded on a background thread when a request names it; idle models (no running or
waiting sequence, no manual pin) are evicted least recently used first when a new one needs room.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..threads import FreshThreads
from .errors import CapacityExceeded
from .worker import Worker


@dataclass(slots=True, eq=False)
class ModelEntry:
    ref: str
    digest: str
    estimate_bytes: int  # weights + KV, known before loading
    worker: Worker | None = None
    loading: Future | None = None
    error: Exception | None = None
    manual: bool = False
    last_used: float = field(default_factory=time.time)


class ModelPool:
    """``load(ref, digest) -> Worker`` runs on a worker thread."""

    def __init__(self, load: Callable[[str, str], Worker], budget_bytes: int,
                 on_event: Callable[[str], None] | None = None) -> None:
        self._load = load
        self.budget_bytes = budget_bytes
        self._executor = FreshThreads(1, "hotswap-model-load")  # see serve/threads.py
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._on_event = on_event or (lambda kind: None)  # "load" | "evict"
        self.wake: Callable[[], None] = lambda: None

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._entries.clear()

    def check_fits(self, ref: str, estimate_bytes: int) -> None:
        if estimate_bytes > self.budget_bytes:
            raise CapacityExceeded(f"model {ref} needs ~{estimate_bytes >> 20} MiB (weights + KV) but the "
                                   f"model memory budget is {self.budget_bytes >> 20} MiB")

    def request(self, ref: str, digest: str, estimate_bytes: int) -> None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or entry.error is not None:
                entry = self._entries[digest] = ModelEntry(ref, digest, estimate_bytes)
            entry.last_used = time.time()

    def get(self, digest: str, busy: Callable[[Worker], bool]) -> Worker | None:
        """The loaded worker, or None while loading; starts the load when the budget allows
        (evicting idle models). Raises the load error, and KeyError for a model unloaded since its
        request. Engine thread only."""
        with self._lock:
            entry = self._entries[digest]
            if entry.error is not None:
                raise entry.error
            entry.last_used = time.time()
            if entry.worker is not None or entry.loading is not None:
                return entry.worker
            if self._make_room(entry.estimate_bytes, busy):
                entry.loading = self._executor.submit(self._run_load, entry)
            return None

    def _used(self) -> int:
        return sum(e.worker.nbytes if e.worker else e.estimate_bytes
                   for e in self._entries.values() if e.worker is not None or e.loading is not None)

    def _make_room(self, need: int, busy: Callable[[Worker], bool]) -> bool:  # under the lock
        idle = sorted((e for e in self._entries.values() if e.worker is not None and not e.manual and not busy(e.worker)),
                      key=lambda e: e.last_used)
        for victim in idle:
            if self._used() + need <= self.budget_bytes:
                break
            victim.worker = None
            self._on_event("evict")
        return self._used() + need <= self.budget_bytes

    def _run_load(self, entry: ModelEntry) -> None:
        try:
            worker = self._load(entry.ref, entry.digest)
        except Exception as exc:
            with self._lock:
                entry.error, entry.loading = exc, None
        else:
            with self._lock:
                entry.worker, entry.loading = worker, None
            self._on_event("load")
        self.wake()

    def workers(self) -> list[Worker]:
        with self._lock:
            return [e.worker for e in self._entries.values() if e.worker is not None]

    def set_manual(self, digest: str, pinned: bool) -> None:
        """Pin by hand; unpinning a model unloaded meanwhile does nothing. Raises KeyError when
        pinning one that is not loaded."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None and pinned:
                raise KeyError(digest)
            if entry is not None:
                entry.manual = pinned

    def evict(self, digest: str, busy: Callable[[Worker], bool]) -> bool:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return True
            if entry.manual or (entry.worker is not None and busy(entry.worker)) or entry.loading is not None:
                return False
            del self._entries[digest]
            if entry.worker is not None:
                self._on_event("evict")
            return True

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return [e for e in self._entries.values() if e.worker is not None or e.loading is not None]
