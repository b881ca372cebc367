"""The serving engine's public API (used by the HTTP layer; usable alone).

Everything here is plain Python and torch: no HTTP types. Errors are the typed classes below.
"""

from .config import EngineConfig
from .engine import Engine
from .errors import (
    AdapterNotFound,
    CapacityExceeded,
    EngineError,
    EngineNotReady,
    IncompatibleAdapter,
    InvalidRequest,
    PinnedOut,
    PromptTooLong,
    QueueFull,
)
from .requests import (
    Classification,
    Completion,
    FinishReason,
    GenerationRequest,
    Logprob,
    RequestStream,
    SamplingParams,
    Target,
    TokenEvent,
    TokenLogprobs,
    Tokenized,
    Usage,
)
from .intake import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOPS
from .residency_commands import AdapterResidency
from .stats import EngineStats, Histogram

__all__ = [
    "AdapterNotFound", "AdapterResidency", "CapacityExceeded", "Classification", "Completion", "Engine", "EngineConfig",
    "EngineError", "EngineNotReady", "EngineStats", "FinishReason", "GenerationRequest", "Histogram",
    "IncompatibleAdapter", "InvalidRequest", "Logprob", "MAX_LOGPROBS", "MAX_STOP_CHARS", "MAX_STOPS", "PinnedOut",
    "PromptTooLong", "QueueFull", "RequestStream",
    "SamplingParams", "Target", "TokenEvent", "TokenLogprobs", "Tokenized", "Usage",
]
