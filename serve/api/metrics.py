"""Prometheus metrics: per-adapter request figures kept here, engine-wide figures read from the engine.

The text exposition format (version 0.0.4) is a few lines of string formatting, so it is written here
rather than adding `prometheus_client` as a dependency. Per-request figures are recorded by the HTTP
layer, which knows which adapter served each request; residency, cache and queue figures come from
`Engine.stats()` and `Engine.residency()` at scrape time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ..engine import AdapterResidency, EngineStats, Histogram
from ..lora.compose import is_composite

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_MODEL = "none"  # label of errors that happened before `model` was resolved
# label of every per-request combination of adapters ("a*0.7+b*0.3"): callers choose their weights
# freely, so one series each would grow without bound
COMBINATION = "combination"
MODEL_SCOPE_KEY = "hotswap_model"  # where a request keeps its resolved ref, for the error metrics

Labels = dict[str, str]


@dataclass(slots=True)
class ModelFigures:
    """What one served version (the base, an adapter, a full model) has done since start."""

    requests: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (endpoint, finish)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # status code -> count
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    tpot: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)


class ApiMetrics:
    """Per-model figures; touched only from the event loop, so no lock."""

    def __init__(self) -> None:
        self.by_model: dict[str, ModelFigures] = defaultdict(ModelFigures)

    def finished(self, model: str, endpoint: str, finish: str, prompt_tokens: int, generated: int,
                 ttft: float | None, duration: float) -> None:
        figures = self.by_model[_label(model)]
        figures.requests[(endpoint, finish)] += 1
        figures.prompt_tokens += prompt_tokens
        figures.generated_tokens += generated
        figures.e2e.observe(duration)
        if ttft is not None:
            figures.ttft.observe(ttft)
            if generated > 1:
                figures.tpot.observe((duration - ttft) / (generated - 1))

    def abandoned(self, model: str, prompt_tokens: int, generated: int) -> None:
        """A request cancelled before it finished (its error, a 499 say, is counted by `failed`): the
        tokens the engine processed for it still count."""
        figures = self.by_model[_label(model)]
        figures.prompt_tokens += prompt_tokens
        figures.generated_tokens += generated

    def failed(self, model: str | None, status: int) -> None:
        self.by_model[_label(model) if model else NO_MODEL].errors[str(status)] += 1


def _label(model: str) -> str:
    return COMBINATION if is_composite(model) else model


def render(api: ApiMetrics, stats: EngineStats, residency: list[AdapterResidency], ready: bool) -> str:
    """The whole scrape, in Prometheus text format."""
    out: list[str] = []
    models = sorted(api.by_model.items())
    _family(out, "hotswap_requests_total", "counter", "Finished requests by model, endpoint and finish reason.",
            [({"model": m, "endpoint": e, "finish_reason": f}, n) for m, fig in models for (e, f), n in sorted(fig.requests.items())])
    _family(out, "hotswap_request_errors_total", "counter", "Requests answered with an error, by model and HTTP status.",
            [({"model": m, "status": s}, n) for m, fig in models for s, n in sorted(fig.errors.items())])
    _family(out, "hotswap_prompt_tokens_total", "counter", "Prompt tokens processed, by model.",
            [({"model": m}, fig.prompt_tokens) for m, fig in models])
    _family(out, "hotswap_generation_tokens_total", "counter", "Tokens generated, by model.",
            [({"model": m}, fig.generated_tokens) for m, fig in models])
    _histograms(out, "hotswap_time_to_first_token_seconds", "Request arrival to first token, by model.",
                [({"model": m}, fig.ttft) for m, fig in models])
    _histograms(out, "hotswap_time_per_output_token_seconds", "Mean time per output token after the first, by model.",
                [({"model": m}, fig.tpot) for m, fig in models])
    _histograms(out, "hotswap_e2e_request_latency_seconds", "Request arrival to last token, by model.",
                [({"model": m}, fig.e2e) for m, fig in models])

    _family(out, "hotswap_adapter_resident", "gauge", "1 for each adapter or full model held off disk, by tier.",
            [({"model": r.ref, "kind": r.kind, "tier": r.tier}, 1) for r in residency])
    _family(out, "hotswap_adapter_pins", "gauge", "Running requests plus manual pins holding each resident entry.",
            [({"model": r.ref, "pinned": str(r.manually_pinned).lower()}, r.pins) for r in residency])
    hits = stats.adapter_hits
    _family(out, "hotswap_adapter_cache_hits_total", "counter",
            "Adapter lookups found in a tier (device: already in a slot; host: in the host cache).",
            [({"tier": "device"}, hits.get("device", 0)), ({"tier": "host"}, hits.get("host", 0))])
    _family(out, "hotswap_adapter_cache_misses_total", "counter",
            "Adapter lookups not found in a tier (device misses went to host or disk; host misses to disk).",
            [({"tier": "device"}, hits.get("host", 0) + hits.get("disk", 0)), ({"tier": "host"}, hits.get("disk", 0))])
    _family(out, "hotswap_adapter_evictions_total", "counter", "Adapters evicted, by tier.",
            [({"tier": t}, n) for t, n in sorted(stats.adapter_evictions.items())])
    _histograms(out, "hotswap_adapter_load_seconds", "Time to bring an adapter from the registry or host to a slot.",
                [({}, stats.adapter_load)])
    _family(out, "hotswap_lora_slots_in_use", "gauge", "Adapters in device slots.", [({}, stats.adapters_on_device)])
    _family(out, "hotswap_lora_bytes", "gauge", "Device bytes of adapter slots.",
            [({"state": "used"}, stats.lora_bytes_used), ({"state": "capacity"}, stats.lora_bytes_capacity)])
    _family(out, "hotswap_host_cache_bytes", "gauge", "Bytes of the host adapter cache.",
            [({"state": "used"}, stats.host_cache_bytes_used), ({"state": "capacity"}, stats.host_cache_bytes_capacity)])
    _family(out, "hotswap_models_loaded", "gauge", "Full fine-tuned models in memory.", [({}, stats.models_loaded)])
    _family(out, "hotswap_queue_depth", "gauge", "Requests waiting to be scheduled.", [({}, stats.waiting)])
    _family(out, "hotswap_requests_running", "gauge", "Requests decoding now.", [({}, stats.running)])
    _family(out, "hotswap_kv_blocks", "gauge", "KV cache blocks of the base and full models (cached: kept for "
            "prefix reuse, in use or evictable).", [({"state": "used"}, stats.kv_blocks_used),
                                                    ({"state": "total"}, stats.kv_blocks_total),
                                                    ({"state": "cached"}, stats.kv_blocks_cached)])
    _family(out, "hotswap_prefix_cache_queries_total", "counter", "Prompt tokens of started requests.",
            [({}, stats.prefix_cache_queries)])
    _family(out, "hotswap_prefix_cache_hits_total", "counter",
            "Prompt tokens whose KV came from the prefix cache instead of being computed.",
            [({}, stats.prefix_cache_hits)])
    _family(out, "hotswap_engine_steps_total", "counter", "Forward steps run.", [({}, stats.steps)])
    _family(out, "hotswap_engine_preemptions_total", "counter", "Running requests put back to wait for KV room "
            "(their KV is computed again when they resume).", [({}, stats.preemptions)])
    _family(out, "hotswap_engine_requests_rejected_total", "counter", "Requests the engine refused, by error.",
            [({"error": k}, n) for k, n in sorted(stats.requests_rejected.items())])
    _histograms(out, "hotswap_engine_queue_wait_seconds", "Submit to first scheduled.", [({}, stats.queue_wait)])
    _histograms(out, "hotswap_engine_step_seconds", "One forward step.", [({}, stats.step_time)])
    _family(out, "hotswap_ready", "gauge", "1 once the base is loaded.", [({}, int(ready))])
    return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_text: str, samples: list[tuple[Labels, float]]) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    out += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]


def _histograms(out: list[str], name: str, help_text: str, series: list[tuple[Labels, Histogram]]) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for labels, hist in series:
        running = 0
        for bound, n in zip((*hist.buckets, math.inf), hist.counts):
            running += n  # the engine's Histogram counts per bucket; Prometheus wants cumulative counts
            out.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {running}")
        out.append(f"{name}_sum{_labels(labels)} {_number(hist.total)}")
        out.append(f"{name}_count{_labels(labels)} {hist.count}")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
