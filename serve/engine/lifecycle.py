"""The engine's lifecycle: start (the base loads on a thread of its own), the step thread, stop, exit.

A mixin of ``Engine``: it uses the engine's ``registry``, ``config``, ``_base_ref``, ``_recorder``,
``_lock`` and ``_unqueue``. States: new -> starting -> ready -> stopping -> stopped; starting -> new
when the load fails (start may be tried again), starting -> stopped when a stop came meanwhile (whether
the load failed or not); ready -> failed (the loop died) -> stopped.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import weakref
from concurrent.futures import Future
from typing import Callable, TypeVar

from ..threads import run_in_fresh_thread
from .assemble import assemble
from .core import Core
from .errors import EngineError, EngineNotReady
from .resolve import Resolver

log = logging.getLogger(__name__)
T = TypeVar("T")
ON_STEP_THREAD = "on the engine's step thread (inside call_on_step_thread)"


class Lifecycle:
    """Start, stop and the step thread of an engine; see the module's docstring."""

    def _init_lifecycle(self) -> None:
        self._lifecycle_lock = threading.Lock()  # one start or stop at a time: a stop waits for a start's load
        self._thread: threading.Thread | None = None
        self._state = "new"
        self._stop_asked = False  # a stop came while the base loaded
        self.failure: str | None = None  # why the engine loop died, when it did
        self._core: Core | None = None  # None once stopped: the base's weights and KV cache go with it
        self._base = None
        self._at_exit: Callable[[], None] | None = None

    async def start(self) -> None:
        """Load the base and start the step thread (model work runs off the event loop)."""
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        """Cancel what runs (streams end with "cancelled"), stop the threads, free the models."""
        await asyncio.to_thread(self.stop_sync)

    def start_sync(self) -> None:
        with self._lifecycle_lock:
            with self._lock:
                if self._state != "new":
                    raise EngineNotReady(f"the engine is {self._state}; start() runs once: create a new Engine "
                                         "to start again")
                self._state = "starting"
            try:
                core = run_in_fresh_thread(self._build)  # no OpenMP workers stay on this thread (serve/threads.py)
            except BaseException:
                # nothing was kept: start() may be tried again, unless a stop came meanwhile
                self._state = "stopped" if self._stop_asked else "new"
                raise
            if self._stop_asked:  # stop() waited for the load: nothing may run after it returns
                self._close(core)
                self._state = "stopped"
                raise EngineNotReady("the engine was stopped while its base loaded")
            self._core, self._base = core, core.base
            self._state = "ready"
            self._thread = threading.Thread(target=self._run_core, args=(core,), name="hotswap-engine", daemon=True)
            self._thread.start()
            # a process that exits with the step thread mid-step aborts in torch's teardown: stop first
            self._at_exit = _stop_at_exit(weakref.ref(self))
            atexit.register(self._at_exit)

    def _build(self) -> Core:
        self.resolver = Resolver(self.registry, self._base_ref, self.config.max_rank)
        return assemble(self.resolver, self.config, self._recorder, self._unqueue)

    def _run_core(self, core: Core) -> None:
        try:
            core.run(lambda: self._state != "ready")
        except BaseException as exc:  # a bug outside the guarded step: fail loudly, never hang streams
            log.exception("the engine loop died")
            self.failure = f"the engine loop died: {type(exc).__name__}: {exc}"
            self._state = "failed"
            core.abort(EngineError(self.failure))

    def stop_sync(self) -> None:
        if threading.current_thread() is self._thread:
            raise EngineError(f"stop() {ON_STEP_THREAD} would wait for itself; stop the engine from another thread")
        with self._lock:
            if self._state == "starting":
                self._stop_asked = True
        with self._lifecycle_lock:  # a second stop (a server's drain, then its lifespan) waits for the first
            if self._state not in ("ready", "failed"):
                return
            core = self._core
            if self._state == "ready":  # a failed loop has ended already
                self._state = "stopping"
                core.wake.set()
            self._thread.join()
            self._close(core)
            self._core = self._base = None
            self._state = "stopped"
            atexit.unregister(self._at_exit)

    @staticmethod
    def _close(core: Core) -> None:
        core.residency.close()
        core.models.close()

    def call_on_step_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the step thread between steps, its result returned: for torch work beside the
        engine in one process (a benchmark's baselines) that must not leave OpenMP workers on
        another thread (see serve/threads.py). Steps wait while it runs, so ``fn`` must not wait for
        the engine: a request's result raises EngineError there, and a load's future never settles."""
        core = self._require_ready()
        if threading.current_thread() is self._thread:  # called from within fn: run it in place
            return fn()
        future: Future = Future()

        def command() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        core.post(command, future)
        return future.result()

    def __enter__(self):
        self.start_sync()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_sync()

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    @property
    def state(self) -> str:
        """new, starting, ready, stopping, stopped or failed (see the module's docstring)."""
        return self._state

    def _require_ready(self) -> Core:
        """The running core, or EngineNotReady saying why there is none."""
        core = self._core  # read first: stop() clears it after leaving "ready"
        if self._state != "ready" or core is None:
            hint = {"new": " (call start())", "starting": " (its base is loading)"}.get(self._state, "")
            if self.failure:
                hint = f" ({self.failure})"
            raise EngineNotReady(f"the engine is {self._state}{hint}")
        return core


def _stop_at_exit(ref: weakref.ref) -> Callable[[], None]:
    """An exit hook that stops the engine, should it still run; it does not keep the engine alive."""
    def stop() -> None:
        engine = ref()
        if engine is not None:
            engine.stop_sync()
    return stop
