"""Work beside the step loop runs on threads that exit when done (see serve/threads.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hotswap.serve import threads as threads_module
from hotswap.serve.threads import FreshThreads, one_cpu_thread, run_in_fresh_thread

from .engine_support import world, start_engine  # noqa: F401  (fixture)


def _alive(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_run_in_fresh_thread_passes_results_and_errors_on():
    caller = threading.current_thread()
    assert run_in_fresh_thread(lambda: threading.current_thread() is not caller)
    with pytest.raises(ValueError, match="bad"):
        run_in_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert _alive("hotswap-setup") == []


def test_one_cpu_thread_limits_only_the_calling_thread_and_restores_it():
    main_count = torch.get_num_threads()

    def body() -> tuple[int, int, int, int]:
        before = torch.get_num_threads()
        with one_cpu_thread():
            inside = torch.get_num_threads()
            started_meanwhile = run_in_fresh_thread(torch.get_num_threads)  # its own count, not ours
            torch.ones(1 << 20).sum()  # torch's ops run under the limit without complaint
        return before, inside, started_meanwhile, torch.get_num_threads()

    before, inside, started_meanwhile, after = run_in_fresh_thread(body)
    assert inside == (1 if threads_module._OPENMP is not None else before)
    assert started_meanwhile == before and after == before
    assert torch.get_num_threads() == main_count


def test_fresh_threads_cap_concurrency_and_exit_when_idle():
    pool = FreshThreads(2, "test-fresh")
    running, peak, lock = [0], [0], threading.Lock()

    def task(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if i == 3:
            raise RuntimeError("task 3 failed")
        return i * i

    futures = [pool.submit(task, i) for i in range(6)]
    assert [f.result() for i, f in enumerate(futures) if i != 3] == [0, 1, 4, 16, 25]
    with pytest.raises(RuntimeError, match="task 3 failed"):
        futures[3].result()
    assert peak[0] == 2
    for _ in range(100):  # the workers leave once the queue is empty
        if not _alive("test-fresh"):
            break
        time.sleep(0.01)
    assert _alive("test-fresh") == []
    assert pool.submit(task, 5).result() == 25  # a later task starts a new thread
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(task, 1)


def test_the_engine_leaves_no_loader_thread_running_after_a_load(world):  # noqa: F811
    engine = start_engine(world.home)
    try:
        assert engine.load_future("sql").result(timeout=30) is not None
        for _ in range(100):
            if not _alive("hotswap-adapter-load"):
                break
            time.sleep(0.01)
        assert _alive("hotswap-adapter-load") == [] and _alive("hotswap-setup") == []
        assert engine.call_on_step_thread(threading.current_thread).name == "hotswap-engine"
    finally:
        engine.stop_sync()
