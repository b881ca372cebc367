"""Typed errors of the serving engine.

The HTTP layer maps each class to a status code in one table; the engine never imports HTTP types.
Every message names what was wrong so it can be shown to the caller as is.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose. ``param``: the request field at fault,
    when one is (the HTTP layer reports it as OpenAI's ``param``)."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineNotReady(EngineError):
    """The engine is not started yet, or is shutting down."""


class InvalidRequest(EngineError):
    """A request field is out of range or inconsistent (max_tokens, temperature, empty prompt, ...)."""


class PromptTooLong(InvalidRequest):
    """The prompt (plus max_tokens) does not fit the model's context or the KV cache."""

    def __init__(self, message: str = "", param: str | None = "prompt") -> None:
        super().__init__(message, param)


class QueueFull(EngineError):
    """Too many requests are waiting; retry later."""


class AdapterNotFound(EngineError):
    """The reference names no adapter, version or alias in the registry."""


class IncompatibleAdapter(EngineError):
    """The adapter cannot be applied exactly to this base (other base, unsupported feature, rank too high).

    The engine refuses such adapters at load with the reason instead of applying part of them.
    """


class CapacityExceeded(EngineError):
    """The adapter or model does not fit the configured device/host/model capacity even when empty."""


class PinnedOut(CapacityExceeded):
    """The adapter would fit, but only in device rows that manually pinned adapters hold: waiting would
    last until an operator unpins, so the request is refused at once instead."""
