"""The engine's residency commands (list, load, pin, unpin, unload), answered on the step thread.

A mixin of ``Engine``: it uses the engine's ``resolver``, ``config`` and ``_require_ready`` (the running core).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from .errors import EngineError, PinnedOut


@dataclass(slots=True, frozen=True)
class AdapterResidency:
    """Where one adapter (or full model) version is held right now. Entries only on disk are not listed."""

    ref: str  # "name@version"
    digest: str
    kind: Literal["adapter", "model"]
    tier: Literal["device", "host", "loading"]
    pins: int  # running requests + manual pins
    manually_pinned: bool
    size_bytes: int  # device bytes it occupies (rows for an adapter; weights + KV for a model)
    rank: int | None
    target_modules: tuple[str, ...]
    last_used: float  # time.time() of the last request that used it


class ResidencyCommands:
    """What is held where, and the operator's load/pin/unpin/unload; commands run on the step thread."""

    def residency(self) -> list[AdapterResidency]:
        core = self._require_ready()
        out = [AdapterResidency(ref=v.ref, digest=v.digest, kind="adapter", tier=v.tier, pins=v.pins,
                                manually_pinned=v.manual, size_bytes=v.device_bytes or v.host_bytes, rank=v.rank,
                                target_modules=v.modules, last_used=v.last_used)
               for v in core.residency.views()]
        for e in core.models.entries():
            busy = e.worker is not None and e.worker.scheduler.has_work
            out.append(AdapterResidency(ref=e.ref, digest=e.digest, kind="model",
                                        tier="device" if e.worker else "loading", pins=int(busy) + int(e.manual),
                                        manually_pinned=e.manual,
                                        size_bytes=e.worker.nbytes if e.worker else e.estimate_bytes,
                                        rank=None, target_modules=(), last_used=e.last_used))
        return out

    def _residency_of(self, digest: str) -> AdapterResidency:
        return next(r for r in self.residency() if r.digest == digest)

    def load_future(self, ref: str, pin: bool = False) -> Future:
        """Bring an adapter to a device slot (or a full model into memory); the future gives its residency.
        ``pin``: also pin it by hand in the same step-thread turn that finds it resident, so no other
        load can evict it in between."""
        core, future = self._require_ready(), Future()
        target = self.resolver.resolve(ref)
        if target.kind == "base":
            raise EngineError(f"{ref} is the base; it is always loaded")
        if target.kind == "adapter":
            core.residency.request(target.ref, target.digest)

            def task():
                if core.residency.acquire(target.digest, target.ref) is None:
                    reason = core.residency.pinned_out(target.digest)
                    if reason is not None:
                        raise PinnedOut(reason)
                    return None
                if pin:
                    core.residency.set_manual(target.digest, True, target.ref)
                core.residency.release(target.digest)
                return self._residency_of(target.digest)
        else:
            info = self.resolver.model_info(target, self.config)
            core.models.check_fits(target.ref, info.estimate_bytes)
            core.models.request(target.ref, target.digest, info.estimate_bytes)

            def task():
                worker = core.models.get(target.digest, lambda w: w.scheduler.has_work)
                if worker is None:
                    return None
                if pin:
                    core.models.set_manual(target.digest, True)
                return self._residency_of(target.digest)
        core.post(lambda: core.when(task, future), future)
        return future

    async def load(self, ref: str) -> AdapterResidency:
        return await asyncio.wrap_future(self.load_future(ref))

    async def pin(self, ref: str) -> AdapterResidency:
        """Load and keep resident until ``unpin`` (never evicted meanwhile)."""
        return await asyncio.wrap_future(self.load_future(ref, pin=True))

    def unpin(self, ref: str) -> None:
        core = self._require_ready()
        target = self.resolver.resolve(ref)
        if target.kind == "adapter":
            core.post(lambda: core.residency.set_manual(target.digest, False, target.ref))
        else:
            core.post(lambda: core.models.set_manual(target.digest, False))

    async def unload(self, ref: str) -> bool:
        """Drop an adapter/model from device and host caches; False when it is pinned or in use (a
        request for it running, or waiting to start)."""
        core, future = self._require_ready(), Future()
        target = self.resolver.resolve(ref)
        if target.kind not in ("adapter", "model"):
            return False

        def command() -> None:
            if any(seq.target.digest == target.digest for seq in core.seqs.values()):
                future.set_result(False)
            elif target.kind == "adapter":
                future.set_result(core.residency.evict(target.digest))
            else:
                future.set_result(core.models.evict(target.digest, lambda w: w.scheduler.has_work))
        core.post(command, future)
        return await asyncio.wrap_future(future)
