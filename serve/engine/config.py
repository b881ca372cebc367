"""Engine configuration: one frozen dataclass, checked once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MiB = 1 << 20
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs; sizes are in bytes or tokens, capacities are ``max_*``."""

    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    max_batch_tokens: int = 512  # tokens (prefill chunks + decodes) in one forward step
    max_running: int = 32  # sequences decoding at once
    max_queue: int = 1024  # waiting requests before QueueFull
    max_model_len: int | None = None  # None: the base's max_position_embeddings, capped at 8192
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    kv_block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 512 * MiB  # KV pool of the base (and of each full model)
    max_rank: int = 64  # highest LoRA rank accepted
    lora_capacity_bytes: int = 256 * MiB  # device rows for adapters (rank x modules x dims)
    # what the adapter rows are stored in; None: the base's dtype (exact: the values PEFT computes with).
    # bfloat16 under a float32 base halves the rows' bytes (twice the adapters per byte, less for a decode
    # step to stream) and rounds each value to bfloat16 once, at load; the math stays float32
    lora_dtype: str | None = None
    # rows of the embed_tokens and of the lm_head LoRA pools (rank x adapters resident at once), beside
    # lora_capacity_bytes: a row is a vocabulary long (SmolLM2, float32: 64 rows of both, 26 MB); 0
    # refuses adapters that target them
    edge_lora_rows: int = 64
    host_cache_bytes: int = 1024 * MiB  # host (CPU) LRU cache of loaded adapters
    # torch path: a batch's adapter rows kept gathered across decode steps (the CPU kernel reads the
    # pools); None: 256 MiB on the CPU, 2 GiB on a GPU (a 1B base's batch of 32 needs about 1.1 GB)
    lora_batch_cache_bytes: int | None = None
    model_memory_bytes: int = 2048 * MiB  # budget for full fine-tuned models served beside the base
    load_workers: int = 1  # background threads loading cold adapters
    prefix_caching: bool = True  # share the KV of equal prompt prefixes (full blocks, same version and salt)
    native_kernels: bool = True  # CPU fp32: the compiled LoRA kernels when they build (serve/lora/native.py)
    # decode steps at bucketed shapes, replayed from CUDA graphs (serve/engine/decode_graphs.py). None: on
    # a GPU unless HOTSWAP_CUDA_GRAPHS=0; True on the CPU runs the same bucketed steps eagerly (tests)
    decode_graphs: bool | None = None
    # decode steps' LoRA from Triton kernels that read the pools in place (serve/lora/triton_ops.py), when
    # Triton is installed and they pass a check at start. None: on a GPU unless HOTSWAP_TRITON_LORA=0;
    # True elsewhere tries them too (on the CPU with TRITON_INTERPRET=1, the tests, and only without native_kernels)
    triton_kernels: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_running", "max_queue", "kv_block_size", "kv_cache_bytes", "max_rank",
                     "max_tokens_limit"):
            assert getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}"
        for name in ("lora_capacity_bytes", "host_cache_bytes", "edge_lora_rows", "model_memory_bytes"):
            assert getattr(self, name) >= 0, f"{name} must be at least 0, got {getattr(self, name)}"
        assert self.max_model_len is None or self.max_model_len > 0, (
            f"max_model_len must be positive, got {self.max_model_len}")
        assert self.load_workers >= 1, f"load_workers must be at least 1, got {self.load_workers}"
        assert self.lora_batch_cache_bytes is None or self.lora_batch_cache_bytes >= 0
        assert self.dtype in (None, *DTYPES), f"unknown dtype {self.dtype!r}"
        assert self.lora_dtype in (None, *DTYPES), f"unknown lora_dtype {self.lora_dtype!r}"
        # rows are widened to the base's dtype as they are read: only that is exact
        base, rows = self.torch_dtype(), self.torch_lora_dtype()
        assert rows == base or base == torch.float32, (
            f"lora_dtype {self.lora_dtype} under a {str(base)[6:]} base: the rows would be rounded to the base's dtype "
            f"in every step; use the base's dtype (the default), or narrower rows under a float32 base")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def batch_cache_bytes(self) -> int:
        if self.lora_batch_cache_bytes is not None:
            return self.lora_batch_cache_bytes
        return (2048 if self.torch_device().type == "cuda" else 256) * MiB

    def use_decode_graphs(self) -> bool:
        if self.decode_graphs is not None:
            return self.decode_graphs
        return self.torch_device().type == "cuda" and os.environ.get("HOTSWAP_CUDA_GRAPHS", "1") != "0"

    def use_triton_kernels(self) -> bool:
        if self.triton_kernels is not None:
            return self.triton_kernels
        return self.torch_device().type == "cuda" and os.environ.get("HOTSWAP_TRITON_LORA", "1") != "0"

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32

    def torch_lora_dtype(self) -> torch.dtype:
        return self.torch_dtype() if self.lora_dtype is None else getattr(torch, self.lora_dtype)
