"""The engine thread: admits and cancels requests, steps every loaded checkpoint, streams tokens out.

Only this thread touches sequences, schedulers, KV blocks and the LoRA pool; other threads post
commands (closures) that it runs between steps, so no step ever sees a half-made change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

from .classify import head_mismatch
from .errors import EngineError, EngineNotReady, InvalidRequest, PinnedOut
from .requests import RequestStream, TokenEvent, TokenLogprobs, Usage
from .sequence import Sequence, Status
from .stats import StatsRecorder
from .worker import Worker

IDLE_WAIT_S = 0.05
log = logging.getLogger(__name__)


class Core:
    def __init__(self, base: Worker, residency, models, recorder: StatsRecorder,
                 unqueue: Callable[[], None]) -> None:
        self.base, self.residency, self.models, self.recorder = base, residency, models, recorder
        self._unqueue = unqueue  # a submitted request left the queue (started or ended)
        self.commands: deque[Callable[[], None]] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.seqs: dict[str, Sequence] = {}
        self.model_waiting: dict[str, list[Sequence]] = {}
        self.pending: list[tuple[Callable[[], bool], Future]] = []  # retried each iteration until True
        self.dead: EngineError | None = None  # set when the loop died: nothing runs commands any more

    def post(self, command: Callable[[], None], future: Future | None = None) -> None:
        """Run ``command`` before the next step; ``future`` (what it settles) gets the error if the loop dies first."""
        if future is not None:
            command.future = future  # type: ignore[attr-defined]
        with self.lock:
            if self.dead is not None:
                raise EngineNotReady(f"the engine is not running ({self.dead})")
            self.commands.append(command)
        self.wake.set()

    def abort(self, error: EngineError) -> None:
        """The loop died (on this thread): end every stream and pending operation with ``error``."""
        with self.lock:
            self.dead = error
            commands, self.commands = self.commands, deque()
        for command in commands:  # requests posted but not admitted yet, operations not begun
            for seq in getattr(command, "seqs", ()):
                seq.stream._push(error)
            future = getattr(command, "future", None)
            if future is not None and not future.done():
                future.set_exception(error)
        for seq in list(self.seqs.values()):
            try:
                self.fail(seq, error)
            except Exception:  # the state may be what broke; the stream must still end
                seq.stream._push(error)
        for _, future in self.pending:
            if not future.done():
                future.set_exception(error)

    # --- loop -----------------------------------------------------------------------
    def run(self, stopping: Callable[[], bool]) -> None:
        while True:
            self.wake.clear()
            with self.lock:
                commands, self.commands = self.commands, deque()
            for command in commands:
                try:
                    command()
                except Exception:  # a bad command must not take the serving loop down
                    log.exception("engine command failed")
            if stopping():
                break
            self.pending = [(task, future) for task, future in self.pending if not task()]
            self._route_model_waiting()
            worked = False
            for worker in [self.base, *self.models.workers()]:
                if worker.scheduler.has_work:
                    worked |= self._step(worker)
            self._gauges()
            if not worked:
                self.wake.wait(IDLE_WAIT_S)
        with self.lock:  # from now on post() refuses; what slipped in before runs once, so nothing waits forever
            self.dead = EngineNotReady("the engine stopped")
            leftover, self.commands = self.commands, deque()
        for command in leftover:
            try:
                command()
            except Exception:
                log.exception("engine command failed")
        for seq in list(self.seqs.values()):
            self.finish(seq, "cancelled")
        for _, future in self.pending:
            if not future.done():
                future.set_exception(EngineNotReady("the engine stopped before this finished"))

    def _step(self, worker: Worker) -> bool:
        failed: list[tuple[Sequence, Exception]] = []
        held = False  # a request waits for device rows: the adapter requests behind it wait too

        def try_start(seq: Sequence) -> bool:
            nonlocal held
            if seq.target.kind != "adapter":
                return True
            if held:  # their pins would keep the rows it waits for taken, as long as they keep coming
                return False
            try:
                slot = self.residency.acquire(seq.target.digest, seq.target.ref)
            except Exception as exc:
                failed.append((seq, exc))
                return False
            if slot is None:
                reason = self.residency.pinned_out(seq.target.digest)
                if reason is not None:  # else waiting would last until an operator unpins
                    failed.append((seq, PinnedOut(reason)))
                elif self.residency.waits_for_rows(seq.target.digest):  # not a load from disk
                    held = True
                return False
            seq.slot, seq.pinned = slot, True
            info = self.residency.pool.slot(slot)
            mismatch = head_mismatch(seq.target.ref, "adapter", seq.classify, info.head is not None)
            if mismatch is not None:  # failed below, which gives the pin back
                failed.append((seq, mismatch))
                return False
            return True

        start = time.perf_counter()
        try:
            plan, sampled = worker.step(try_start, self._preempted)
        except Exception as exc:  # the step's KV writes are in doubt: end its sequences, keep serving
            log.exception("engine step failed")
            worker.blocks.forget_cached()
            failed += [(seq, EngineError(f"the engine step failed: {type(exc).__name__}: {exc}"))
                       for seq in worker.scheduler.running]
            plan, sampled = [], []
        for seq, exc in failed:  # those try_start refused too: one may hold its adapter's pin
            self.fail(seq, exc)
        if not plan:
            return bool(failed)
        now = time.monotonic()
        for seq, _ in plan:
            if seq.first_scheduled is None:
                seq.first_scheduled = now
                self.recorder.observe("queue_wait", now - seq.arrival)
                self.recorder.incr("prefix_cache_queries", n=seq.prompt_len)
                self.recorder.incr("prefix_cache_hits", n=seq.cached_tokens or 0)
                self._unqueue()
        self.recorder.observe("step_time", time.perf_counter() - start)
        self.recorder.incr("steps")
        for seq, token, logprobs in sampled:
            if seq.sampling.max_tokens == 0:  # the prompt alone was asked for: scored or classified, nothing generated
                self.finish(seq, "length", prompt_logprobs=tuple(seq.prompt_logprobs or ()))
            else:
                self._emit(seq, token, logprobs)
        return True

    def _preempted(self, seq: Sequence) -> None:
        self.recorder.incr("preemptions")
        self._unpin(seq)

    def _unpin(self, seq: Sequence) -> None:
        if seq.pinned:
            self.residency.release(seq.target.digest)
            seq.pinned, seq.slot = False, -1

    # --- requests -------------------------------------------------------------------
    def admit(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:  # else cancel() and the engine's stop would reach only one of them
            self.fail(seq, InvalidRequest(f"request_id {seq.request_id!r} is taken by a request that has not "
                                          "ended", param="request_id"))
            return
        self.seqs[seq.request_id] = seq
        if seq.target.kind == "model":
            self.model_waiting.setdefault(seq.target.digest, []).append(seq)
        else:
            seq.eos_ids, seq.owner = self.base.eos_ids, self.base.scheduler
            self.base.scheduler.add(seq)

    def cancel(self, request_id: str, stream: RequestStream | None = None) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None and (stream is None or seq.stream is stream):  # not a duplicate's namesake
            self.finish(seq, "cancelled")

    def _route_model_waiting(self) -> None:
        for digest, seqs in list(self.model_waiting.items()):
            try:
                worker = self.models.get(digest, lambda w: w.scheduler.has_work)
            except Exception as exc:
                if isinstance(exc, KeyError):  # unloaded between this request's submit and its admission
                    exc = EngineError(f"{seqs[0].target.ref} was unloaded before this request started; send it again")
                for seq in list(seqs):
                    self.fail(seq, exc)
                self.model_waiting.pop(digest, None)
                continue
            if worker is not None:
                for seq in seqs:
                    seq.eos_ids, seq.owner = worker.eos_ids, worker.scheduler
                    worker.scheduler.add(seq)
                del self.model_waiting[digest]

    def _emit(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        now = time.monotonic()
        seq.token_ids.append(token)
        if seq.first_token is None:
            seq.first_token = now
            self.recorder.observe("ttft", now - seq.arrival)
        reason = None
        if token in seq.eos_ids and not seq.sampling.ignore_eos:
            delta, reason = seq.detok.flush()[0], "stop"  # text held back as a possible stop string's start
        else:
            delta, hit = seq.detok.add(token)
            if hit:
                reason = "stop"
            elif seq.num_generated >= seq.sampling.max_tokens:
                rest, hit = seq.detok.flush()
                delta, reason = delta + rest, "stop" if hit else "length"
        self.recorder.incr("generated_tokens")
        lps = () if logprobs is None else (logprobs,)
        prompt = ()
        if seq.prompt_logprobs is not None and seq.num_generated == 1:  # the first event carries them
            prompt, seq.prompt_logprobs = tuple(seq.prompt_logprobs), None
        if reason is None:
            seq.stream._push(TokenEvent(seq.request_id, (token,), delta, logprobs=lps, prompt_logprobs=prompt))
        else:
            self.finish(seq, reason, delta, (token,), lps, prompt)

    def _detach(self, seq: Sequence) -> None:
        """Free the sequence's KV blocks and adapter pin now."""
        if seq.owner is not None:
            seq.owner.remove(seq)
        else:
            waiting = self.model_waiting.get(seq.target.digest, [])
            if seq in waiting:
                waiting.remove(seq)
        self._unpin(seq)
        seq.status = Status.FINISHED
        if self.seqs.get(seq.request_id) is seq:  # a refused duplicate leaves the request it names alone
            del self.seqs[seq.request_id]
        if seq.first_scheduled is None:
            self._unqueue()
        self._gauges()  # before the last event: a client reading metrics after its response sees it gone

    def finish(self, seq: Sequence, reason: str, delta: str = "", tokens: tuple[int, ...] = (),
               logprobs: tuple[TokenLogprobs, ...] = (), prompt_logprobs: tuple[TokenLogprobs, ...] = ()) -> None:
        self._detach(seq)
        usage = Usage(seq.prompt_len, seq.num_generated, seq.cached_tokens or 0)
        seq.stream._push(TokenEvent(seq.request_id, tokens, delta, reason, usage, logprobs, prompt_logprobs,
                                    seq.classification))
        now = time.monotonic()
        self.recorder.incr("requests_finished", reason)
        self.recorder.observe("e2e", now - seq.arrival)
        if seq.first_token is not None and seq.num_generated > 1:
            self.recorder.observe("tpot", (now - seq.first_token) / (seq.num_generated - 1))

    def fail(self, seq: Sequence, exc: Exception) -> None:
        self._detach(seq)
        if not isinstance(exc, EngineError):
            exc = EngineError(f"request {seq.request_id} failed: {type(exc).__name__}: {exc}")
        seq.stream._push(exc)
        self.recorder.incr("requests_finished", "error")

    # --- operator commands (answered through futures) ---------------------------------
    def when(self, task: Callable[[], object | None], future: Future) -> None:
        """Retry ``task`` every iteration until it returns a value (or raises) and settle ``future``."""
        def attempt() -> bool:
            if future.cancelled():
                return True
            try:
                value = task()
            except Exception as exc:
                future.set_exception(exc)
                return True
            if value is None:
                return False
            future.set_result(value)
            return True
        if not attempt():
            self.pending.append((attempt, future))

    def _gauges(self) -> None:
        workers = [self.base, *self.models.workers()]
        pool = self.residency.pool
        host = self.residency.host_bytes()

        def update(s) -> None:
            s.running = sum(len(w.scheduler.running) for w in workers)
            s.waiting = sum(len(w.scheduler.waiting) for w in workers) + sum(map(len, self.model_waiting.values()))
            s.kv_blocks_used = sum(w.blocks.num_used for w in workers)
            s.kv_blocks_total = sum(w.blocks.num_blocks for w in workers)
            s.kv_blocks_cached = sum(w.blocks.num_cached for w in workers)
            s.lora_bytes_used = pool.used_bytes
            s.adapters_on_device = pool.num_slots
            s.host_cache_bytes_used = host
            s.models_loaded = len(workers) - 1
        self.recorder.update(update)
