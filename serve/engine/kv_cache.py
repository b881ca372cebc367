"""Paged KV cache: a pool of fixed-size blocks per layer and the plain-Python block bookkeeping.

A sequence holds a list of block ids (its block table); token p of it lives in slot
``table[p // block_size] * block_size + p % block_size``. Nothing is stored for padding. Full
blocks are shared between sequences with the same prefix (see ``BlockManager``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

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
    """Hands out KV blocks; knows nothing of tensors.

    Prefix caching: a block whose tokens are all computed may be registered under the hash of its
    content and everything before it (``block_hashes``). Sequences whose leading blocks hash the same
    share them (reference counts) instead of computing them again. A registered block whose last
    holder ends stays cached but evictable: it counts as free, and is reused, least recently
    released first, only when no never-cached block is left.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._free = list(range(num_blocks - 1, -1, -1))  # holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered for reuse (shared, held, or evictable)."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``hashes`` from the start (nothing is claimed)."""
        found: list[int] = []
        for h in hashes if self.caching else ():
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def can_grow(self, table: list[int], num_tokens: int, shared: list[int] | tuple[()] = ()) -> bool:
        """Whether ``table``, after taking the ``shared`` blocks, can be extended to ``num_tokens``."""
        claimed = sum(1 for b in shared if b in self._evictable)
        return self.blocks_for(num_tokens) - len(table) - len(shared) <= self.num_free - claimed

    def share(self, table: list[int], shared: list[int]) -> None:
        """Append cached blocks (from ``match``) to ``table``, taking a reference on each."""
        for block in shared:
            self._evictable.pop(block, None)
            self._refs[block] += 1
            table.append(block)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend ``table`` in place so it holds ``num_tokens`` tokens (caller checked ``can_grow``)."""
        for _ in range(self.blocks_for(num_tokens) - len(table)):
            if self._free:
                block = self._free.pop()
            else:  # the least recently released cached block gives up its content
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self._refs[block] = 1
            table.append(block)

    def register(self, table: list[int], hashes: list[bytes], start: int) -> None:
        """Offer ``table[i]`` under ``hashes[i]`` for ``start <= i < len(hashes)`` (blocks whose
        tokens are all computed by the end of the step being planned). A hash already cached keeps
        its first block."""
        if not self.caching:
            return
        for block, h in zip(table[start:len(hashes)], hashes[start:]):
            if h not in self._by_hash and block not in self._hash_of:
                self._by_hash[h], self._hash_of[block] = block, h

    def forget_cached(self) -> None:
        """Unregister every block: after a failed step, the KV of blocks offered for it is in doubt."""
        self._by_hash.clear()
        self._hash_of.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()

    def free(self, table: list[int]) -> None:
        """Drop a reference on each block; the last block of a table is the first evicted."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.clear()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], num_tokens: int, block_size: int,
                        key: bytes) -> None:
    """Append to ``hashes`` the hash of every full block within the first ``num_tokens`` tokens
    that it lacks. Each hash covers the block's tokens, the hash before it and, for the first block,
    ``key`` (what computed the KV: the version digest, plus a tenant's salt), so equal hashes mean
    equal KV. SHA-256: a prompt cannot be crafted to collide with another tenant's blocks."""
    for i in range(len(hashes), num_tokens // block_size):
        parent = hashes[i - 1] if i else hashlib.sha256(key).digest()
        tokens = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        hashes.append(hashlib.sha256(parent + tokens).digest())
