"""The public engine: submit requests from any thread or event loop; a background thread steps the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import EngineConfig
from .requests import Completion, GenerationRequest, RequestStream, Target
from .stats import EngineStats


@dataclass(slots=True, frozen=True)
class AdapterResidency:
    """Where one adapter (or full model) version is held right now. Entries only on disk are not listed."""

    ref: str  # "name@version"
    digest: str
    kind: Literal["adapter", "model"]
    tier: Literal["device", "host", "loading"]
    pins: int  # running requests + manual pins
    manually_pinned: bool
    size_bytes: int  # device bytes it occupies (rows for an adapter, weights for a model)
    rank: int | None
    target_modules: tuple[str, ...]
    last_used: float  # time.time() of the last request that used it


class Engine:
    """One frozen base with per-request adapters in shared batches, plus full models on demand.

    Usage::

        engine = Engine(Registry(home), "smollm2", EngineConfig())
        await engine.start()
        stream = engine.submit(GenerationRequest(prompt="hi", model="sql@prod"))
        async for event in stream: ...
        await engine.stop()
    """

    def __init__(self, registry, base_ref: str, config: EngineConfig | None = None) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Load the base and start the step thread (model work runs off the event loop)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Finish nothing more: cancel what runs, stop the threads, free the models."""
        raise NotImplementedError

    def start_sync(self) -> None: ...
    def stop_sync(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def base(self) -> Target: ...

    @property
    def max_model_len(self) -> int: ...

    def resolve(self, model: str | None) -> Target:
        """Resolve a reference through the registry (raises AdapterNotFound / IncompatibleAdapter)."""
        raise NotImplementedError

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate, resolve and queue a request; returns at once. Raises the engine's typed errors."""
        raise NotImplementedError

    async def generate(self, request: GenerationRequest) -> Completion:
        """``submit`` and wait for the whole completion."""
        raise NotImplementedError

    def cancel(self, request_id: str) -> None: ...

    def residency(self) -> list[AdapterResidency]: ...

    async def load(self, ref: str) -> AdapterResidency:
        """Bring an adapter to a device slot (or a full model into memory) ahead of traffic."""
        raise NotImplementedError

    async def unload(self, ref: str) -> bool:
        """Drop an adapter/model from device and host caches unless pinned; False when it is busy."""
        raise NotImplementedError

    async def pin(self, ref: str) -> AdapterResidency:
        """Load and keep resident until ``unpin`` (never evicted meanwhile)."""
        raise NotImplementedError

    def unpin(self, ref: str) -> None: ...

    def stats(self) -> EngineStats: ...
