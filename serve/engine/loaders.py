"""Loading checkpoints and adapters from the registry (runs on background threads)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..lora.compose import combine, composite_digest, is_composite, parse_composite
from ..lora.pool import LoraPool
from ..lora.spec import EDGES, AdapterRefused
from ..lora.weights import HostAdapter, dora_scales, drop_base_copies, load_adapter as read_adapter
from ..threads import one_cpu_thread
from .config import EngineConfig
from .errors import CapacityExceeded, IncompatibleAdapter
from .architecture import check_architecture
from .model import LlamaRunner
from .requests import Target
from .worker import Worker


def load_hf(path: Path, dtype: torch.dtype, classifier: bool = False):
    """Read a checkpoint folder with transformers (its weights are then taken by a ``LlamaRunner``):
    a causal LM, or with ``classifier`` a sequence classifier (its ``score`` head instead of lm_head)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    check_architecture(AutoConfig.from_pretrained(path))
    kind = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = kind.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None


def has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in ("tokenizer_config.json", "tokenizer.json"))


def load_adapter(resolver, ref: str, digest: str, runner: LlamaRunner, pool: LoraPool,
                 cfg: EngineConfig) -> HostAdapter:
    if is_composite(ref):  # "name@3*0.7+other@1*0.3", as the resolver wrote it
        host = _load_combination(resolver, ref, digest, runner, cfg)
    else:
        host = _read(resolver, ref, digest, runner, cfg, pin_memory=cfg.torch_device().type == "cuda")
    if host.magnitude is not None:
        with one_cpu_thread():
            host.dora_scales = dora_scales(host, runner.module_weight, runner.module_norm_sq, pool.dtype)
    for module, need in host.ranks.items():
        if need > pool.rows_of(module):
            setting = "edge_lora_rows" if module in EDGES else "lora_capacity_bytes"
            raise CapacityExceeded(f"adapter {ref} needs {need} rows in the {module} pool but the device pool has "
                                   f"{pool.rows_of(module)} (raise {setting})")
    return host


def _read(resolver, ref: str, digest: str | None, runner: LlamaRunner, cfg: EngineConfig,
          pin_memory: bool = False) -> HostAdapter:
    # the registry checks the files first (re-hashing any whose status changed since their last hash)
    snap = resolver.open(ref)  # "name@version" is immutable; the digest check guards against reuse
    if digest is not None and snap.version.digest != digest:
        raise IncompatibleAdapter(f"{ref} now has digest {snap.version.digest[:12]}, expected {digest[:12]}")
    try:
        host = read_adapter(snap.path, snap.version.digest, ref, runner.num_layers,
                            {**runner.module_dims(), **runner.edge_dims()}, cfg.max_rank, pin_memory=pin_memory)
        return host if host.base_copies is None else drop_base_copies(host, runner.edge_weight)
    except AdapterRefused as exc:
        raise IncompatibleAdapter(f"adapter {ref} cannot be applied exactly: {exc}") from None


def _load_combination(resolver, ref: str, digest: str, runner: LlamaRunner, cfg: EngineConfig) -> HostAdapter:
    # the parts are read into plain memory: only the combination is kept (pinned on a GPU)
    try:
        parsed = parse_composite(ref)
    except ValueError as exc:  # written by the resolver, so only a bug gets here: still a clear refusal
        raise IncompatibleAdapter(str(exc)) from None
    parts = [(_read(resolver, part, None, runner, cfg), weight) for part, weight in parsed]
    found = composite_digest([(host.digest, weight) for host, weight in parts])
    if found != digest:
        raise IncompatibleAdapter(f"{ref} now has digest {found[:12]}, expected {digest[:12]}")
    try:
        return combine(parts, digest, ref, cfg.max_rank, pin_memory=cfg.torch_device().type == "cuda")
    except AdapterRefused as exc:
        raise IncompatibleAdapter(f"adapters {ref} cannot be combined: {exc}") from None


def load_model(resolver, ref: str, digest: str, cfg: EngineConfig) -> Worker:
    snap = resolver.open(ref)
    info = resolver.model_info(Target("model", ref, digest), cfg)
    hf, tokenizer = load_hf(snap.path, cfg.torch_dtype(), classifier=info.labels is not None)
    # a model published without tokenizer files reads text as its base does (see Resolver.model_info)
    return Worker(Target("model", ref, digest), hf, tokenizer or info.tokenizer, cfg, labels=info.labels)
