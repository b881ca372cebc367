"""Counters, gauges and histograms the engine keeps for metrics; plain Python, read by snapshot."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Seconds; spans a sub-millisecond decode step on a GPU up to a slow CPU prefill.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class Histogram:
    """Cumulative-style histogram: ``counts[i]`` observations <= ``buckets[i]``, the last one is +Inf."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.total, self.count)


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine's metrics (``Engine.stats()`` returns a copy)."""

    # counters
    requests_submitted: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    requests_rejected: dict[str, int] = field(default_factory=dict)  # error class name -> count
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens of started requests
    prefix_cache_hits: int = 0  # of those, tokens whose KV came from the prefix cache
    steps: int = 0
    preemptions: int = 0  # running sequences put back to wait for KV room (recomputed when they resume)
    adapter_hits: dict[str, int] = field(default_factory=dict)  # tier ("device", "host", "disk") -> count
    adapter_evictions: dict[str, int] = field(default_factory=dict)  # tier -> count
    model_loads: int = 0
    model_evictions: int = 0
    # gauges
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_blocks_cached: int = 0  # registered for prefix reuse (in use or evictable)
    lora_bytes_used: int = 0
    lora_bytes_capacity: int = 0
    host_cache_bytes_used: int = 0
    host_cache_bytes_capacity: int = 0
    adapters_on_device: int = 0
    models_loaded: int = 0
    # histograms (seconds)
    ttft: Histogram = field(default_factory=Histogram)  # submit -> first token
    tpot: Histogram = field(default_factory=Histogram)  # mean time per output token after the first
    e2e: Histogram = field(default_factory=Histogram)  # submit -> finish
    queue_wait: Histogram = field(default_factory=Histogram)  # submit -> first scheduled
    adapter_load: Histogram = field(default_factory=Histogram)  # registry/host -> device slot
    step_time: Histogram = field(default_factory=Histogram)  # one forward step


class StatsRecorder:
    """Thread-safe owner of the live ``EngineStats``; the engine thread writes, callers snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = EngineStats()

    def update(self, fn) -> None:  # fn(stats) mutates under the lock
        with self._lock:
            fn(self._stats)

    def incr(self, counter: str, key: str | None = None, n: int = 1) -> None:
        with self._lock:
            if key is None:
                setattr(self._stats, counter, getattr(self._stats, counter) + n)
            else:
                d = getattr(self._stats, counter)
                d[key] = d.get(key, 0) + n

    def observe(self, hist: str, value: float) -> None:
        with self._lock:
            getattr(self._stats, hist).observe(value)

    def adapter_event(self, kind: str, tier: str, seconds: float) -> None:
        """Residency's report: a hit or an eviction in ``tier``, or a load that took ``seconds``."""
        if kind == "hit":
            self.incr("adapter_hits", tier)
        elif kind == "evict":
            self.incr("adapter_evictions", tier)
        else:
            self.observe("adapter_load", seconds)

    def model_event(self, kind: str) -> None:
        self.incr("model_loads" if kind == "load" else "model_evictions")

    def count_submit(self, prompt_tokens: int) -> None:
        with self._lock:
            self._stats.requests_submitted += 1
            self._stats.prompt_tokens += prompt_tokens

    def snapshot(self) -> EngineStats:
        with self._lock:
            s = self._stats
            out = EngineStats(**{f: getattr(s, f) for f in EngineStats.__dataclass_fields__})
            for f in ("requests_finished", "requests_rejected", "adapter_hits", "adapter_evictions"):
                setattr(out, f, dict(getattr(s, f)))
            for f in ("ttft", "tpot", "e2e", "queue_wait", "adapter_load", "step_time"):
                setattr(out, f, getattr(s, f).copy())
            return out
