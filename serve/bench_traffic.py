"""`hotswap bench --traffic N`: an open-loop, S-LoRA-style workload, base only against many adapters.

The closed batch of serve/bench.py sends every request at once to resident adapters. Here requests
arrive as a Poisson process, each names an adapter drawn from a power-law popularity (S-LoRA's
workload: alpha = 1), prompt and output lengths vary, and there are more adapters than device slots,
so cold loads, host-cache hits and evictions happen while others decode. The same requests (same
arrival times, prompts and lengths) are run once with every request on the bare base and once with
their adapters; rounds alternate the order, and per round the ratio of throughputs is taken, as in
the closed bench. Reported: requests/s and tokens/s over the run, time to first token and
end-to-end latency (median and 90th percentile), and the adapter events of the adapters' runs.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench import BenchSettings, adapter_bytes, make_adapters, prepare_base, token_limit
from .bench_report import describe_machine, rows_note
from .threads import run_in_fresh_thread


@dataclass
class TrafficSettings(BenchSettings):
    requests: int = 48  # requests per run
    rate: float = 4.0  # mean arrivals per second (Poisson)
    zipf: float = 1.0  # popularity exponent: adapter k (from 0) is drawn with weight 1 / (k + 1) ** zipf
    slots: int = 0  # adapters the device pool holds at once; 0: half of ``adapters``

    @property
    def device_slots(self) -> int:
        return self.slots or max(1, self.adapters // 2)


@dataclass(frozen=True)
class TrafficRequest:
    at: float  # seconds after the run starts
    prompt: list[int]
    max_tokens: int
    adapter: int  # index into the adapters; 0 is the most popular


@dataclass
class RunStats:
    seconds: float  # first arrival to last completion
    tokens: int
    ttft: list[float]
    latency: list[float]


@dataclass
class TrafficResult:
    settings: dict
    machine: dict
    req_s: dict[str, float] = field(default_factory=dict)  # medians over rounds
    tok_s: dict[str, float] = field(default_factory=dict)
    ttft_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # (p50, p90), all timed rounds
    latency_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    ratio: float = 0.0  # adapters' throughput / the base's, median over rounds
    ratio_rounds: list[float] = field(default_factory=list)
    adapter_events: dict[str, int] = field(default_factory=dict)  # over the timed adapters' runs
    adapters_used: int = 0


def _lengths(mean: int, n: int, gen: torch.Generator) -> list[int]:
    """Uniform over [mean/2, 3*mean/2]: varied lengths around the requested mean."""
    return torch.randint(max(1, mean // 2), mean + mean // 2 + 1, (n,), generator=gen).tolist()


def make_workload(s: TrafficSettings, vocab_size: int) -> list[TrafficRequest]:
    """The run's requests, the same for a given seed: Poisson arrivals, power-law adapter choice."""
    gen = torch.Generator().manual_seed(0)
    gaps = torch.empty(s.requests, dtype=torch.float64).exponential_(s.rate, generator=gen)
    arrivals = (gaps.cumsum(0) - gaps[0]).tolist()  # the first request at 0
    weights = 1.0 / torch.arange(1, s.adapters + 1, dtype=torch.float64) ** s.zipf
    adapters = torch.multinomial(weights, s.requests, replacement=True, generator=gen).tolist()
    prompts, outputs = _lengths(s.prompt, s.requests, gen), _lengths(s.new_tokens, s.requests, gen)
    return [TrafficRequest(at, torch.randint(5, vocab_size, (p,), generator=gen).tolist(), o, a)
            for at, p, o, a in zip(arrivals, prompts, outputs, adapters)]


async def _drive(engine, workload: list[TrafficRequest], models: list[str | None], salt: str) -> RunStats:
    from hotswap.serve.engine import GenerationRequest, SamplingParams

    start = time.perf_counter()

    async def one(i: int, req: TrafficRequest, model: str | None) -> tuple[float, float, float, int]:
        await asyncio.sleep(max(0.0, start + req.at - time.perf_counter()))
        submitted = time.perf_counter()
        stream = engine.submit(GenerationRequest(  # a salt per request: no prompt is taken from the cache
            prompt_token_ids=req.prompt, model=model, cache_salt=f"{salt}-{i}",
            sampling=SamplingParams(max_tokens=req.max_tokens, min_tokens=req.max_tokens)))
        first, tokens = None, 0
        async for event in stream:
            if first is None and event.token_ids:
                first = time.perf_counter()
            tokens += len(event.token_ids)
        return submitted, first or time.perf_counter(), time.perf_counter(), tokens

    done = await asyncio.gather(*(one(i, r, m) for i, (r, m) in enumerate(zip(workload, models))))
    return RunStats(seconds=max(end for _, _, end, _ in done) - start, tokens=sum(t for *_, t in done),
                    ttft=[f - s for s, f, _, _ in done], latency=[e - s for s, _, e, _ in done])


def _p50_p90(values: list[float]) -> tuple[float, float]:
    """Median and 90th percentile, in ms, interpolated between the nearest values (numpy's default
    rule): an even count's median is the mean of the middle two, and p90 is below the maximum."""
    if len(values) < 2:  # quantiles needs two values; one value is every percentile
        return values[0] * 1000, values[0] * 1000
    return statistics.median(values) * 1000, statistics.quantiles(values, n=10, method="inclusive")[-1] * 1000


def run_traffic(s: TrafficSettings) -> TrafficResult:
    from hotswap.hub import Registry
    from hotswap.serve.engine import Engine, EngineConfig

    probe = EngineConfig(device=s.device, dtype=s.dtype, lora_dtype=s.lora_dtype)
    device, dtype = probe.torch_device(), probe.torch_dtype()
    result = TrafficResult(settings=asdict(s) | {"device_slots": s.device_slots},
                           machine=describe_machine(device, dtype))
    work = Path(tempfile.mkdtemp(prefix="hotswap-traffic-"))
    try:
        registry = Registry(work / "home")
        base_name, base_dir, hf_config = run_in_fresh_thread(lambda: prepare_base(s, work, registry, device, dtype))
        run_in_fresh_thread(lambda: make_adapters(s, work, base_dir, registry, count=s.adapters))
        workload = make_workload(s, token_limit(base_dir, hf_config))
        result.adapters_used = len({r.adapter for r in workload})
        cfg = EngineConfig(device=s.device, dtype=s.dtype, max_batch_tokens=512, max_running=32,
                           lora_capacity_bytes=s.device_slots * adapter_bytes(hf_config, s.rank,
                                                                              probe.torch_lora_dtype()),
                           host_cache_bytes=4 << 30, max_rank=max(64, s.rank),
                           edge_lora_rows=s.device_slots * s.rank if s.edges else 0,  # as many slots at the edges
                           lora_dtype=s.lora_dtype)
        runs = {"base": [None] * len(workload), "adapters": [f"bench-a{r.adapter}" for r in workload]}
        stats: dict[str, list[RunStats]] = {k: [] for k in runs}
        events: dict[str, int] = {}
        fresh = itertools.count()
        engine = Engine(registry, base_name, cfg)
        engine.start_sync()
        result.machine["lora_kernels"] = engine.lora_kernels
        try:
            for round_ in range(s.repeat + 1):  # the first round warms up, untimed
                order = list(runs.items())[::(-1 if round_ % 2 else 1)]
                for key, models in order:
                    before = engine.stats()
                    run = asyncio.run(_drive(engine, workload, models, f"r{next(fresh)}"))
                    if round_:
                        stats[key].append(run)
                        if key == "adapters":
                            _count_events(events, before, engine.stats())
        finally:
            engine.stop_sync()
        registry.close()
        for key, timed in stats.items():
            result.req_s[key] = statistics.median(len(workload) / r.seconds for r in timed)
            result.tok_s[key] = statistics.median(r.tokens / r.seconds for r in timed)
            result.ttft_ms[key] = _p50_p90([t for r in timed for t in r.ttft])
            result.latency_ms[key] = _p50_p90([t for r in timed for t in r.latency])
        result.ratio_rounds = [b.seconds / a.seconds for a, b in zip(stats["adapters"], stats["base"])]
        result.ratio = statistics.median(result.ratio_rounds)
        result.adapter_events = events
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _count_events(total: dict[str, int], before, after) -> None:
    for tier, n in after.adapter_hits.items():
        total[f"hits_{tier}"] = total.get(f"hits_{tier}", 0) + n - before.adapter_hits.get(tier, 0)
    for tier, n in after.adapter_evictions.items():
        total[f"evictions_{tier}"] = total.get(f"evictions_{tier}", 0) + n - before.adapter_evictions.get(tier, 0)


def _slots(n: int) -> str:
    return f"{n} slot" + ("s" if n != 1 else "")


_EVENTS = {"hits_device": "found on the device", "hits_host": "copied from the host cache",
           "hits_disk": "read from the registry", "evictions_device": "device evictions",
           "evictions_host": "host-cache evictions"}


def format_traffic(r: TrafficResult) -> str:
    s = r.settings
    lines = [f"hotswap bench --traffic: {s['shape'] or s['base']}, {s['requests']} requests at {s['rate']:g}/s "
             f"(Poisson), prompts {max(1, s['prompt'] // 2)}-{s['prompt'] + s['prompt'] // 2} tokens, outputs "
             f"{max(1, s['new_tokens'] // 2)}-{s['new_tokens'] + s['new_tokens'] // 2} tokens; {s['adapters']} "
             f"{'DoRA' if s.get('dora') else 'LoRA'} adapters{' (also on embed_tokens, lm_head)' if s.get('edges') else ''} "
             f"of rank {s['rank']}{rows_note(s)} (popularity 1/k^{s['zipf']:g}, "
             f"{r.adapters_used} used), {_slots(s['device_slots'])} on the device",
             f"machine: {r.machine['device']}, torch {r.machine['torch']}, {r.machine['dtype']}, "
             f"load average at start {r.machine['load_avg']:.2f}, adapter rows by the "
             f"{r.machine.get('lora_kernels', '?')} kernels; medians of {s['repeat']} rounds", "",
             "| requests go to | requests/s | tokens/s | first token p50 / p90 (ms) | latency p50 / p90 (ms) |",
             "|---|---|---|---|---|"]
    labels = {"base": "the bare base", "adapters": f"their adapters ({s['adapters']}, {_slots(s['device_slots'])})"}
    for key, label in labels.items():
        lines.append(f"| {label} | {r.req_s[key]:.2f} | {r.tok_s[key]:,.1f} | {r.ttft_ms[key][0]:,.0f} / "
                     f"{r.ttft_ms[key][1]:,.0f} | {r.latency_ms[key][0]:,.0f} / {r.latency_ms[key][1]:,.0f} |")
    lines += ["", f"adapters vs base throughput: {r.ratio:.2f}x (rounds {min(r.ratio_rounds):.2f} to "
                  f"{max(r.ratio_rounds):.2f})",
              "adapter requests in the timed adapters' runs: " + ", ".join(
                  f"{r.adapter_events.get(key, 0)} {label}" for key, label in _EVENTS.items())]
    return "\n".join(lines)
