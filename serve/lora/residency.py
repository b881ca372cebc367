"""The one owner of where adapters live: registry (disk) -> host LRU cache -> device rows.

Everything is keyed by version digest, never by name. Cold loads (registry open + digest check +
safetensors read + layout) run on background threads, so running requests keep decoding; moving an
adapter from the host cache into device rows is a copy done by the engine thread between steps.
A pinned adapter (a running request, or a manual pin) is never evicted; eviction is LRU among the
unpinned ones, in each tier by its own byte capacity.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..threads import FreshThreads
from .pool import LoraPool
from .weights import HostAdapter


@dataclass(slots=True, eq=False)
class Entry:
    ref: str
    digest: str
    host: HostAdapter | None = None
    slot: int | None = None
    pins: int = 0  # running requests
    manual: bool = False  # pinned by the operator
    last_used: float = field(default_factory=time.time)
    loading: Future | None = None
    load_seconds: float = 0.0  # disk -> host time of the last load
    error: Exception | None = None


@dataclass(slots=True, frozen=True)
class EntryView:
    """A consistent copy of one entry for callers outside the engine thread."""

    ref: str
    digest: str
    tier: str  # "device" | "host" | "loading"
    pins: int
    manual: bool
    device_bytes: int
    host_bytes: int
    rank: int | None
    modules: tuple[str, ...]
    last_used: float


class Residency:
    """``load(ref, digest) -> HostAdapter`` runs on a worker thread and raises on refusal."""

    def __init__(self, load: Callable[[str, str], HostAdapter], pool: LoraPool, host_capacity_bytes: int,
                 workers: int = 1, on_event: Callable[[str, str, float], None] | None = None) -> None:
        self._load = load
        self.pool = pool
        self.host_capacity_bytes = host_capacity_bytes
        self._executor = FreshThreads(workers, "hotswap-adapter-load")  # see serve/threads.py
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._host_lru: OrderedDict[str, None] = OrderedDict()  # digests with host copies, oldest first
        self._on_event = on_event or (lambda kind, key, value: None)  # ("hit"/"evict"/"load", tier, seconds)
        self.wake: Callable[[], None] = lambda: None  # set by the engine: a load finished

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- any thread -------------------------------------------------------------------
    def request(self, ref: str, digest: str) -> None:
        """A request for this adapter arrived: count the tier it is found in, start a cold load."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or (entry.error is not None and entry.pins == 0):  # a new request tries again:
                entry = self._entries[digest] = Entry(ref=ref, digest=digest)  # the refusal may have passed
            tier = "device" if entry.slot is not None else "host" if entry.host is not None else "disk"
            self._on_event("hit", tier, 0.0)
            entry.last_used = time.time()
            if entry.host is not None:
                self._host_lru.move_to_end(digest)
            self._start_load(entry)

    def _start_load(self, entry: Entry) -> None:  # under the lock
        if entry.host is None and entry.slot is None and entry.loading is None and entry.error is None:
            entry.loading = self._executor.submit(self._run_load, entry)

    def _run_load(self, entry: Entry) -> None:
        start = time.perf_counter()
        try:
            host = self._load(entry.ref, entry.digest)
        except Exception as exc:  # the refusal reason travels to the waiting requests
            with self._lock:
                entry.error, entry.loading = exc, None
        else:
            with self._lock:
                if self._entries.get(entry.digest) is not entry:  # unloaded while it loaded: keep nothing
                    self.wake()
                    return
                entry.host, entry.loading = host, None
                entry.load_seconds = time.perf_counter() - start
                self._host_lru[entry.digest] = None
                self._trim_host()
        self.wake()

    def _trim_host(self) -> None:  # under the lock; the newest copy always stays
        # A copy evicted before its adapter reached a slot is simply loaded again by ``acquire``.
        used = sum(self._entries[d].host.nbytes for d in self._host_lru)
        for digest in list(self._host_lru):
            if used <= self.host_capacity_bytes or len(self._host_lru) == 1:
                break
            entry = self._entries[digest]
            used -= entry.host.nbytes
            entry.host = None
            del self._host_lru[digest]
            self._on_event("evict", "host", 0.0)

    def error(self, digest: str) -> Exception | None:
        with self._lock:
            entry = self._entries.get(digest)
            return entry.error if entry else None

    # --- engine thread ----------------------------------------------------------------
    def acquire(self, digest: str, ref: str) -> int | None:
        """Pin the adapter in a device slot and return the slot; None if it cannot be placed yet.

        Raises the load error when the adapter was refused. An adapter unloaded while a request for
        it waited (``evict`` spares only pinned ones) is loaded again.
        """
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                entry = self._entries[digest] = Entry(ref=ref, digest=digest)
            if entry.error is not None:
                raise entry.error
            if entry.slot is None:
                if entry.host is None:
                    self._start_load(entry)
                    return None
                if not self._make_room(entry.host):
                    return None
                start = time.perf_counter()
                entry.slot = self.pool.activate(entry.host)
                self._on_event("load", "device", entry.load_seconds + time.perf_counter() - start)
                entry.load_seconds = 0.0
            entry.pins += 1
            entry.last_used = time.time()
            return entry.slot

    def _make_room(self, host: HostAdapter) -> bool:  # under the lock
        if self.pool.fits_now(host):
            return True
        victims = sorted((e for e in self._entries.values() if e.slot is not None and e.pins == 0 and not e.manual),
                         key=lambda e: e.last_used)
        for victim in victims:
            self.pool.release(victim.slot)
            victim.slot = None
            self._on_event("evict", "device", 0.0)
            if self.pool.fits_now(host):
                return True
        return False

    def release(self, digest: str) -> None:
        with self._lock:
            entry = self._entries[digest]
            entry.pins -= 1
            entry.last_used = time.time()

    def set_manual(self, digest: str, pinned: bool, ref: str) -> None:
        """Pin by hand (never evicted until unpinned); an adapter unloaded meanwhile is loaded again."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None and pinned:
                entry = self._entries[digest] = Entry(ref=ref, digest=digest)
                self._start_load(entry)
            if entry is not None:
                entry.manual = pinned

    def waits_for_rows(self, digest: str) -> bool:
        """Whether the adapter is on the host but not on the device (``acquire`` found no room), as
        opposed to still loading from disk."""
        with self._lock:
            entry = self._entries.get(digest)
            return entry is not None and entry.host is not None and entry.slot is None

    def pinned_out(self, digest: str) -> str | None:
        """Why the adapter cannot reach device rows while the manual pins stand, or None when it can
        once running requests end (their pins go by themselves; an operator's stay until unpinned)."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or entry.host is None or entry.slot is not None:
                return None
            pinned = [e for e in self._entries.values() if e.manual and e.slot is not None]
            if not pinned:  # the common case, asked each step a request waits for rows
                return None
            held: dict[str, int] = {}
            for e in pinned:
                for module, rows in self.pool.slot(e.slot).rows.items():
                    held[module] = held.get(module, 0) + len(rows)
            short = [m for m, r in entry.host.ranks.items() if r > self.pool.rows_of(m) - held.get(m, 0)]
            if not short:
                return None
            names = ", ".join(sorted(e.ref for e in pinned))
            return (f"{entry.ref} needs rows of {', '.join(short)} that manually pinned adapters hold ({names}): "
                    "unpin one, or start the server with more --lora-capacity-mib")

    def evict(self, digest: str) -> bool:
        """Drop an adapter from device and host unless it is pinned."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return True
            if entry.pins or entry.manual:
                return False
            if entry.slot is not None:
                self.pool.release(entry.slot)
                self._on_event("evict", "device", 0.0)
            if entry.loading is not None:
                entry.loading.cancel()
            self._host_lru.pop(digest, None)
            del self._entries[digest]
            return True

    def views(self) -> list[EntryView]:
        with self._lock:
            out = []
            for e in self._entries.values():
                if e.slot is None and e.host is None and e.loading is None:
                    continue
                slot = self.pool.slot(e.slot) if e.slot is not None else None
                host = e.host
                out.append(EntryView(
                    ref=e.ref, digest=e.digest,
                    tier="device" if slot else "host" if host else "loading",
                    pins=e.pins + int(e.manual), manual=e.manual,
                    device_bytes=slot.nbytes if slot else 0, host_bytes=host.nbytes if host else 0,
                    rank=slot.rank if slot else host.rank if host else None,
                    modules=tuple(slot.rows) if slot else tuple(host.ranks) if host else (),
                    last_used=e.last_used))
            return out

    def host_bytes(self) -> int:
        with self._lock:
            return sum(self._entries[d].host.nbytes for d in self._host_lru)
