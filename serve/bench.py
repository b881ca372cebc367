"""`hotswap bench`: the engine against HF transformers and PEFT, on the same requests in one run.

Measures tokens/s for the engine with the bare base, the engine with N distinct adapters mixed
in one batch, HF PEFT's mixed batch (``generate(adapter_names=...)``) and HF ``generate`` on the
base; and the cold-load time of an adapter, registry -> device slot, against PEFT ``load_adapter``
(median of three adapters never loaded before). With ``shared_prefix``, also the mixed batch with a
prompt prefix common to its requests, its KV computed (a cache salt per request) against reused from the prefix
cache (that prefix already sent to each adapter).
Adapters are random rank-R LoRA on all seven linear modules, published into a throwaway registry.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench_hf import HFBaselines, sync_device
from .bench_report import describe_machine
from .threads import run_in_fresh_thread

SHAPES = {  # random-init Llama shapes (the anchors' table)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SHAPE_POSITIONS = 4096  # the random-init shapes' context (max_position_embeddings)
COLD = 3  # adapters kept cold for the load timing
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchSettings:
    base: str | None = "smollm2"  # registry reference of the base (used when shape is None)
    home: str | None = None
    shape: str | None = None  # random-init shape instead of a registry base
    batch: int = 8
    prompt: int = 64
    new_tokens: int = 32
    adapters: int = 8
    rank: int = 16
    repeat: int = 5  # timed rounds (each runs every configuration once); medians are reported
    device: str = "auto"
    dtype: str | None = None  # None: the engine's default (bfloat16 on a GPU, float32 on the CPU)
    # the engine's adapter rows (None: the base's dtype); a narrower one also saves the adapters in it, as
    # a run that trained them in it would, so that PEFT computes with the values the engine holds
    lora_dtype: str | None = None
    skip_hf: bool = False
    dora: bool = False  # the adapters are DoRA (with random magnitudes); engine only (PEFT mixes no DoRA)
    edges: bool = False  # the adapters also target embed_tokens and lm_head
    shared_prefix: int = 0  # > 0: tokens of a prefix common to the requests, timed with the prefix cache cold and warm


@dataclass
class BenchResult:
    settings: dict
    machine: dict
    tok_s: dict[str, float] = field(default_factory=dict)
    load_ms: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # medians over rounds
    ratio_rounds: dict[str, list[float]] = field(default_factory=dict)  # each round's ratio, in order
    # per engine configuration: prompt tokens per request taken from the prefix cache (last round)
    cached_tokens: dict[str, float] = field(default_factory=dict)
    parity: dict[str, str] = field(default_factory=dict)
    # per engine configuration, medians over rounds of the run's mean time to first token (its requests'
    # prefill, which they share) and mean time per output token after it (a decode step), ms
    phases_ms: dict[str, dict[str, float]] = field(default_factory=dict)


def prepare_base(s: BenchSettings, work: Path, registry, device, dtype):
    """Publish the base into the throwaway registry; returns (its name, folder, HF config)."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from hotswap.hub import Registry

    from .engine.resolve import not_a_base

    folder = work / "base"
    if s.shape is not None:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[s.shape], max_position_embeddings=SHAPE_POSITIONS)
        with torch.device(device):  # random init of a large shape is much faster on a GPU
            model = LlamaForCausalLM(config)
        model.to("cpu", dtype).save_pretrained(folder)  # in the dtype it is served in: less to write and hash
        del model
        _word_tokenizer(config.vocab_size, config.eos_token_id).save_pretrained(folder)
    else:
        source = Registry(s.home)
        snap = source.open(s.base)
        if problem := not_a_base(snap.version):
            raise SystemExit(problem)
        shutil.copytree(snap.path, folder)
        source.close()
    registry.publish(folder, name="bench-base", kind="base")
    return "bench-base", folder, AutoConfig.from_pretrained(folder)


def token_limit(base_dir: Path, hf_config) -> int:
    """One past the largest prompt id to draw: the engine takes ids its tokenizer knows, which may be
    fewer than the embedding's rows (a vocabulary padded to a round size)."""
    from transformers import AutoTokenizer

    return min(hf_config.vocab_size, len(AutoTokenizer.from_pretrained(base_dir)))


def _word_tokenizer(vocab_size: int, eos_id: int):
    """A tokenizer for random-init shapes: token i is the word ``<i>`` (the bench sends token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<{eos_id}>", unk_token="<0>")


def make_adapters(s: BenchSettings, work: Path, base_dir: Path, registry, count: int | None = None) -> list[Path]:
    """``count`` random adapters (B non-zero so each changes the output), saved by PEFT and published
    as ``bench-a0``, ``bench-a1``, ...; by default the mixed batch's and the cold-load timing's."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    targets = MODULES + (["embed_tokens", "lm_head"] if s.edges else [])
    cfg = LoraConfig(r=s.rank, lora_alpha=2 * s.rank, target_modules=targets, init_lora_weights=False, use_dora=s.dora)
    peft_model = get_peft_model(model, cfg, adapter_name="a0")
    if s.lora_dtype is not None:  # the saved A and B in that dtype (DoRA magnitudes stay float32)
        for n, p in peft_model.named_parameters():
            if "lora_" in n and "lora_magnitude" not in n:
                p.data = p.data.to(getattr(torch, s.lora_dtype))
    dirs = []
    for i in range(s.adapters + COLD if count is None else count):  # the last COLD: for the load timing
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_magnitude" in n:  # around the base's own row norms, as after training
                    p.mul_(1 + 0.05 * torch.randn_like(p))
                elif "lora_" in n:
                    p.normal_(0, 0.02)
        out = work / f"adapter{i}"
        # without PEFT's copies of the embedding and lm_head (the vocabulary, twice, in every file)
        peft_model.save_pretrained(out, save_embedding_layers=False)
        dirs.append(out / "a0" if (out / "a0").is_dir() else out)
        registry.publish(dirs[-1], name=f"bench-a{i}", kind="adapter", base="bench-base")
    return dirs


def adapter_bytes(hf_config, rank: int, dtype: torch.dtype) -> int:
    """Device bytes of one rank-``rank`` adapter on all seven modules (what the pool reserves)."""
    h, i = hf_config.hidden_size, hf_config.intermediate_size
    head = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head, hf_config.num_key_value_heads * head
    in_out = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i)
    return hf_config.num_hidden_layers * in_out * rank * dtype.itemsize


def engine_config(s: BenchSettings, hf_config):
    """The engine's settings: a device pool that holds every adapter of the run at once (the mixed
    batch's and the cold loads'), so that no timed run waits for a slot or evicts."""
    from hotswap.serve.engine import EngineConfig

    probe = EngineConfig(device=s.device, dtype=s.dtype, lora_dtype=s.lora_dtype)
    need = (s.adapters + COLD) * adapter_bytes(hf_config, s.rank, probe.torch_lora_dtype())
    return EngineConfig(device=s.device, dtype=s.dtype, max_batch_tokens=max(512, s.batch * s.prompt),
                        max_running=max(32, s.batch), lora_capacity_bytes=max(1 << 30, need),
                        host_cache_bytes=max(2 << 30, 2 * need), max_rank=max(64, s.rank),
                        edge_lora_rows=(s.adapters + COLD) * s.rank if s.edges else 0, lora_dtype=s.lora_dtype)


def run(s: BenchSettings) -> BenchResult:
    from hotswap.hub import Registry
    from hotswap.serve.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    probe = EngineConfig(device=s.device, dtype=s.dtype, lora_dtype=s.lora_dtype)
    device, dtype = probe.torch_device(), probe.torch_dtype()
    result = BenchResult(settings=asdict(s), machine=describe_machine(device, dtype))
    work = Path(tempfile.mkdtemp(prefix="hotswap-bench-"))
    try:
        registry = Registry(work / "home")
        # torch work outside the engine runs where it leaves no OpenMP workers behind to slow the
        # engine's step thread (see serve/threads.py): set-up on a thread that exits, the HF and
        # PEFT baselines on the step thread itself, between the engine's runs
        base_name, base_dir, hf_config = run_in_fresh_thread(lambda: prepare_base(s, work, registry, device, dtype))
        adapter_dirs = run_in_fresh_thread(lambda: make_adapters(s, work, base_dir, registry))
        gen = torch.Generator().manual_seed(0)
        limit = token_limit(base_dir, hf_config)
        prompts = torch.randint(5, limit, (s.batch, s.prompt), generator=gen).tolist()
        prefix = torch.randint(5, limit, (s.shared_prefix,), generator=gen).tolist()
        names = [f"bench-a{i % s.adapters}" for i in range(s.batch)]
        total = s.batch * s.new_tokens

        engine = Engine(registry, base_name, engine_config(s, hf_config))
        engine.start_sync()
        result.machine["lora_kernels"] = engine.lora_kernels
        try:
            def engine_run(models, salts: list[str], head: list[int] | None = None) -> float:
                sp = SamplingParams(max_tokens=s.new_tokens, min_tokens=s.new_tokens)
                reqs = [GenerationRequest(prompt_token_ids=(head or []) + p, model=m, sampling=sp, cache_salt=salt)
                        for p, m, salt in zip(prompts, models, salts)]
                before = engine.stats()
                start = time.perf_counter()
                outs = engine.generate_sync(reqs)
                elapsed = time.perf_counter() - start
                after = engine.stats()
                engine_run.outputs = [list(o.token_ids) for o in outs]
                engine_run.cached = sum(o.usage.cached_tokens for o in outs) / len(outs)
                engine_run.phases = {name: _mean_ms(getattr(before, name), getattr(after, name))
                                     for name in ("ttft", "tpot")}
                return elapsed

            for name in set(names):  # steady state: adapters resident, as under traffic
                engine.load_future(name).result()

            def warm_prefix_run(salt: str) -> float:  # untimed: the prefix sent once to each adapter
                engine.generate_sync([GenerationRequest(prompt_token_ids=prefix, model=m, cache_salt=salt,
                                                        sampling=SamplingParams(max_tokens=1)) for m in set(names)])
                return engine_run(names, [salt] * s.batch, prefix)

            # a cache salt of its own for every request of every run: each prompt is computed, as HF
            # computes it (without, later rounds would reuse earlier rounds' prompts)
            fresh = itertools.count()
            own = lambda: [f"r{next(fresh)}" for _ in range(s.batch)]  # noqa: E731
            runs = {"engine_base": lambda: engine_run([None] * s.batch, own()),
                    "engine_mixed": lambda: engine_run(names, own())}
            if s.shared_prefix:
                runs.update(prefix_cold=lambda: engine_run(names, own(), prefix),
                            prefix_warm=lambda: warm_prefix_run(f"r{next(fresh)}"))
            hf = None if s.skip_hf else engine.call_on_step_thread(
                lambda: HFBaselines(s, base_dir, adapter_dirs, prompts, names, device, dtype))
            if hf is not None:
                runs.update(hf_base=lambda: engine.call_on_step_thread(hf.base_run),
                            peft_mixed=lambda: engine.call_on_step_thread(hf.mixed_run))
            # every configuration once per round, rounds repeated: a machine that slows down or
            # speeds up during the run affects all of them alike. The engine's two runs swap order
            # every round, so neither always runs first. Ratios are taken within each round, then
            # the median over rounds; tokens/s are medians too
            times: dict[str, list[float]] = {k: [] for k in runs}
            phases: dict[str, list[dict[str, float]]] = {}
            for round_ in range(s.repeat + 1):
                order = list(runs.items())
                if round_ % 2:
                    order[0], order[1] = order[1], order[0]
                for key, run_once in order:
                    elapsed = run_once()
                    if key == "engine_mixed":
                        engine_outputs = engine_run.outputs
                    if key.startswith(("engine_", "prefix_")):
                        result.cached_tokens[key] = engine_run.cached
                        if round_:
                            phases.setdefault(key, []).append(engine_run.phases)
                    if round_:  # the first round warms up
                        times[key].append(elapsed)
            for key, values in times.items():
                result.tok_s[key] = total / statistics.median(values)
            result.phases_ms = {key: {name: statistics.median(p[name] for p in phases[key]) for name in ("ttft", "tpot")}
                                for key in runs if key in phases}
            loads, before = [], engine.stats()  # the histogram also holds the warm-up loads: not cold
            for i in range(s.adapters, s.adapters + COLD):  # timed to the slot's rows written, as PEFT's
                sync_device(device)
                start = time.perf_counter()
                engine.load_future(f"bench-a{i}").result()
                sync_device(device)  # the host-to-device copies of a GPU's slot are asynchronous
                loads.append((time.perf_counter() - start) * 1000)
            result.load_ms["engine_registry_to_slot"] = statistics.median(loads)
            result.load_ms["engine_adapter_load_hist_mean"] = _mean_ms(before.adapter_load,
                                                                       engine.stats().adapter_load)
        finally:
            engine.stop_sync()
        result.load_ms["adapter_file_mb"] = (adapter_dirs[-1] / "adapter_model.safetensors").stat().st_size / 1e6
        if hf is not None:
            same = sum(a == b for a, b in zip(engine_outputs, hf.mixed_outputs))
            result.parity["engine_mixed_vs_peft_mixed_greedy"] = f"{same}/{len(names)} rows identical"
            result.load_ms["peft_load_adapter"] = statistics.median(hf.load_ms(d, f"cold{i}")
                                                                    for i, d in enumerate(adapter_dirs[-COLD:]))
        for name, (faster, slower) in {"mixed_vs_engine_base": ("engine_mixed", "engine_base"),
                                       "mixed_vs_peft_mixed": ("engine_mixed", "peft_mixed"),
                                       "engine_base_vs_hf_base": ("engine_base", "hf_base"),
                                       "prefix_warm_vs_cold": ("prefix_warm", "prefix_cold")}.items():
            if faster in times and slower in times:  # time ratio = throughput ratio, per round
                result.ratio_rounds[name] = [b / a for a, b in zip(times[faster], times[slower])]
                result.ratios[name] = statistics.median(result.ratio_rounds[name])
        if "peft_load_adapter" in result.load_ms:
            result.ratios["peft_load_vs_engine_load"] = (result.load_ms["peft_load_adapter"]
                                                         / result.load_ms["engine_registry_to_slot"])
        registry.close()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mean_ms(before, after) -> float:
    """The mean, in ms, of what a histogram recorded between two snapshots of it."""
    count = after.count - before.count
    return (after.total - before.total) * 1000 / count if count else 0.0


if __name__ == "__main__":  # `python -m hotswap.serve.bench ...`, the same as `hotswap bench ...`
    from .cli import bench_app

    bench_app()
