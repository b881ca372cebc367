"""`hotswap bench` end to end on a tiny random-init shape: every figure present, parity with PEFT."""

from __future__ import annotations

import json

import pytest

from hotswap.serve.bench import BenchSettings, run
from hotswap.serve.bench_report import format_table, to_json


def test_bench_measures_every_configuration_and_agrees_with_peft():
    result = run(BenchSettings(base=None, shape="tiny", batch=3, prompt=8, new_tokens=4, adapters=2, rank=4,
                               repeat=2, device="cpu"))
    assert set(result.tok_s) == {"engine_base", "engine_mixed", "hf_base", "peft_mixed"}
    assert all(v > 0 for v in result.tok_s.values())
    assert set(result.ratios) == {"mixed_vs_engine_base", "mixed_vs_peft_mixed", "engine_base_vs_hf_base",
                                  "peft_load_vs_engine_load"}
    rounds = result.ratio_rounds["mixed_vs_engine_base"]  # the median is over each round's own ratio
    assert len(rounds) == 2 and min(rounds) <= result.ratios["mixed_vs_engine_base"] <= max(rounds)
    assert result.load_ms["engine_registry_to_slot"] > 0 and result.load_ms["peft_load_adapter"] > 0
    # random adapters that really change the output, mixed in one batch: greedy rows equal PEFT's
    assert result.parity["engine_mixed_vs_peft_mixed_greedy"] == "3/3 rows identical"
    table = format_table(result)
    assert result.machine["lora_kernels"] == "native" and "adapter rows by the native kernels" in table
    assert "| engine, 2 adapters mixed |" in table and "| mixed_vs_peft_mixed |" in table
    assert f"| {min(rounds):.2f} to {max(rounds):.2f} |" in table
    assert json.loads(to_json(result))["settings"]["shape"] == "tiny"
    assert result.cached_tokens == {"engine_base": 0, "engine_mixed": 0}  # every round computes its prompts
    # each engine run's prefill and decode steps, timed apart
    assert set(result.phases_ms) == {"engine_base", "engine_mixed"}
    assert all(v["ttft"] > 0 and v["tpot"] > 0 for v in result.phases_ms.values())
    assert "| engine, 2 adapters mixed | " in table.split("| engine run |")[1]


def test_bench_with_dora_adapters():
    result = run(BenchSettings(base=None, shape="tiny", batch=2, prompt=8, new_tokens=3, adapters=2, rank=4,
                               repeat=1, device="cpu", skip_hf=True, dora=True))
    assert set(result.tok_s) == {"engine_base", "engine_mixed"} and all(v > 0 for v in result.tok_s.values())
    assert "2 DoRA adapters of rank 4" in format_table(result)


def test_bench_with_edge_adapters_agrees_with_peft():
    """``--edges``: LoRA on embed_tokens and lm_head too; PEFT's mixed batch takes them, rows agree."""
    result = run(BenchSettings(base=None, shape="tiny", batch=3, prompt=8, new_tokens=4, adapters=2, rank=4,
                               repeat=1, device="cpu", edges=True))
    assert result.parity["engine_mixed_vs_peft_mixed_greedy"] == "3/3 rows identical"
    assert "rank 4 on all linear modules, embed_tokens and lm_head" in format_table(result)


def test_bench_times_a_shared_prefix_computed_and_reused():
    result = run(BenchSettings(base=None, shape="tiny", batch=3, prompt=8, new_tokens=4, adapters=2, rank=4,
                               repeat=1, device="cpu", skip_hf=True, shared_prefix=40))
    assert {"prefix_cold", "prefix_warm"} <= set(result.tok_s) and result.ratios["prefix_warm_vs_cold"] > 0
    # 48 tokens per prompt: the warm run finds the prefix's two full blocks of 16 cached, the cold one none
    assert result.cached_tokens == {"engine_base": 0, "engine_mixed": 0, "prefix_cold": 0, "prefix_warm": 32}
    table = format_table(result)
    assert "| engine, 2 adapters mixed, after a shared 40-token prefix: from the prefix cache |" in table


def test_bench_in_bfloat16_runs_the_engine_at_that_dtype():
    """``--dtype``: here the GPU's default on the CPU (the torch path: the native kernels are fp32 only)."""
    result = run(BenchSettings(base=None, shape="tiny", batch=2, prompt=8, new_tokens=3, adapters=2, rank=4,
                               repeat=1, device="cpu", dtype="bfloat16", skip_hf=True))
    assert result.machine["dtype"] == "bfloat16" and result.settings["dtype"] == "bfloat16"
    assert result.machine["lora_kernels"] == "torch" and "adapter rows by the torch kernels" in format_table(result)
    assert set(result.tok_s) == {"engine_base", "engine_mixed"} and all(v > 0 for v in result.tok_s.values())


def test_bench_with_bfloat16_adapter_rows_agrees_with_peft():
    """``--lora-dtype bfloat16``: the adapters are saved in bfloat16 and held so under the float32 base;
    PEFT computes with the same values, and the rows agree."""
    result = run(BenchSettings(base=None, shape="tiny", batch=3, prompt=8, new_tokens=4, adapters=2, rank=4,
                               repeat=1, device="cpu", lora_dtype="bfloat16"))
    assert result.parity["engine_mixed_vs_peft_mixed_greedy"] == "3/3 rows identical"
    assert result.machine["dtype"] == "float32"
    assert "rank 4 on all linear modules, saved and held in bfloat16" in format_table(result)


def test_bench_command_refuses_an_unknown_dtype_or_shape():
    from typer.testing import CliRunner

    from hotswap.serve.cli import bench_app

    out = CliRunner().invoke(bench_app, ["--shape", "tiny", "--dtype", "fp8"])
    assert out.exit_code == 2 and "unknown dtype 'fp8'" in out.output
    out = CliRunner().invoke(bench_app, ["--shape", "tiny", "--lora-dtype", "int4"])
    assert out.exit_code == 2 and "unknown dtype 'int4'" in out.output and "--lora-dtype" in out.output
    out = CliRunner().invoke(bench_app, ["--shape", "tiny", "--device", "cpu", "--dtype", "bfloat16",
                                         "--lora-dtype", "float32"])
    assert out.exit_code == 2 and "under a bfloat16 base" in out.output
    out = CliRunner().invoke(bench_app, ["--shape", "huge"])
    assert out.exit_code == 2 and "unknown shape 'huge'" in out.output
    out = CliRunner().invoke(bench_app, ["--shape", "tiny", "--dora"])
    assert out.exit_code == 2 and "--skip-hf" in out.output
    out = CliRunner().invoke(bench_app, ["--shape", "tiny", "--shared-prefix", "-1"])
    assert out.exit_code == 2 and "--shared-prefix" in out.output


def test_load_histogram_mean_is_over_the_cold_loads_only(monkeypatch):
    """The warm-up loads (the mixed batch's adapters, made resident before timing) are not cold
    loads: here they report 100 s each, and the histogram mean must not see them."""
    from hotswap.serve.engine.stats import StatsRecorder

    report, loads = StatsRecorder.adapter_event, []

    def slow_warm_ups(self, kind, tier, seconds):
        if kind not in ("hit", "evict"):
            loads.append(seconds)
            seconds += 100.0 if len(loads) <= 2 else 0.0  # the first two: bench-a0 and bench-a1 warming up
        report(self, kind, tier, seconds)

    monkeypatch.setattr(StatsRecorder, "adapter_event", slow_warm_ups)
    result = run(BenchSettings(base=None, shape="tiny", batch=2, prompt=8, new_tokens=2, adapters=2, rank=4,
                               repeat=1, device="cpu", skip_hf=True))
    assert len(loads) == 2 + 3  # two warm-ups, then the three cold loads
    assert result.load_ms["engine_adapter_load_hist_mean"] == pytest.approx(sum(loads[2:]) * 1000 / 3)


def _refusal(args: list[str]) -> str:
    """The command's error, box and line wrapping removed; it must exit 2 (a usage error)."""
    from typer.testing import CliRunner

    from hotswap.serve.cli import bench_app

    out = CliRunner().invoke(bench_app, args)
    assert out.exit_code == 2 and isinstance(out.exception, SystemExit), out.output  # not a traceback
    return " ".join(out.output.replace("│", " ").split())


def test_bench_command_refuses_a_request_longer_than_the_context_before_any_set_up(tmp_path):
    from hotswap.hub import Registry

    from .api_support import save_base

    said = _refusal(["--shape", "tiny", "--prompt", "4090", "--new-tokens", "32"])
    assert "--prompt + --new-tokens = 4090 + 32 = 4122 tokens exceeds the base's context of 4096 tokens" in said
    said = _refusal(["--shape", "tiny", "--prompt", "4010", "--shared-prefix", "64"])
    assert "--shared-prefix + --prompt + --new-tokens = 64 + 4010 + 32 = 4106 tokens exceeds" in said
    # a registry base: its own max_position_embeddings
    registry = Registry(tmp_path / "home")
    registry.publish(save_base(tmp_path / "short", max_len=128), name="short", kind="base")
    registry.close()
    home = ["--home", str(tmp_path / "home")]
    said = _refusal(["--base", "short", *home, "--prompt", "100", "--new-tokens", "40"])
    assert "= 140 tokens exceeds the base's context of 128 tokens" in said
    said = _refusal(["--base", "nothing", *home])
    assert "--base" in said and "'nothing'" in said


def test_bench_command_refuses_more_adapters_than_the_batch_mixes():
    said = _refusal(["--shape", "tiny", "--batch", "4", "--adapters", "8"])
    assert "8 adapters cannot all be mixed in a batch of 4 requests" in said and "--adapters" in said


def _base_and_adapters(tmp_path, **settings):
    """A tiny random-init base and two adapters, as the bench publishes them."""
    import torch

    from hotswap.hub import Registry
    from hotswap.serve.bench import make_adapters, prepare_base

    s = BenchSettings(base=None, shape="tiny", batch=2, prompt=8, new_tokens=2, adapters=2, rank=4, device="cpu",
                      **settings)
    registry = Registry(tmp_path / "home")
    dtype = getattr(torch, s.dtype or "float32")
    _, base_dir, _ = prepare_base(s, tmp_path, registry, torch.device("cpu"), dtype)
    dirs = make_adapters(s, tmp_path, base_dir, registry)
    registry.close()
    return s, base_dir, dirs, dtype


@pytest.mark.parametrize("settings", [dict(dtype="bfloat16"), dict(lora_dtype="bfloat16")])
def test_peft_baseline_computes_its_adapters_in_the_base_dtype(tmp_path, settings):
    """PEFT's mixed batch holds its adapters in the base's dtype, as the engine computes them: not
    upcast to float32 under a bfloat16 base (PEFT's default), which would time and compare PEFT on
    other arithmetic than the engine's. Adapters saved in bfloat16 under a float32 base are computed
    in float32 (the same values), as the README says."""
    import torch

    from hotswap.serve.bench_hf import HFBaselines

    s, base_dir, dirs, dtype = _base_and_adapters(tmp_path, **settings)
    hf = HFBaselines(s, base_dir, dirs, [[5] * 8] * 2, ["bench-a0", "bench-a1"], torch.device("cpu"), dtype)
    lora = {p.dtype for n, p in hf.peft.named_parameters() if "lora_" in n}
    assert lora == {dtype} and {p.dtype for p in hf.model.parameters()} == {dtype}


def test_engine_cold_load_is_timed_until_the_device_has_the_rows(monkeypatch):
    """On a GPU a slot's rows are copied asynchronously: the engine's cold-load timer ends after a
    device synchronisation, as PEFT's load_adapter timer does (here a stand-in that takes 50 ms)."""
    import time

    import hotswap.serve.bench as bench

    calls = []

    def slow_sync(device):
        calls.append(device.type)
        time.sleep(0.05)

    monkeypatch.setattr(bench, "sync_device", slow_sync)
    result = run(BenchSettings(base=None, shape="tiny", batch=2, prompt=8, new_tokens=2, adapters=2, rank=4,
                               repeat=1, device="cpu", skip_hf=True))
    assert calls == ["cpu"] * 6  # before and after each of the three cold loads
    assert result.load_ms["engine_registry_to_slot"] >= 50


def test_machine_description_names_the_cpu_and_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    """Not ``os.cpu_count()`` alone, which counts the host's CPUs whatever the process may use."""
    import os

    import torch

    from hotswap.serve.bench_report import cpu_model, describe_machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Example\nmodel name\t: Example CPU @ 2.00GHz\n\nprocessor\t: 1\n")
    assert cpu_model(info) == "Example CPU @ 2.00GHz"
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    machine = describe_machine(torch.device("cpu"), torch.float32)
    assert "2 of 64 logical CPUs usable" in machine["device"] and machine["device"].startswith("cpu: ")
    assert f"torch on {torch.get_num_threads()} threads" in machine["device"] and machine["dtype"] == "float32"


def test_the_device_pool_holds_every_adapter_of_the_run():
    """The mixed batch's adapters and the cold loads' all fit the device pool at once, whatever the
    shape and rank (a fixed 1 GiB held 12 rank-16 adapters of the 8b shape in bfloat16): a pool too
    small for the batch would time the engine waiting for slots and evicting, not its mixed batch."""
    import torch
    from transformers import LlamaConfig

    from hotswap.serve.bench import COLD, SHAPES, adapter_bytes, engine_config
    from hotswap.serve.lora.pool import LoraPool

    for shape, adapters, rank in (("8b", 16, 16), ("1b", 32, 64), ("smol", 64, 16)):
        config = LlamaConfig(**SHAPES[shape])
        h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        s = BenchSettings(base=None, shape=shape, batch=adapters, adapters=adapters, rank=rank, device="cpu",
                          dtype="bfloat16" if shape != "smol" else None)
        cfg = engine_config(s, config)
        dtype = cfg.torch_lora_dtype()
        rows_of = lambda size: LoraPool.rows_for_bytes(size, config.num_hidden_layers, dims, dtype)  # noqa: E731
        assert rows_of(adapter_bytes(config, rank, dtype)) == rank
        rows = rows_of(cfg.lora_capacity_bytes)
        assert rows >= (adapters + COLD) * rank, shape
