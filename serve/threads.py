"""Threads for work beside the step loop that leave no OpenMP workers behind.

torch's CPU ops and the LoRA kernels run OpenMP parallel regions. Each thread that starts one
keeps its own pool of OpenMP worker threads for as long as it lives, and once the pools hold more
threads than there are CPUs, libgomp stops letting idle workers spin: every parallel region of
the step loop then starts by waking a sleeping worker: about 45 us instead of 15 us on a 2-core
VM, for each of a decode step's 120 LoRA calls and its parallel torch ops. Measured on a 2-core
CPU, pools left behind by other threads doubled the decode cost of 8 adapters (+22 ms against
+10 ms per step).
So the base is loaded, and adapters and models are read, on threads that exit when done: a
thread's pool goes with it, and the step loop's workers keep spinning between regions.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


def _load_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch has loaded (wheels may name it with a hash), or None."""
    torch_dir = str(Path(torch.__file__).parent.parent)
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(p for p in paths if p.startswith(torch_dir)) or sorted(paths):
        try:
            return ctypes.CDLL(path)  # already loaded: this only looks its symbols up
        except OSError:
            continue
    return None


_OPENMP = _load_openmp()


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """torch's CPU ops on the calling thread run on it alone inside this block.

    For heavy work beside the step loop (a DoRA adapter's scales read the base's weights once):
    a second team of OpenMP workers competes with the step loop's for the same cores, and on a
    2-core CPU that made the work itself 2 to 3 times slower than on one thread (about 100 against
    200 to 300 ms). OpenMP's thread count is set per thread, unlike ``torch.set_num_threads``,
    which also changes the count every thread started later begins with. Without GNU OpenMP this
    does nothing."""
    if _OPENMP is None:
        yield
        return
    torch.get_num_threads()  # torch sets this thread's count on first use: let it do so first
    before = _OPENMP.omp_get_max_threads()
    _OPENMP.omp_set_num_threads(1)
    try:
        yield
    finally:
        _OPENMP.omp_set_num_threads(before)


def run_in_fresh_thread(fn: Callable[[], T], name: str = "hotswap-setup") -> T:
    """``fn()`` on a new thread that exits afterwards; its result or exception is passed on."""
    future: Future = Future()

    def body() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller, raised there
            future.set_exception(exc)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    return future.result()


class FreshThreads:
    """``ThreadPoolExecutor``'s ``submit``/``shutdown`` with threads that exit once the queue is empty."""

    def __init__(self, max_workers: int, name: str) -> None:
        assert max_workers > 0
        self._max, self._name = max_workers, name
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future, Callable[[], object]]] = deque()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def submit(self, fn: Callable[..., object], *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            self._queue.append((future, lambda: fn(*args)))
            if len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._threads.add(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._threads.discard(threading.current_thread())
                    return
                future, task = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(task())
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
