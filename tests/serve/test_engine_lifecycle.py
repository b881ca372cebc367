"""The engine as a library drives it: start and stop at any moment, exit, consumers that go away,
and work run on the step thread that calls back into the engine. Nothing here may hang: every wait
that a bug could make endless is bounded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from hotswap.hub import Registry
from hotswap.serve.engine import Engine, EngineError, EngineNotReady, GenerationRequest, InvalidRequest, SamplingParams

from .engine_support import BASE, PROMPTS, engine, small_config, start_engine, wait_until, world  # noqa: F401

LONG = SamplingParams(max_tokens=200, ignore_eos=True)
REPO = Path(__file__).resolve().parents[2]


def in_thread(fn, timeout: float = 10.0) -> list:
    """``fn()`` on a daemon thread: [("ok", value)] or [("err", exception)], or [] if it did not end in time."""
    out: list = []

    def body() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(("err", exc))
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    return out


def hold_loop(eng: Engine) -> threading.Event:
    """Keep the step loop inside a command until the returned event is set."""
    release, held = threading.Event(), threading.Event()
    eng._core.post(lambda: (held.set(), release.wait(10)))
    assert held.wait(10)
    return release


def test_a_stop_while_the_base_loads_waits_for_it_and_nothing_runs_afterwards(world):
    eng = Engine(Registry(world.home), BASE, small_config())
    loading, go, build = threading.Event(), threading.Event(), eng._build
    eng._build = lambda: (loading.set(), go.wait(10), build())[-1]
    started: list = []
    starter = threading.Thread(target=lambda: started.extend(in_thread(eng.start_sync, 30)), daemon=True)
    starter.start()
    try:
        assert loading.wait(10)
        with pytest.raises(EngineNotReady, match="its base is loading"):
            eng.submit(GenerationRequest(prompt="hi"))
        stopper = threading.Thread(target=eng.stop_sync, daemon=True)
        stopper.start()
        stopper.join(0.2)
        assert stopper.is_alive()  # a stop returns once nothing runs: after the load
    finally:
        go.set()
    stopper.join(30)
    starter.join(30)
    assert not stopper.is_alive() and started[0][0] == "err"
    assert isinstance(started[0][1], EngineNotReady) and "stopped while its base loaded" in str(started[0][1])
    assert eng._state == "stopped" and not eng.ready and eng._core is None
    assert "hotswap-engine" not in [t.name for t in threading.enumerate()]


def test_a_load_that_fails_after_a_stop_was_asked_leaves_the_engine_stopped(world):
    """The stop came first: the engine is stopped, not ready to start again (and the server's start
    code then sees a shutdown, not a failed start)."""
    eng = Engine(Registry(world.home), BASE, small_config())
    loading, go = threading.Event(), threading.Event()

    def failing_build():
        loading.set()
        go.wait(10)
        raise RuntimeError("broken base")
    eng._build = failing_build
    started: list = []
    starter = threading.Thread(target=lambda: started.extend(in_thread(eng.start_sync, 30)), daemon=True)
    starter.start()
    assert loading.wait(10)
    stopper = threading.Thread(target=eng.stop_sync, daemon=True)
    stopper.start()
    deadline = time.monotonic() + 10
    while not eng._stop_asked and time.monotonic() < deadline:
        time.sleep(0.01)
    go.set()
    starter.join(30)
    stopper.join(30)
    assert started[0][0] == "err" and "broken base" in str(started[0][1])
    assert eng.state == "stopped"


def test_stop_frees_the_base_and_its_kv_cache_while_the_engine_object_lives(world):
    eng = start_engine(world.home)
    stream = eng.submit(GenerationRequest(prompt=PROMPTS[0], model="sql", sampling=SamplingParams(max_tokens=3)))
    stream.result()
    held = [weakref.ref(x) for x in (eng._base.runner, eng._base.kv, eng._base.runner.lora)]
    eng.stop_sync()
    assert [ref() for ref in held] == [None, None, None]  # no gc.collect(): nothing holds them
    stream.cancel()  # no-ops on a stopped engine, not errors
    eng.cancel("nosuch")
    eng.stop_sync()
    with pytest.raises(EngineNotReady, match="stopped; start"):
        eng.start_sync()


def test_a_process_that_exits_without_stop_ends_its_streams_and_exits_cleanly(world):
    """The step thread mid-step at interpreter exit aborted the process in torch's teardown (rc 134)."""
    script = f"""
import atexit
from pathlib import Path
from hotswap.serve.engine import GenerationRequest, SamplingParams
from tests.serve.engine_support import PROMPTS, start_engine
streams = []
atexit.register(lambda: print("ended:", [s.finished for s in streams], flush=True))  # runs after the engine's hook
eng = start_engine(Path({str(world.home)!r}), max_running=8)
streams += [eng.submit(GenerationRequest(prompt=PROMPTS[i], model=m, sampling=SamplingParams(max_tokens=200,
            ignore_eos=True))) for i, m in enumerate([None, "sql", "chat", "mlp"])]
next(iter(streams[0]))
print("exiting", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ended: [True, True, True, True]" in done.stdout


def test_a_consumer_cancelled_while_it_waits_cancels_its_request(engine):
    async def timed_out(read) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(read(engine.submit(GenerationRequest(prompt=PROMPTS[0], sampling=LONG))), 0.1)

    async def iterate(stream) -> None:
        async for _ in stream:
            pass
    for n, read in enumerate([lambda s: s.collect(), iterate], start=1):
        release = hold_loop(engine)  # no step runs: the request cannot finish before the timeout
        asyncio.run(timed_out(read))
        release.set()
        wait_until(lambda: engine.stats().requests_finished.get("cancelled", 0) == n)
    assert engine.stats().running == 0 and engine._base.blocks.num_used == 0


def test_work_on_the_step_thread_may_call_the_engine_but_waiting_on_it_is_refused(world):
    engine = start_engine(world.home)  # not the fixture: a step thread stuck in a call would hang its stop
    try:
        check_calls_on_the_step_thread(engine)
    finally:
        assert in_thread(engine.stop_sync, 30) == [("ok", None)]


def check_calls_on_the_step_thread(engine: Engine) -> None:
    assert in_thread(lambda: engine.call_on_step_thread(lambda: engine.call_on_step_thread(lambda: 5))) == [("ok", 5)]

    def waits():
        return engine.generate_sync([GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=2))])
    [(kind, exc)] = in_thread(lambda: engine.call_on_step_thread(waits))
    assert kind == "err" and isinstance(exc, EngineError) and "would never end" in str(exc)
    [(kind, exc)] = in_thread(lambda: engine.call_on_step_thread(engine.stop_sync))
    assert kind == "err" and isinstance(exc, EngineError) and "would wait for itself" in str(exc)
    [(kind, exc)] = in_thread(lambda: engine.call_on_step_thread(lambda: 1 / 0))
    assert kind == "err" and isinstance(exc, ZeroDivisionError)
    assert engine.ready and engine.generate_sync([GenerationRequest(prompt="hi")])[0].finish_reason
    wait_until(lambda: engine.stats().running == 0)


def test_operations_posted_as_the_loop_dies_end_with_its_error(engine):
    release = hold_loop(engine)
    calls = []
    caller = threading.Thread(target=lambda: calls.extend(in_thread(lambda: engine.call_on_step_thread(lambda: 7))),
                              daemon=True)
    caller.start()
    load = engine.load_future("sql")
    wait_until(lambda: len(engine._core.commands) == 2)  # both wait behind the held command

    def broken() -> None:
        raise RuntimeError("gauges broke")
    engine._core._gauges = broken  # outside the guarded step: kills the loop after the held command
    release.set()
    caller.join(15)
    assert calls and calls[0][0] == "err" and "loop died" in str(calls[0][1])
    with pytest.raises(EngineError, match="loop died"):
        load.result(timeout=10)


def test_classification_refusals_name_the_model_field(engine):
    with pytest.raises(InvalidRequest, match="is a base") as refused:
        engine.submit(GenerationRequest(prompt="hi", classify=True))
    assert refused.value.param == "model"
    with pytest.raises(InvalidRequest, match="no classification head") as refused:
        engine.submit(GenerationRequest(prompt="hi", model="sql", classify=True)).result()
    assert refused.value.param == "model"
