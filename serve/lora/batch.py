"""Per-step LoRA indices: which tokens form which blocks, and each block's rows in every pool.

Built once per step on the host from plain Python (sequence spans and slots), then handed to every
layer; layers see only these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .native import GroupCall
from .pool import GROUPS, GatheredRows, LoraPool

# Cost of gathering one block's adapter rows, in units of one padded token's LoRA compute; a
# block of L tokens costs about L + _BLOCK_COST. It picks the block length below.
_BLOCK_COST = 4


@dataclass(slots=True)
class DoraStep:
    """The DoRA scales of a step: per group, ``tables[group][layer]`` ``[K + 1, outs]`` (row 0 ones,
    row k the k-th DoRA adapter's scales) and ``index [T]``, each token's row in them."""

    tables: dict[str, list[Tensor]]
    index: Tensor


@dataclass(slots=True)
class LoraStep:
    """Shapes: T tokens in the step, T_lora of them with an adapter, NB blocks of L positions."""

    num_blocks: int
    block_len: int
    rank: int  # k: the highest layer rank among the step's adapters (smaller pad with row 0); 0: edges only
    token_index: Tensor | None  # [NB * L] token feeding each block position; None: identity
    block_pos: Tensor | None  # [T_lora] block position of each adapter token; None: identity
    token_ids: Tensor | None  # [T_lora] which tokens those are; None: all T tokens
    rows: dict[str, Tensor] | None  # group "qkv"/... -> [NB, n*k] into a_stacked; module -> [NB, k]; None when gathered
    gathered: GatheredRows | None  # those rows' weights, every layer's (see LoraPool.batch_rows); None: gather per layer
    # steps served by the native kernel (see native.py): group -> (rows_a [T_lora, n*k], rows_b
    # [n, T_lora, k]) of each adapter token, read straight from the pools; kernel_tok [T_lora] those
    # tokens (None: all T in order)
    kernel_rows: dict[str, tuple[Tensor, Tensor]] | None = None
    kernel_tok: Tensor | None = None
    scratch: Tensor | None = None  # [T_lora * max n*k] the kernel's rank activations
    kernel_calls: dict[str, GroupCall] | None = None  # group -> its calls, ``(layer, x, y)``; None: no kernels loaded
    dora: DoraStep | None = None  # when a DoRA adapter is in the step: outputs are scaled per token after the LoRA
    # edge LoRA (see edges.py): module -> [T, k] each token's rows in that edge pool (0: none)
    edges: dict[str, Tensor] | None = None


def choose_block_len(lengths: list[int]) -> int:
    """The block length minimising padded compute plus per-block gathers."""
    best, best_cost, cand = 1, None, 1
    longest = max(lengths)
    while True:
        cost = sum(-(-n // cand) for n in lengths) * (cand + _BLOCK_COST)
        if best_cost is None or cost < best_cost:
            best, best_cost = cand, cost
        if cand >= longest:
            return best
        cand *= 2


def build_lora_step(segments: list[tuple[int, int, int]], num_tokens: int, pool: LoraPool,
                    device: torch.device, cache_bytes: int = 0, kernel: bool = False) -> LoraStep | None:
    """``segments``: (first token, number of tokens, slot) per sequence, slot -1 = bare base.
    ``cache_bytes``: how large the gathered rows of all layers may be (see ``LoraPool.batch_rows``).
    ``kernel``: the native kernel serves the step, reading the pools directly (no gathered copy).

    Returns None when no token of the step uses an adapter: the layers then skip LoRA entirely.
    """
    active = [s for s in segments if s[2] >= 0 and s[1] > 0]
    if not active:
        return None
    slots = {s: pool.slot(s) for _, _, s in active}
    # the layers pad to the highest layer rank; an edge's own rank pads only that edge's rows (_edge_rows)
    rank = max(info.layer_rank for info in slots.values())
    if rank == 0:  # adapters of embed_tokens/lm_head only: the layers run no LoRA at all
        return LoraStep(num_blocks=0, block_len=1, rank=0, token_index=None, block_pos=None, token_ids=None,
                        rows=None, gathered=None, edges=_edge_rows(active, num_tokens, slots, pool, device))
    if kernel:
        return _kernel_step(active, num_tokens, pool, slots, rank, device)
    block_len = choose_block_len([n for _, n, _ in active])
    token_index: list[int] = []
    block_pos: list[int] = []
    token_ids: list[int] = []
    block_slots: list[int] = []
    for start, n, slot in active:
        for b0 in range(start, start + n, block_len):
            b1 = min(b0 + block_len, start + n)
            base = len(token_index)
            block_pos.extend(range(base, base + b1 - b0))
            token_ids.extend(range(b0, b1))
            token_index.extend(range(b0, b1))
            token_index.extend([b0] * (block_len - (b1 - b0)))  # padding reads a real token; never scattered back
            block_slots.append(slot)
    num_blocks = len(block_slots)
    all_tokens = len(token_ids) == num_tokens and token_ids == list(range(num_tokens))
    identity = all_tokens and len(token_index) == num_tokens
    key = (rank, tuple((s, slots[s].generation) for s in block_slots))

    def _t(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    gathered = pool.cached_batch(key) if cache_bytes else None
    rows = None
    if gathered is None:
        rows = _rows(pool, [slots[s] for s in block_slots], rank, device)
        if cache_bytes:
            gathered = pool.batch_rows(key, rows, cache_bytes)
    return LoraStep(
        num_blocks=num_blocks, block_len=block_len, rank=rank, gathered=gathered,
        token_index=None if identity else _t(token_index),
        block_pos=None if identity else _t(block_pos),
        token_ids=None if all_tokens else _t(token_ids),
        rows=rows, dora=_dora_step(active, num_tokens, slots, device),
        edges=_edge_rows(active, num_tokens, slots, pool, device))


def _edge_rows(active: list[tuple[int, int, int]], num_tokens: int, slots: dict, pool: LoraPool,
               device: torch.device) -> dict[str, Tensor] | None:
    """Per edge module some token's adapter targets: each token's rows in that edge pool, in its
    adapter's order, padded with the zero row 0 to the step's highest rank there."""
    found = {}
    for module in pool.edge_dims:
        rank = max((len(slots[s].rows.get(module, ())) for _, _, s in active), default=0)
        if rank:
            rows = [[0] * rank for _ in range(num_tokens)]
            for start, n, s in active:
                own = pad_rows(slots[s].rows.get(module, ()), rank)
                rows[start:start + n] = [own] * n
            found[module] = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
    return found or None


def _dora_step(active: list[tuple[int, int, int]], num_tokens: int, slots: dict, device: torch.device) -> DoraStep | None:
    dora_slots = [s for s in dict.fromkeys(s for _, _, s in active) if slots[s].dora is not None]
    if not dora_slots:
        return None
    row = {s: i + 1 for i, s in enumerate(dora_slots)}
    index = [0] * num_tokens
    for start, n, s in active:
        index[start:start + n] = [row.get(s, 0)] * n
    tables = {}
    for group, first in slots[dora_slots[0]].dora.items():
        stacked = torch.cat([torch.ones_like(first)[None], *(slots[s].dora[group][None] for s in dora_slots)])
        tables[group] = list(stacked.transpose(0, 1).contiguous().unbind(0))  # per layer [K + 1, outs]
    return DoraStep(tables, torch.tensor(index, dtype=torch.long).to(device, non_blocking=True))


def _kernel_step(active: list[tuple[int, int, int]], num_tokens: int, pool: LoraPool, slots: dict, rank: int,
                 device: torch.device) -> LoraStep:
    """Row ids of every adapter token for the kernel: one row set per sequence, repeated over its
    tokens. A decode batch comes back step after step, so its step (row ids, scratch, the kernel
    calls) is kept in the pool and handed out again while the same slots sit at the same tokens."""
    token_ids = [t for start, n, _ in active for t in range(start, start + n)]
    decode = len(token_ids) == len(active)  # one token per sequence
    key = (rank, num_tokens, tuple(token_ids), tuple((s, slots[s].generation) for _, _, s in active))
    if decode and (kept := pool.cached_step(key)) is not None:
        return kept
    rows = _rows(pool, [slots[s] for _, _, s in active], rank, device)
    kernel_rows = {g: (rows[g], torch.stack([rows[m] for m in ms])) for g, ms in GROUPS.items()}
    if not decode:  # prefill: each token takes its sequence's rows
        seq_of_token = torch.tensor([i for i, (_, n, _) in enumerate(active) for _ in range(n)]).to(device)
        kernel_rows = {g: (a.index_select(0, seq_of_token), b.index_select(1, seq_of_token))
                       for g, (a, b) in kernel_rows.items()}
    widest = max(len(ms) for ms in GROUPS.values()) * rank
    tok = None if token_ids == list(range(num_tokens)) else torch.tensor(token_ids).to(device)
    scratch = torch.empty(len(token_ids) * widest, dtype=pool.compute_dtype, device=device)
    calls = None if pool.kernels is None else {
        g: pool.kernels.group_call(pool.kernel_pools(g), a, b, tok, scratch, num_tokens)
        for g, (a, b) in kernel_rows.items()}
    step = LoraStep(num_blocks=len(active), block_len=1, rank=rank, token_index=None, block_pos=None,
                    token_ids=None, rows=None, gathered=None, kernel_rows=kernel_rows, kernel_tok=tok,
                    scratch=scratch, kernel_calls=calls, dora=_dora_step(active, num_tokens, slots, device),
                    edges=_edge_rows(active, num_tokens, slots, pool, device))
    return pool.keep_step(key, step) if decode else step


def _rows(pool: LoraPool, block_slots: list, rank: int, device: torch.device) -> dict[str, Tensor]:
    return {name: torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)
            for name, ids in row_ids(pool, block_slots, rank).items()}


def row_ids(pool: LoraPool, block_slots: list, rank: int) -> dict[str, list[list[int]]]:
    """Row ids of every block in each pool, ``rank`` per module (padded with the zero row 0):
    a group ``[NB][n*rank]`` into its stacked A, a module ``[NB][rank]`` into its B. A block
    slot of None (a padded or bare-base row) reads only the zero row."""
    n = pool.max_rows + 1
    per_module = {m: [pad_rows(slot.rows.get(m, ()) if slot is not None else (), rank) for slot in block_slots]
                  for modules in GROUPS.values() for m in modules}
    rows: dict[str, list[list[int]]] = {}
    for group, modules in GROUPS.items():
        rows[group] = [sum(([r + i * n for r in per_module[m][b]] for i, m in enumerate(modules)), [])
                       for b in range(len(block_slots))]
        for m in modules:
            rows[m] = per_module[m]
    return rows


def pad_rows(rows, rank: int) -> list[int]:
    """``rows`` padded to ``rank`` with the zero row 0."""
    rows = list(rows)
    return rows + [0] * (rank - len(rows))
