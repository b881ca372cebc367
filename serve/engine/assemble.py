"""Putting an engine together: the base worker, its adapter pools and residency, full models, the core."""

from __future__ import annotations

from typing import Callable

from ..lora import triton_ops
from ..lora.native import POOL_DTYPES
from ..lora.pool import LoraPool
from ..lora.residency import Residency
from . import loaders
from .config import EngineConfig
from .core import Core
from .errors import IncompatibleAdapter
from .models import ModelPool
from .resolve import Resolver
from .stats import EngineStats, StatsRecorder
from .worker import Worker


def assemble(resolver: Resolver, cfg: EngineConfig, recorder: StatsRecorder,
             unqueue: Callable[[], None]) -> Core:
    """Load the base named by ``resolver`` and build the core that steps it. Runs on a thread that
    does torch work once and ends, so the caller keeps no OpenMP workers (serve/threads.py)."""
    base_target, path = resolver.open_base()
    hf, tokenizer = loaders.load_hf(path, cfg.torch_dtype())
    if tokenizer is None:
        raise IncompatibleAdapter(f"base {base_target.ref} holds no tokenizer "
                                  "(tokenizer.json or tokenizer_config.json)")
    base = Worker(base_target, hf, tokenizer, cfg)
    del hf  # the worker keeps the weights it serves; the HF module's other parts go
    runner = base.runner
    dims = runner.module_dims()
    rows = LoraPool.rows_for_bytes(cfg.lora_capacity_bytes, runner.num_layers, dims, cfg.torch_lora_dtype())
    pool = runner.lora = LoraPool(runner.num_layers, dims, rows, cfg.torch_lora_dtype(), cfg.torch_device(),
                                  runner.edge_dims(), cfg.edge_lora_rows, compute_dtype=cfg.torch_dtype())
    if pool.dtype in POOL_DTYPES:  # other row types (float16 under a float32 base) take the torch path
        pool.kernels = runner.kernels
    if pool.kernels is None and cfg.use_triton_kernels():
        runner.triton = triton_ops.load(cfg.torch_device(), cfg.torch_dtype())
        if runner.triton is not None:  # decode steps read the pools in place: no gathered copies to keep
            base.lora_batch_cache_bytes = 0
    residency = Residency(
        lambda ref, digest: loaders.load_adapter(resolver, ref, digest, runner, pool, cfg),
        pool, cfg.host_cache_bytes, cfg.load_workers, recorder.adapter_event)
    models = ModelPool(lambda ref, digest: loaders.load_model(resolver, ref, digest, cfg),
                       cfg.model_memory_bytes, recorder.model_event)
    core = Core(base, residency, models, recorder, unqueue)
    residency.wake = models.wake = core.wake.set

    def capacities(s: EngineStats) -> None:
        s.lora_bytes_capacity, s.host_cache_bytes_capacity = pool.capacity_bytes, cfg.host_cache_bytes
    recorder.update(capacities)
    return core
