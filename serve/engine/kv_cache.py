"""Paged KV cache: a pool of fixed-size blocks per layer and the plain-Python block bookkeeping.

A sequence holds a list of block ids (its block table); token p of it lives in slot
``table[p // block_size] * block_size + p % block_size``. Nothing is stored for padding.
"""

from __future__ import annotations

import torch


class KVCache:
    """``k[layer]``, ``v[layer]``: ``[num_blocks * block_size, num_kv_heads, head_dim]``."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class BlockManager:
    """Hands out KV blocks; knows nothing of tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend ``table`` in place so it holds ``num_tokens`` tokens (caller checked ``can_grow``)."""
        for _ in range(self.blocks_for(num_tokens) - len(table)):
            table.append(self._free.pop())

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()
