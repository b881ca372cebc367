"""The tables `hotswap bench` prints (Markdown) or its JSON, from a ``BenchResult`` (serve/bench.py)."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .bench import BenchResult
    from .bench_traffic import TrafficResult


def describe_machine(device: torch.device, dtype: torch.dtype) -> dict:
    """What the run ran on, as the report prints it: the GPU's name, or the CPU's model and the
    logical CPUs this process may use (its affinity; ``os.cpu_count()`` counts the host's, which a
    container or ``taskset`` may not give it), with the threads torch runs on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        name = (f"cpu: {cpu_model()} ({usable} of {os.cpu_count()} logical CPUs usable, "
                f"torch on {torch.get_num_threads()} threads)")
    return dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(), platform=platform.platform(),
                load_avg=os.getloadavg()[0], dtype=str(dtype).replace("torch.", ""))


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux's cpuinfo), else what ``platform`` knows, else "unknown model"."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def rows_note(s: dict) -> str:
    dtype = s.get("lora_dtype")
    return f", saved and held in {dtype}" if dtype else ""


def format_table(r: BenchResult) -> str:
    s = r.settings
    lines = [f"hotswap bench: {s['shape'] or s['base']}, batch {s['batch']}, prompt {s['prompt']}, "
             f"{s['new_tokens']} new tokens, {s['adapters']} {'DoRA' if s.get('dora') else 'LoRA'} adapters of rank "
             f"{s['rank']} on all linear modules{', embed_tokens and lm_head' if s.get('edges') else ''}"
             f"{rows_note(s)}",
             f"machine: {r.machine['device']}, torch {r.machine['torch']}, {r.machine['dtype']}, "
             f"load average at start {r.machine['load_avg']:.2f}, adapter rows by the "
             f"{r.machine.get('lora_kernels', '?')} kernels", "",
             "| configuration | tokens/s |", "|---|---|"]
    mixed = min(s["adapters"], s["batch"])  # request i names adapter i % adapters: a batch mixes at most its size
    shared = f"engine, {mixed} adapters mixed, after a shared {s.get('shared_prefix', 0)}-token prefix"
    labels = {"engine_base": "engine, base only", "engine_mixed": f"engine, {mixed} adapters mixed",
              "peft_mixed": f"HF PEFT mixed batch, {mixed} adapters", "hf_base": "HF generate, base",
              "prefix_cold": f"{shared}: computed", "prefix_warm": f"{shared}: from the prefix cache"}
    lines += [f"| {labels[k]} | {v:,.1f} |" for k, v in r.tok_s.items()]
    if r.phases_ms:  # where an engine run's time goes: its prefill, then its decode steps
        lines += ["", "| engine run | first token, ms (prefill) | per output token, ms (a decode step) |",
                  "|---|---|---|"]
        lines += [f"| {labels[k]} | {v['ttft']:,.1f} | {v['tpot']:,.1f} |" for k, v in r.phases_ms.items()]
    lines += ["", "| adapter cold load | ms |", "|---|---|"]
    load_labels = {"engine_registry_to_slot": "engine, registry -> device slot",
                   "engine_adapter_load_hist_mean": "engine, load histogram mean",
                   "peft_load_adapter": "PEFT load_adapter", "adapter_file_mb": "adapter file (MB)"}
    lines += [f"| {load_labels[k]} | {v:,.1f} |" for k, v in r.load_ms.items()]
    lines += ["", "| ratio | median | rounds, lowest to highest | target |", "|---|---|---|---|"]
    targets = {"mixed_vs_engine_base": ">= 0.9", "mixed_vs_peft_mixed": ">= 3",
               "engine_base_vs_hf_base": ">= 1", "peft_load_vs_engine_load": "", "prefix_warm_vs_cold": ""}
    for k, v in r.ratios.items():
        spread = r.ratio_rounds.get(k)
        spread = f"{min(spread):.2f} to {max(spread):.2f}" if spread else ""
        lines.append(f"| {k} | {v:.2f} | {spread} | {targets.get(k, '')} |")
    lines += [f"\n{k}: {v}" for k, v in r.parity.items()]
    return "\n".join(lines)


def to_json(r: BenchResult | TrafficResult) -> str:
    return json.dumps(asdict(r), indent=2)
